"""Raft RPC over TCP: sealed, length-prefixed msgpack frames, one stream per peer.

Theory of operation
-------------------
Raft messages are one-way (a response is just another message, matched by
the core, not by the transport), so each agent keeps **one outbound TCP
connection per peer** and only writes on it, and accepts inbound connections
on which it only reads (etcd's rafthttp streams work the same way). Nothing
waits for an answer: frames are pipelined, and a burst of messages to a peer
goes out in a single `send_all`.

    send(m) ──▶ peer queue (bounded, drop oldest) ──▶ peer task ──TCP──▶ listener ──▶ on_message(m)

A frame is a 4-byte big-endian length, then `encode_message(m)` (msgpack of
`Message.to_wire()`), sealed with the cluster keyring when one is configured.
The associated data `RAFT_AAD` differs from gossip's, so a gossip frame cannot
be replayed as a Raft message or the reverse.

Peers are addressed by node id; `set_peer` / `remove_peer` update the map at
run time (the wiring feeds it from gossip). A changed address drops the current
connection and redials at once.

Losing messages is always safe in Raft (the leader retransmits, elections
retry), so every overload path drops instead of blocking the caller:
- a peer's queue holds at most `queue_limit` messages and `queue_bytes`
  (estimated) bytes; the oldest go first (the newest carry the freshest
  terms, commits and entries);
- a connection that fails loses the batch being written; the peer task
  redials with full-jitter exponential backoff (`retry_delay`), so a dead
  peer costs one connect attempt per backoff window, not a busy loop.

Silence
-------
A stream whose packets stop arriving (the peer's host cut off by a firewall,
a switch, a partition) does not fail by itself: the kernel keeps it
ESTABLISHED and retransmits with exponential backoff, up to minutes. Raft's
traffic is small, so the send buffer never fills and a write deadline never
fires, and after the network heals the next retransmission may still be
seconds away (measured: `rto:13056 backoff:6` after a 15 s isolation, the
old leader unreachable for 13 s more). So every outbound stream sets
`TCP_USER_TIMEOUT` to `silence_timeout_s` (an election timeout): data left
unacknowledged that long makes the kernel drop the connection, the peer task
sees the error at once and redials, and a fresh connection starts with a
fresh retransmission timer. It is the kernel's own definition of "sent and
never answered", measured per byte, so an idle stream is never dropped and a
peer that is merely slow to process (its kernel still acknowledges) is left
alone. Neither alternative says that: TCP keepalive probes only idle
connections (ours are never idle while a leader heartbeats, and keepalive
stays silent while data is unacknowledged), and an application-level
deadline would have to infer acknowledgement from the peer's Raft answers,
which come back on its own stream and do not exist for every message.
Redials during the partition are cheap (one SYN per `connect_timeout_s` plus
backoff, capped at `backoff_cap_s`), and both are short so that a healed
peer is reached again within about a second.

Resource handling
-----------------
Every inbound read is bounded: the declared frame length is checked against
`max_message_bytes` plus the sealing overhead before a byte of the body is
read; a connection silent for `idle_timeout_s` is closed (a healthy leader
sends heartbeats every 100 ms); at most `MAX_INBOUND_CONNECTIONS` are served at
once. Outbound writes run under `write_timeout_s`, connects under
`connect_timeout_s`.

Error handling
--------------
Nothing a peer sends can stop a task here. An inbound frame that is
oversized, does not open under the keyring, or is not a valid message
(`MalformedMessage`) is counted in `RaftTransportStats.dropped[reason]` and
its connection is closed: a stream that carried garbage cannot be re-framed.
A message addressed to another node is counted (`misaddressed`) and skipped.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import trio

from coordinator.backoff import retry_delay
from coordinator.raft_config import lan
from coordinator.raft_messages import (
    MAX_MESSAGE_BYTES,
    MalformedMessage,
    Message,
    NodeId,
    decode_message,
    encode_message,
)

from agent.cluster_keyring import OVERHEAD, KeyringFile, SealError

log = logging.getLogger(__name__)

Address = tuple[str, int]

RAFT_AAD: Final = b"gpu-orchestrator raft tcp v1"
_FRAME_HEADER: Final = struct.Struct(">I")
MAX_INBOUND_CONNECTIONS: Final = 64
# How long sent data may stay unacknowledged before a stream is dropped and
# redialled: the default Raft profile's election timeout (see "Silence").
SILENCE_TIMEOUT_S: Final = lan().election_ticks * lan().tick_interval_s
# Linux's TCP_USER_TIMEOUT (18); None where the platform has no such option.
_TCP_USER_TIMEOUT: Final[int | None] = getattr(socket, "TCP_USER_TIMEOUT", None)
DROP_REASONS: Final = (
    # inbound
    "decrypt",
    "malformed",
    "oversized",
    "misaddressed",
    # outbound
    "queue_full",
    "unknown_peer",
    "send_failed",
    "too_large",
)


@dataclass
class RaftTransportStats:
    """Transport counters, read by /metrics at scrape time."""

    messages: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    bytes: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    connects: int = 0
    connect_failures: int = 0


@dataclass(eq=False)
class _Peer:
    node: NodeId
    address: Address
    queue: deque[Message] = field(default_factory=deque)
    queued_bytes: int = 0
    wake: trio.Event = field(default_factory=trio.Event)
    redial: trio.Event = field(default_factory=trio.Event)
    connection: trio.CancelScope | None = None
    task: trio.CancelScope = field(default_factory=trio.CancelScope)
    connected: bool = False


def _approx_size(m: Message) -> int:
    """A cheap upper-ish estimate of a message's wire size, for the queue's byte bound."""
    size = 64 + sum(24 + len(e.data) for e in m.entries) + len(m.context)
    if m.snapshot is not None:
        size += len(m.snapshot.data) + 32 * len(m.snapshot.voters)
    return size


class RaftTransport:
    """The Raft TCP listener of one agent and its outbound streams to every known peer."""

    def __init__(
        self,
        node_id: NodeId,
        bind: str,
        port: int,
        keyring: KeyringFile | None,
        *,
        rng: random.Random,
        queue_limit: int = 4096,
        queue_bytes: int = 64 * 1024 * 1024,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        connect_timeout_s: float = 0.5,
        write_timeout_s: float = 10.0,
        idle_timeout_s: float = 30.0,
        silence_timeout_s: float = SILENCE_TIMEOUT_S,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 1.0,
        stats: RaftTransportStats | None = None,
    ) -> None:
        self.node_id = node_id
        self.bind = bind
        self.port = port
        self.keyring = keyring
        self.stats = stats if stats is not None else RaftTransportStats()
        self.max_frame = max_message_bytes + (OVERHEAD if keyring is not None else 0)
        self._rng = rng
        self._queue_limit = queue_limit
        self._queue_bytes = queue_bytes
        self._connect_timeout_s = connect_timeout_s
        self._write_timeout_s = write_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._silence_ms = max(1, round(silence_timeout_s * 1000))
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._peers: dict[NodeId, _Peer] = {}
        self._listeners: list[trio.SocketListener] = []
        self._nursery: trio.Nursery | None = None
        self._inbound = trio.CapacityLimiter(MAX_INBOUND_CONNECTIONS)
        # Outbound streams originate from the bind address when it names one, so a
        # peer (and a firewall rule) sees this agent's own address, not the route's.
        self.local_address = local_address_for(bind)

    # --- set-up ------------------------------------------------------------------------

    async def open(self) -> int:
        """Bind the TCP listener; returns its port. Raises OSError (port taken, address not local)."""
        self._listeners = await trio.open_tcp_listeners(self.port, host=self.bind)
        self.port = int(self._listeners[0].socket.getsockname()[1])
        return self.port

    async def aclose(self) -> None:
        """Close the listener (also when cancelled, as at shutdown)."""
        with trio.CancelScope(shield=True):
            for listener in self._listeners:
                await listener.aclose()
        self._listeners = []

    # --- peers -------------------------------------------------------------------------

    @property
    def peers(self) -> Mapping[NodeId, Address]:
        return {node: peer.address for node, peer in self._peers.items()}

    def connected(self, node: NodeId) -> bool:
        peer = self._peers.get(node)
        return peer is not None and peer.connected

    def set_peer(self, node: NodeId, address: Address) -> None:
        """Route messages for `node` to `address` (redialling if it changed)."""
        if node == self.node_id:
            return
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = _Peer(node, address)
            if self._nursery is not None:
                self._nursery.start_soon(self._peer_task, peer)
        elif peer.address != address:
            peer.address = address
            if peer.connection is not None:
                peer.connection.cancel()
            peer.redial.set()

    def set_peers(self, peers: Mapping[NodeId, Address]) -> None:
        """Replace the whole peer map (peers not named are removed)."""
        for node in list(self._peers):
            if node not in peers:
                self.remove_peer(node)
        for node, address in peers.items():
            self.set_peer(node, address)

    def remove_peer(self, node: NodeId) -> None:
        """Stop sending to `node`; what was queued for it is dropped."""
        peer = self._peers.pop(node, None)
        if peer is not None:
            peer.task.cancel()

    # --- sending -----------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue `message` for its addressee; never blocks (drops, counted, when it must)."""
        peer = self._peers.get(message.to)
        if peer is None:
            self.stats.dropped["unknown_peer"] += 1
            return
        size = _approx_size(message)
        peer.queue.append(message)
        peer.queued_bytes += size
        while len(peer.queue) > 1 and (len(peer.queue) > self._queue_limit or peer.queued_bytes > self._queue_bytes):
            peer.queued_bytes -= _approx_size(peer.queue.popleft())
            self.stats.dropped["queue_full"] += 1
        peer.wake.set()

    # --- tasks -------------------------------------------------------------------------

    async def run(
        self,
        on_message: Callable[[Message], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the listener and every peer's outbound stream until cancelled.

        `on_message` gets each valid inbound message addressed to this node; it must not block.
        """
        assert self._listeners, "open() first"

        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                if self._inbound.available_tokens == 0:
                    return  # at capacity: refuse at once rather than queue buffers
                async with self._inbound:
                    await self._serve_inbound(stream, on_message)

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for peer in self._peers.values():
                    nursery.start_soon(self._peer_task, peer)
                await nursery.start(trio.serve_listeners, handle, self._listeners)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _serve_inbound(self, stream: trio.SocketStream, on_message: Callable[[Message], None]) -> None:
        try:
            while True:
                header = await self._read_exactly(stream, _FRAME_HEADER.size)
                if header is None:
                    return  # the peer closed between frames: normal
                (length,) = _FRAME_HEADER.unpack(header)
                if length > self.max_frame:
                    self.stats.dropped["oversized"] += 1
                    return
                body = await self._read_exactly(stream, length)
                if body is None:
                    self.stats.dropped["malformed"] += 1  # truncated frame
                    return
                self.stats.bytes["in"] += _FRAME_HEADER.size + length
                payload = body
                if self.keyring is not None:
                    try:
                        payload = self.keyring.keyring.open(body, RAFT_AAD)
                    except SealError:
                        self.stats.dropped["decrypt"] += 1
                        return
                try:
                    message = decode_message(payload)
                except MalformedMessage as error:
                    self.stats.dropped["malformed"] += 1
                    log.debug("malformed raft frame from %s: %s", _peer_name(stream), error)
                    return
                if message.to != self.node_id:
                    self.stats.dropped["misaddressed"] += 1
                    continue
                self.stats.messages["in"] += 1
                on_message(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as error:
            log.debug("raft connection from %s closed: %r", _peer_name(stream), error)

    async def _read_exactly(self, stream: trio.SocketStream, size: int) -> bytes | None:
        """Exactly `size` bytes, or None if the peer closed first; TooSlowError when idle too long."""
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            with trio.fail_after(self._idle_timeout_s):
                chunk = await stream.receive_some(min(remaining, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    async def _peer_task(self, peer: _Peer) -> None:
        """Keep one outbound stream to `peer` while it has messages; redial with backoff."""
        with peer.task:
            attempt = 0
            while True:
                while not peer.queue:
                    peer.wake = trio.Event()
                    await peer.wake.wait()
                peer.redial = trio.Event()
                host, port = peer.address
                try:
                    with trio.fail_after(self._connect_timeout_s):
                        stream = await trio.open_tcp_stream(host, port, local_address=self.local_address)
                except (OSError, trio.TooSlowError) as error:
                    attempt += 1
                    self.stats.connect_failures += 1
                    log.debug("raft connect to %s at %s:%d failed: %r", peer.node, host, port, error)
                    with trio.move_on_after(retry_delay(attempt, self._rng, base_s=self._backoff[0], cap_s=self._backoff[1])):
                        await peer.redial.wait()  # a new address ends the wait early
                    continue
                self.stats.connects += 1
                self._notice_silence(stream)
                opened = trio.current_time()
                async with stream:
                    with trio.CancelScope() as scope:
                        peer.connection = scope
                        peer.connected = True
                        try:
                            await self._pump(peer, stream, scope)
                        finally:
                            peer.connection = None
                            peer.connected = False
                if scope.cancelled_caught and peer.redial.is_set():
                    attempt = 0  # the address changed: dial the new one at once
                elif trio.current_time() - opened >= self._backoff[1]:
                    attempt = 0  # it worked for a while: redial at once
                else:
                    # Closed right after connecting (e.g. the peer holds another cluster
                    # key and drops each stream): back off as for a failed connect.
                    attempt += 1
                    with trio.move_on_after(retry_delay(attempt, self._rng, base_s=self._backoff[0], cap_s=self._backoff[1])):
                        await peer.redial.wait()

    def _notice_silence(self, stream: trio.SocketStream) -> None:
        """Make the kernel drop `stream` once sent data stays unacknowledged for the silence timeout."""
        if _TCP_USER_TIMEOUT is None:
            return  # not Linux: only write_timeout_s (a full send buffer) ends a silent stream
        try:
            stream.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, self._silence_ms)
        except OSError as error:
            log.warning("raft: cannot set TCP_USER_TIMEOUT (%r); a silent peer is noticed only by write_timeout_s", error)

    async def _pump(self, peer: _Peer, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        """Write queued messages until the connection breaks (or the peer closes its end)."""

        async def watch_close() -> None:
            # The peer never writes on this stream: EOF or an error means it is gone,
            # and noticing now saves losing the next batch to a dead socket. A stream
            # the kernel dropped for silence (TCP_USER_TIMEOUT) ends here too.
            try:
                while await stream.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                if _is_silence(error):
                    log.info(
                        "raft: stream to %s unanswered for %.1fs; dropping it and redialling",
                        peer.node,
                        self._silence_ms / 1000,
                    )
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_close)
            while True:
                while not peer.queue:
                    peer.wake = trio.Event()
                    await peer.wake.wait()
                batch = list(peer.queue)
                peer.queue.clear()
                peer.queued_bytes = 0
                frames = [f for f in (self._frame(m) for m in batch) if f is not None]
                if not frames:
                    continue
                data = b"".join(frames)
                try:
                    with trio.fail_after(self._write_timeout_s):
                        await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as error:
                    self.stats.dropped["send_failed"] += len(frames)
                    log.debug("raft stream to %s broke: %r", peer.node, error)
                    nursery.cancel_scope.cancel()
                    return
                self.stats.messages["out"] += len(frames)
                self.stats.bytes["out"] += len(data)

    def _frame(self, message: Message) -> bytes | None:
        payload = encode_message(message)
        if self.keyring is not None:
            payload = self.keyring.keyring.seal(payload, RAFT_AAD)
        if len(payload) > self.max_frame:
            self.stats.dropped["too_large"] += 1
            log.error("raft message %s to %s is %d bytes, over the frame limit", message.kind.name, message.to, len(payload))
            return None
        return _FRAME_HEADER.pack(len(payload)) + payload


def local_address_for(bind: str) -> str | None:
    """The address outbound sockets should originate from: `bind`, unless it is a wildcard."""
    host = bind.strip("[]")
    if host in ("", "0.0.0.0", "::", "*"):
        return None
    return host


def _is_silence(error: BaseException) -> bool:
    """Whether `error` (or the OSError trio wrapped in it) is the kernel's ETIMEDOUT."""
    cause = error if isinstance(error, OSError) else error.__cause__
    return isinstance(cause, OSError) and cause.errno == errno.ETIMEDOUT


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        name = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{name[0]}:{name[1]}"


__all__ = [
    "Address",
    "local_address_for",
    "RAFT_AAD",
    "RaftTransport",
    "RaftTransportStats",
    "DROP_REASONS",
    "MAX_INBOUND_CONNECTIONS",
    "SILENCE_TIMEOUT_S",
]
