"""The gossip transport: sealed SWIM datagrams over UDP, push-pull state over TCP.

Theory of operation
-------------------
The SWIM core (coordinator/swim.py) speaks in opaque byte strings: datagrams to
send and receive, and a whole-state blob for push-pull sync. This module moves
them between agents, on one port (``[cluster] gossip_port``) for both
protocols, as memberlist does:

* **UDP**: one core datagram per UDP datagram, sealed with the cluster key
  (agent/cluster_keyring.py) when there is one.
* **TCP push-pull**: the initiator connects and sends one frame holding its
  state; the responder answers with one frame holding its own; both merge
  what they got. A frame is a 4-byte big-endian length then the (sealed)
  state. One exchange per connection.

Sealing uses a different associated data per channel (`UDP_AAD`, `TCP_AAD`),
so a datagram cannot be replayed as a push-pull frame or the reverse.

Resource handling
-----------------
Every read is bounded: a datagram larger than the core's packet size plus the
sealing overhead is dropped unread (`oversized`); a TCP frame's declared
length is checked against `max_state_bytes` before a byte of it is read, and
the whole exchange runs under `tcp_timeout`. At most `MAX_TCP_EXCHANGES`
inbound exchanges run at once; more connections are closed at once, so a
flood of connections cannot pile up buffers.

Error handling
--------------
Nothing a peer sends can stop a task here. Each rejected input is counted in
`GossipStats.dropped[reason]` (``oversized``, ``decrypt``, ``malformed``) and
dropped; `OSError`s on send (an unreachable peer) are logged at debug and
counted as failed sends. Decoding the payload itself is the core's job: its
`MalformedPacket` is counted by the caller through `count_malformed`.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from agent.cluster_keyring import OVERHEAD, KeyringFile, SealError
from agent.raft_transport import local_address_for

log = logging.getLogger(__name__)

Address = tuple[str, int]

UDP_AAD: Final = b"gpu-orchestrator gossip udp v1"
TCP_AAD: Final = b"gpu-orchestrator gossip tcp v1"
# Largest datagram read from the socket: anything bigger than the core's
# packet size plus the sealing overhead is refused after this read anyway.
_RECV_BUFFER: Final = 65_536
_FRAME_HEADER: Final = struct.Struct(">I")
MAX_TCP_EXCHANGES: Final = 16
DROP_REASONS: Final = ("decrypt", "malformed", "oversized")


@dataclass
class GossipStats:
    """Transport counters, read by /metrics at scrape time."""

    packets: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    bytes: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    send_failures: int = 0
    push_pulls: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})

    def count_malformed(self) -> None:
        self.dropped["malformed"] += 1


# Tries at a kernel-picked port whose TCP twin turns out to be taken.
PICK_PORT_ATTEMPTS = 8

class PushPullError(Exception):
    """A push-pull exchange failed: no connection, timeout, or the peer's answer was refused."""


class GossipTransport:
    """The UDP socket and TCP listener of one agent, and the outgoing push-pull client."""

    def __init__(
        self,
        bind: str,
        port: int,
        keyring: KeyringFile | None,
        *,
        max_packet_bytes: int,
        max_state_bytes: int,
        tcp_timeout_s: float,
        stats: GossipStats | None = None,
    ) -> None:
        self.bind = bind
        self.port = port
        self.keyring = keyring
        # The core's datagrams are at most max_packet_bytes; sealed ones are larger by OVERHEAD.
        self.max_datagram = max_packet_bytes + (OVERHEAD if keyring is not None else 0)
        self.max_frame = max_state_bytes + (OVERHEAD if keyring is not None else 0)
        self.tcp_timeout_s = tcp_timeout_s
        self.stats = stats if stats is not None else GossipStats()
        self.family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self._udp: trio.socket.SocketType | None = None
        self._listeners: list[trio.SocketListener] = []
        self._exchanges = trio.CapacityLimiter(MAX_TCP_EXCHANGES)

    # --- set-up ------------------------------------------------------------------------

    async def open(self) -> int:
        """Bind the UDP socket and the TCP listener on the same port; return that port.

        With port 0 the kernel picks a free UDP port, which another program may
        hold for TCP: then another UDP port is tried, a few times.
        Raises OSError when either cannot be bound (port taken, address not local).
        """
        for attempt in range(1 if self.port else PICK_PORT_ATTEMPTS):
            udp = trio.socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                await udp.bind((self.bind, self.port))
                port = int(udp.getsockname()[1])
                self._listeners = await trio.open_tcp_listeners(port, host=self.bind)
            except OSError as exc:
                udp.close()
                if self.port or exc.errno != errno.EADDRINUSE or attempt == PICK_PORT_ATTEMPTS - 1:
                    raise
                continue
            except BaseException:
                udp.close()
                raise
            self._udp, self.port = udp, port
            return port
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    async def aclose(self) -> None:
        """Close the UDP socket and the TCP listener (also when cancelled, as at shutdown)."""
        self.close()
        with trio.CancelScope(shield=True):
            for listener in self._listeners:
                await listener.aclose()
        self._listeners = []

    # --- sealing -----------------------------------------------------------------------

    def _seal(self, payload: bytes, aad: bytes) -> bytes:
        return payload if self.keyring is None else self.keyring.keyring.seal(payload, aad)

    def _open(self, sealed: bytes, aad: bytes) -> bytes | None:
        if self.keyring is None:
            return sealed
        try:
            return self.keyring.keyring.open(sealed, aad)
        except SealError:
            self.stats.dropped["decrypt"] += 1
            return None

    # --- UDP ---------------------------------------------------------------------------

    async def send_datagram(self, address: Address, payload: bytes) -> None:
        """Seal and send one datagram; a failure (unreachable, no route) is counted, not raised."""
        if self._udp is None:
            return
        data = self._seal(payload, UDP_AAD)
        try:
            await self._udp.sendto(data, address)
        except OSError as error:
            # ECONNREFUSED et al. come back from an earlier send on Linux; none of
            # them says anything about this datagram's peer that SWIM will not learn.
            self.stats.send_failures += 1
            log.debug("gossip send to %s failed: %s", address, error)
            return
        self.stats.packets["out"] += 1
        self.stats.bytes["out"] += len(data)

    async def serve_udp(
        self,
        on_datagram: Callable[[bytes, Address], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Receive datagrams for ever; pass each opened one to `on_datagram(payload, source)`."""
        assert self._udp is not None, "open() first"
        udp = self._udp
        task_status.started()
        while True:
            try:
                data, source = await udp.recvfrom(_RECV_BUFFER)
            except OSError as error:
                if error.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # an ICMP error for an earlier send, surfaced on this socket
                raise
            self.stats.packets["in"] += 1
            self.stats.bytes["in"] += len(data)
            if len(data) > self.max_datagram:
                self.stats.dropped["oversized"] += 1
                continue
            payload = self._open(data, UDP_AAD)
            if payload is not None:
                on_datagram(payload, (str(source[0]), int(source[1])))

    # --- TCP push-pull -----------------------------------------------------------------

    async def serve_tcp(
        self,
        local_state: Callable[[], bytes],
        on_state: Callable[[bytes, Address], None],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer push-pull exchanges for ever: read the peer's state, reply with ours, merge theirs."""

        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                if self._exchanges.available_tokens == 0:
                    return  # at capacity: refuse at once rather than queue buffers
                async with self._exchanges:
                    peer = _peer(stream)
                    with trio.move_on_after(self.tcp_timeout_s):
                        try:
                            theirs = await self._read_frame(stream)
                            if theirs is None:
                                return
                            await self._write_frame(stream, local_state())
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                            log.debug("push-pull from %s failed: %s", peer, error)
                            return
                        on_state(theirs, peer)

        await trio.serve_listeners(handle, self._listeners, task_status=task_status)

    async def push_pull(self, address: Address, state: bytes) -> bytes:
        """Send our state to `address` and return its state (opened, not yet decoded).

        Raises PushPullError on a connection failure, a timeout, or an answer
        that is oversized or does not open (those are also counted as drops).
        """
        try:
            with trio.fail_after(self.tcp_timeout_s):
                stream = await trio.open_tcp_stream(address[0], address[1], local_address=local_address_for(self.bind))
                async with stream:
                    await self._write_frame(stream, state)
                    theirs = await self._read_frame(stream)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as error:
            self.stats.push_pulls["failed"] += 1
            raise PushPullError(f"push-pull with {address[0]}:{address[1]} failed: {error or 'timeout'}") from None
        if theirs is None:
            self.stats.push_pulls["failed"] += 1
            raise PushPullError(f"push-pull with {address[0]}:{address[1]}: answer refused")
        self.stats.push_pulls["ok"] += 1
        return theirs

    async def _write_frame(self, stream: trio.SocketStream, payload: bytes) -> None:
        data = self._seal(payload, TCP_AAD)
        await stream.send_all(_FRAME_HEADER.pack(len(data)) + data)
        self.stats.bytes["out"] += _FRAME_HEADER.size + len(data)

    async def _read_frame(self, stream: trio.SocketStream) -> bytes | None:
        """One frame's opened payload; None (counted) when oversized, truncated or not opening."""
        header = await _read_exactly(stream, _FRAME_HEADER.size)
        if header is None:
            self.stats.dropped["malformed"] += 1
            return None
        (length,) = _FRAME_HEADER.unpack(header)
        if length > self.max_frame:
            self.stats.dropped["oversized"] += 1
            return None
        body = await _read_exactly(stream, length)
        if body is None:
            self.stats.dropped["malformed"] += 1
            return None
        self.stats.bytes["in"] += _FRAME_HEADER.size + length
        return self._open(body, TCP_AAD)


async def _read_exactly(stream: trio.SocketStream, size: int) -> bytes | None:
    """Exactly `size` bytes, or None if the peer closed first."""
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = await stream.receive_some(min(remaining, 65_536))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _peer(stream: trio.SocketStream) -> Address:
    try:
        name = stream.socket.getpeername()
    except OSError:
        return ("?", 0)
    return (str(name[0]), int(name[1]))


