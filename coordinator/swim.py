"""SWIM membership with Lifeguard, as a sans-io state machine.

Theory of operation
-------------------
`SwimCore` is one member's view of the cluster. It never reads a clock, opens a
socket or sleeps: the shell feeds it datagrams (`receive`), timer ticks
(`tick`) and `now`, and collects what it wants sent (`take_datagrams`) and what
changed (`take_events`). `next_deadline()` says when `tick` must run next; it
may already be ≤ now (call `tick` at once). The same inputs and the same seeded
`random.Random` always give the same outputs.

Failure detection (SWIM §4, memberlist state.go probeNode):
  every probe_interval · (health+1) the next member in a shuffled round-robin
  list is pinged. No ack within probe_timeout (scaled too, in Lifeguard) →
  `indirect_checks` random alive members are asked to ping it for us, relaying
  its ack or, after probe_timeout, a nack. No ack by the end of the interval →
  we suspect it. A member probed while suspect gets the accusation piggybacked
  on the ping, so it can refute at once.
Suspicion (SWIM §4.2, Lifeguard §IV-B): a suspect is declared dead when its
  suspicion timer fires; the timer starts long and shrinks as other members
  independently suspect the same incarnation. An alive message with a higher
  incarnation cancels it. A member told it is suspect or dead refutes by
  gossiping itself alive at an incarnation above the accusation's - so a
  member restarted at incarnation 0 overrides the verdicts on its last life.
Dissemination (SWIM §4.1): alive/suspect/dead news is queued once, encoded,
  and piggybacked on every datagram with room (pings, acks, gossip), each at
  most retransmit_mult · ⌈log10(N+1)⌉ times; every gossip_interval, pending
  news is also sent to gossip_nodes random members (including members dead for
  less than gossip_to_the_dead_time, who may have been wrongly declared).
Dead and left members are forgotten at the first probe-round boundary after
  gossip_to_the_dead_time.
Health (Lifeguard §IV-A): see swim_suspicion.Awareness.
Metadata: `set_meta` with different bytes bumps the incarnation and gossips an
  alive message (memberlist's UpdateNode); unchanged bytes send nothing.
Leave: a dead message with sender == self is gossiped; peers mark us "left".
Joining: `join(seeds)` sends JOIN + our alive to each seed every probe_interval
  until some member answers; the seed replies with its own alive, a correction
  if it holds a stale verdict about us, and a few other members. Full state
  goes over TCP, which the shell owns: it sends `local_state()` and feeds the
  answer to `merge_remote_state()` (memberlist mergeState: remote "dead" is
  taken as "suspect", remote "left" as left).

Interface for the shell (stable)
--------------------------------
    core = SwimCore(config, name, address, meta, rng, now, incarnation=0)
    core.join(seeds, now); core.receive(data, source, now)  # MalformedPacket on garbage
    core.tick(now); core.next_deadline(); core.set_meta(meta, now); core.leave(now)
    core.take_datagrams() -> [(address, bytes)]; core.take_events() -> [MemberEvent]
    core.members() -> [MemberView]; core.local_state() -> bytes
    core.merge_remote_state(data, now)  # MalformedPacket on garbage
    core.push_pull_peer() -> Address | None; core.leave_complete; core.stats; core.health_score
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from coordinator.swim_broadcasts import BroadcastQueue
from coordinator.swim_config import SwimConfig
from coordinator.swim_messages import (
    ALIVE,
    FRAME_OVERHEAD,
    DEAD,
    LEFT,
    MAX_HOST_BYTES,
    MAX_NAME_BYTES,
    SUSPECT,
    Ack,
    Address,
    Alive,
    Dead,
    IndirectPing,
    Join,
    MalformedPacket,
    Message,
    Nack,
    Ping,
    StateEntry,
    Suspect,
    decode_packet,
    decode_state,
    encode_header,
    encode_message,
    encode_state,
    frame,
)
from coordinator.swim_members import EventKind, Member, MemberEvent, MemberView, SwimStats
from coordinator.swim_suspicion import Awareness, Suspicion

__all__ = [
    "Address",
    "MalformedPacket",
    "MemberEvent",
    "MemberView",
    "SwimConfig",
    "SwimCore",
    "SwimStats",
]

@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    direct_deadline: float
    deadline: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    requester: Address
    seq: int
    deadline: float
    nack: bool


_SEQ_MOD = 1 << 32


class SwimCore:
    """One member's SWIM + Lifeguard state machine (see the module docstring)."""

    def __init__(
        self,
        config: SwimConfig,
        name: str,
        address: Address,
        meta: bytes,
        rng: random.Random,
        now: float,
        incarnation: int = 0,
    ) -> None:
        config.validate()
        if not 0 < len(name.encode()) <= MAX_NAME_BYTES:
            raise ValueError(f"member names are 1..{MAX_NAME_BYTES} UTF-8 bytes")
        if not 0 < len(address[0].encode()) <= MAX_HOST_BYTES or not 0 <= address[1] <= 65535:
            raise ValueError("address must be (host of 1..64 bytes, port 0..65535)")
        self._check_meta(meta, config)
        self._config = config
        self._name = name
        self._rng = rng
        self._me = Member(name, address, incarnation, ALIVE, bytes(meta), now)
        self._members: dict[str, Member] = {name: self._me}
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._corrected: dict[str, float] = {}
        self._queue = BroadcastQueue(config.max_broadcast_queue)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._seq = rng.randrange(_SEQ_MOD)
        self._next_probe_at = now + rng.uniform(0, config.probe_interval)
        self._next_gossip_at = now + rng.uniform(0, config.gossip_interval)
        self._join_seeds: list[Address] = []
        self._join_at = float("inf")
        self._leaving = False
        self._header = encode_header(name, incarnation)
        self._datagrams: list[tuple[Address, bytes]] = []
        self._events: list[MemberEvent] = []
        self.stats = SwimStats()
        self._handlers: dict[type, Callable[[Message, Address, str, float], None]] = {
            Ping: self._on_ping,  # type: ignore[dict-item]
            IndirectPing: self._on_indirect_ping,  # type: ignore[dict-item]
            Ack: self._on_ack,  # type: ignore[dict-item]
            Nack: self._on_nack,  # type: ignore[dict-item]
            Alive: self._on_alive_msg,  # type: ignore[dict-item]
            Suspect: self._on_suspect_msg,  # type: ignore[dict-item]
            Dead: self._on_dead_msg,  # type: ignore[dict-item]
            Join: self._on_join,  # type: ignore[dict-item]
        }
        # memberlist setAlive: announce ourselves on the first datagrams we send.
        self._broadcast_self()

    # --- public interface -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard's local health multiplier minus one: 0 = healthy."""
        return self._awareness.score

    @property
    def leave_complete(self) -> bool:
        """After leave(): our "left" message has been sent its full retransmit count."""
        return self._leaving and self._name not in self._queue

    def join(self, seeds: Sequence[Address], now: float) -> None:
        """Contact `seeds` over UDP (repeated every probe_interval until anyone answers)."""
        self._join_seeds = [(s[0], s[1]) for s in seeds if (s[0], s[1]) != self._me.address]
        self._join_at = now
        self._retry_join(now)

    def receive(self, data: bytes, source: Address, now: float) -> None:
        """Handle one datagram. Raises MalformedPacket (and changes no membership state) on garbage."""
        try:
            packet = decode_packet(data, max_meta_size=self._config.max_meta_size)
        except MalformedPacket:
            self.stats.malformed += 1
            raise
        self.stats.packets_received += 1
        self.stats.bytes_received += len(data)
        for msg in packet.messages:
            self._handlers[type(msg)](msg, source, packet.sender, now)
        if self._config.correct_stale_senders and packet.sender != self._name:
            self._correct_stale_sender(packet.sender, packet.sender_incarnation, source, now)

    def tick(self, now: float) -> None:
        """Run every timer due at or before `now`."""
        probe = self._probe
        if probe is not None and not probe.indirect_sent and now >= probe.direct_deadline:
            self._send_indirect_probes(probe, now)
        if probe is not None and now >= probe.deadline:
            self._probe_failed(probe, now)
        if not self._leaving and now >= self._next_probe_at and self._probe is None:
            self._start_probe(now)
        if self._relays:
            for seq in [s for s, r in self._relays.items() if now >= r.deadline]:
                relay = self._relays.pop(seq)
                if relay.nack:
                    self.stats.nacks_sent += 1
                    self._send(relay.requester, [encode_message(Nack(relay.seq))])
        if self._suspicions:
            for name in [n for n, s in self._suspicions.items() if now >= s.deadline]:
                self._suspicion_expired(name, now)
        if now >= self._next_gossip_at:
            self._gossip(now)
            self._next_gossip_at = max(self._next_gossip_at + self._config.gossip_interval, now)
            if self._next_gossip_at <= now:
                self._next_gossip_at = now + self._config.gossip_interval
        if now >= self._join_at:
            self._retry_join(now)

    def next_deadline(self) -> float:
        """When `tick` must next run (may be <= now: run it at once)."""
        candidates = [self._next_gossip_at, self._join_at]
        if not self._leaving:
            candidates.append(self._next_probe_at)
        probe = self._probe
        if probe is not None:
            candidates.append(probe.deadline if probe.indirect_sent else probe.direct_deadline)
        if self._relays:
            candidates.append(min(r.deadline for r in self._relays.values()))
        if self._suspicions:
            candidates.append(min(s.deadline for s in self._suspicions.values()))
        return min(candidates)

    def set_meta(self, meta: bytes, now: float) -> None:
        """Publish new metadata (an alive message at incarnation + 1). Unchanged bytes: no-op.

        Raises ValueError when `meta` exceeds config.max_meta_size.
        """
        self._check_meta(meta, self._config)
        if bytes(meta) == self._me.meta:
            return
        self._me.meta = bytes(meta)
        if self._leaving:
            return
        self._bump_incarnation(self._me.incarnation + 1)

    def leave(self, now: float) -> None:
        """Leave gracefully: gossip "left" now and stop probing. Idempotent."""
        if self._leaving:
            return
        self._leaving = True
        self._probe = None
        self._join_at = float("inf")
        self._me.status = LEFT
        self._me.since = now
        self._queue.push(self._name, encode_message(Dead(self._me.incarnation, self._name, self._name)))
        self._gossip(now)

    def take_datagrams(self) -> list[tuple[Address, bytes]]:
        out, self._datagrams = self._datagrams, []
        return out

    def take_events(self) -> list[MemberEvent]:
        out, self._events = self._events, []
        return out

    def members(self) -> list[MemberView]:
        """Every member known, this one included, sorted by name."""
        return [self._members[n].view() for n in sorted(self._members)]

    def member(self, name: str) -> MemberView | None:
        m = self._members.get(name)
        return None if m is None else m.view()

    def local_state(self) -> bytes:
        """The push-pull payload: all members (name, address, incarnation, status, meta)."""
        return encode_state(
            [StateEntry(m.name, m.address, m.incarnation, m.status, m.meta) for m in self._members.values()]
        )

    def merge_remote_state(self, data: bytes, now: float, *, rebroadcast: bool = True) -> None:
        """Merge a peer's `local_state()` (memberlist mergeState). Raises MalformedPacket on garbage.

        `rebroadcast=False` only for bootstrapping a simulated cluster quietly.
        """
        entries = decode_state(data, max_meta_size=self._config.max_meta_size)
        for e in entries:
            if e.status == ALIVE:
                self._on_alive(Alive(e.incarnation, e.name, e.address, e.meta), now, rebroadcast)
            elif e.status == LEFT:
                self._on_dead(Dead(e.incarnation, e.name, e.name), now)
            else:  # remote "dead" is only suspected here: we may still reach it
                self._on_suspect(Suspect(e.incarnation, e.name, self._name), now)

    def push_pull_peer(self) -> Address | None:
        """A random alive member for the shell's periodic TCP push-pull (None if alone)."""
        picked = self._random_members(1, lambda m: m.status == ALIVE)
        return picked[0].address if picked else None

    # --- probing ------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % _SEQ_MOD
        return self._seq

    def _start_probe(self, now: float) -> None:
        interval = self._awareness.scale(self._config.probe_interval)
        self._next_probe_at = now + interval
        target = self._next_probe_target(now)
        if target is None:
            return
        timeout = self._config.probe_timeout
        if self._config.scale_probe_timeout:
            timeout = self._awareness.scale(timeout)
        seq = self._next_seq()
        self._probe = _Probe(seq, target.name, now + timeout, now + interval)
        self.stats.probes += 1
        parts = [encode_message(Ping(seq, target.name))]
        if target.status == SUSPECT:  # Lifeguard "buddy system": tell it, so it can refute
            parts.append(encode_message(Suspect(target.incarnation, target.name, self._name)))
        self._send(target.address, parts)

    def _next_probe_target(self, now: float) -> Member | None:
        """Shuffled round robin over probe-able members (memberlist probe())."""
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                m = self._members.get(self._probe_order[self._probe_index])
                self._probe_index += 1
                if m is not None and m.status in (ALIVE, SUSPECT):
                    return m
            self._reset_round(now)
        return None

    def _reset_round(self, now: float) -> None:
        """End of a round: forget long-dead members, reshuffle (memberlist resetNodes)."""
        limit = self._config.gossip_to_the_dead_time
        for name in self._probe_order:
            m = self._members.get(name)
            if m is not None and m.status in (DEAD, LEFT) and now - m.since > limit:
                del self._members[name]
                self._suspicions.pop(name, None)
        self._probe_order = [n for n in self._probe_order if n in self._members]
        self._rng.shuffle(self._probe_order)
        self._probe_index = 0

    def _send_indirect_probes(self, probe: _Probe, now: float) -> None:
        probe.indirect_sent = True
        target = self._members.get(probe.target)
        if target is None:
            return
        relays = self._random_members(
            self._config.indirect_checks, lambda m: m.status == ALIVE and m.name != probe.target
        )
        part = encode_message(IndirectPing(probe.seq, target.name, target.address, self._config.nacks))
        for relay in relays:
            self.stats.indirect_probes += 1
            self._send(relay.address, [part])
        probe.expected_nacks = len(relays) if self._config.nacks else 0

    def _probe_failed(self, probe: _Probe, now: float) -> None:
        self._probe = None
        if probe.expected_nacks > 0:
            self._awareness.apply(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._awareness.apply(1)
        target = self._members.get(probe.target)
        if target is not None and target.status in (ALIVE, SUSPECT):
            self._on_suspect(Suspect(target.incarnation, target.name, self._name), now)

    # --- message handlers -----------------------------------------------------------------

    def _on_ping(self, msg: Ping, source: Address, sender: str, now: float) -> None:
        if msg.target and msg.target != self._name:
            return  # meant for a member that used to live at this address
        self._send(source, [encode_message(Ack(msg.seq))])

    def _on_indirect_ping(self, msg: IndirectPing, source: Address, sender: str, now: float) -> None:
        seq = self._next_seq()
        self._relays[seq] = _Relay(source, msg.seq, now + self._config.probe_timeout, msg.nack)
        self._send(msg.target_address, [encode_message(Ping(seq, msg.target))])

    def _on_ack(self, msg: Ack, source: Address, sender: str, now: float) -> None:
        probe = self._probe
        if probe is not None and probe.seq == msg.seq:
            self._probe = None
            self._awareness.apply(-1)
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self._send(relay.requester, [encode_message(Ack(relay.seq))])

    def _on_nack(self, msg: Nack, source: Address, sender: str, now: float) -> None:
        probe = self._probe
        if probe is not None and probe.seq == msg.seq:
            probe.nacks += 1

    def _on_alive_msg(self, msg: Alive, source: Address, sender: str, now: float) -> None:
        self._on_alive(msg, now, True)

    def _on_suspect_msg(self, msg: Suspect, source: Address, sender: str, now: float) -> None:
        self._answer_stale_accusation(msg.name, msg.incarnation, source, sender, now)
        self._on_suspect(msg, now)

    def _on_dead_msg(self, msg: Dead, source: Address, sender: str, now: float) -> None:
        self._answer_stale_accusation(msg.name, msg.incarnation, source, sender, now)
        self._on_dead(msg, now)

    def _on_join(self, msg: Join, source: Address, sender: str, now: float) -> None:
        parts = [self._alive_part()]
        joiner = self._members.get(sender)
        if joiner is not None and joiner.status != ALIVE:
            parts.append(self._verdict_part(joiner))
        wanted = self._config.join_reply_members if msg.members else 0
        others = self._random_members(wanted, lambda m: m.status == ALIVE and m.name != sender)
        room = self._config.packet_size - FRAME_OVERHEAD - len(self._header) - sum(len(p) for p in parts)
        for m in others:
            part = encode_message(Alive(m.incarnation, m.name, m.address, m.meta))
            if len(part) <= room:
                parts.append(part)
                room -= len(part)
        self._send(source, parts, piggyback=False)

    # --- state transitions (memberlist aliveNode / suspectNode / deadNode) ----------------------

    def _on_alive(self, msg: Alive, now: float, rebroadcast: bool) -> None:
        known = self._members.get(msg.name)
        if msg.name == self._name:
            if self._leaving or msg.incarnation < self._me.incarnation:
                return
            if (
                msg.incarnation == self._me.incarnation
                and msg.meta == self._me.meta
                and msg.address == self._me.address
            ):
                return  # our own news coming back
            self._refute(msg.incarnation)  # someone holds a different "us" (e.g. a past life)
            return
        if known is None:
            member = Member(msg.name, msg.address, msg.incarnation, ALIVE, msg.meta, now)
            self._members[msg.name] = member
            # Random insertion keeps the detection bound low (memberlist aliveNode).
            self._probe_order.append(msg.name)
            j = self._rng.randrange(len(self._probe_order))
            self._probe_order[j], self._probe_order[-1] = self._probe_order[-1], self._probe_order[j]
            if rebroadcast:
                self._queue.push(msg.name, encode_message(msg))
            self._emit("join", member, now)
            return
        reclaim = False
        if msg.address != known.address:
            limit = self._config.dead_node_reclaim_time
            if known.status in (DEAD, LEFT) and limit is not None and now - known.since >= limit:
                reclaim = True
            else:
                return  # conflicting address for a member that is still around
        if msg.incarnation <= known.incarnation and not reclaim:
            return
        self._suspicions.pop(msg.name, None)
        if rebroadcast:
            self._queue.push(msg.name, encode_message(msg))
        old_status, old_meta = known.status, known.meta
        known.incarnation = msg.incarnation
        known.meta = msg.meta
        known.address = msg.address
        if old_status != ALIVE:
            known.status = ALIVE
            known.since = now
        if old_status in (DEAD, LEFT):
            self._emit("join", known, now)
            return
        if old_status == SUSPECT:
            self._emit("alive", known, now)
        if old_meta != msg.meta:
            self._emit("meta", known, now)

    def _on_suspect(self, msg: Suspect, now: float) -> None:
        known = self._members.get(msg.name)
        if known is None or msg.incarnation < known.incarnation:
            return
        timer = self._suspicions.get(msg.name)
        if timer is not None:
            if timer.confirm(msg.sender):
                self._queue.push(msg.name, encode_message(msg))
            return
        if known.status != ALIVE:
            return
        if known is self._me:
            if not self._leaving:
                self._refute(msg.incarnation)
            return
        self._queue.push(msg.name, encode_message(msg))
        known.incarnation = msg.incarnation
        known.status = SUSPECT
        known.since = now
        self.stats.suspicions += 1
        n = len(self._members)
        cfg = self._config
        self._suspicions[msg.name] = Suspicion(
            msg.sender, msg.incarnation, cfg.suspicion_k(n), cfg.suspicion_min(n), cfg.suspicion_max(n), now
        )
        self._emit("suspect", known, now)

    def _suspicion_expired(self, name: str, now: float) -> None:
        timer = self._suspicions.pop(name)
        known = self._members.get(name)
        if known is not None and known.status == SUSPECT and known.since == timer.start:
            self._on_dead(Dead(known.incarnation, name, self._name), now)

    def _on_dead(self, msg: Dead, now: float) -> None:
        known = self._members.get(msg.name)
        if known is None or msg.incarnation < known.incarnation:
            return
        if known is self._me:
            if not self._leaving:
                self._refute(msg.incarnation)
            return
        self._suspicions.pop(msg.name, None)
        if known.status in (DEAD, LEFT):
            return
        self._queue.push(msg.name, encode_message(msg))
        known.incarnation = msg.incarnation
        known.status = LEFT if msg.sender == msg.name else DEAD
        known.since = now
        self._emit(known.status, known, now)

    def _refute(self, accused_incarnation: int) -> None:
        """Override an accusation about ourselves (memberlist refute)."""
        self.stats.refutations += 1
        self._awareness.apply(1)
        self._bump_incarnation(max(self._me.incarnation, accused_incarnation) + 1)

    def _bump_incarnation(self, incarnation: int) -> None:
        self._me.incarnation = incarnation
        self._header = encode_header(self._name, incarnation)
        self._broadcast_self()

    def _broadcast_self(self) -> None:
        self._queue.push(self._name, self._alive_part())

    def _alive_part(self) -> bytes:
        me = self._me
        return encode_message(Alive(me.incarnation, me.name, me.address, me.meta))

    def _verdict_part(self, m: Member) -> bytes:
        if m.status == SUSPECT:
            return encode_message(Suspect(m.incarnation, m.name, self._name))
        sender = m.name if m.status == LEFT else self._name
        return encode_message(Dead(m.incarnation, m.name, sender))

    def _correct_stale_sender(self, sender: str, incarnation: int, source: Address, now: float) -> None:
        """Compare the sender's header with our record of it, and repair either side.

        - We hold it suspect/dead/left at its incarnation or newer: tell it, so it refutes.
        - We do not know it, or its incarnation is newer than ours: we missed its join,
          refutation or metadata change; ask for its alive message (JOIN without members).
        """
        m = self._members.get(sender)
        if m is not None and m.incarnation >= incarnation:
            if m.status == ALIVE:
                return
            part = self._verdict_part(m)
        else:
            part = encode_message(Join(self._next_seq(), members=False))
        self._repair(sender, source, part, now)

    def _answer_stale_accusation(self, name: str, incarnation: int, source: Address, sender: str, now: float) -> None:
        """An accusation older than what we know: the member refuted it, and the sender
        missed that. Send the sender the member's current alive message (memberlist just
        ignores the stale accusation, leaving the sender to time out into a false death)."""
        m = self._members.get(name)
        if (
            m is None
            or m.status != ALIVE
            or incarnation >= m.incarnation
            or not self._config.correct_stale_senders
            or sender == self._name
            or self._leaving
        ):
            return
        part = encode_message(Alive(m.incarnation, m.name, m.address, m.meta))
        self._repair(f"{sender}\0{name}", source, part, now)

    def _repair(self, key: str, source: Address, part: bytes, now: float) -> None:
        """Send one repair message, at most once per key per probe_interval."""
        last = self._corrected.get(key)
        if last is not None and now - last < self._config.probe_interval:
            return
        if len(self._corrected) > 4 * len(self._members) + 64:
            self._corrected.clear()
        self._corrected[key] = now
        self._send(source, [part])

    # --- sending ----------------------------------------------------------------------------

    def _gossip(self, now: float) -> None:
        """Send pending news to gossip_nodes random members (memberlist gossip()).

        With correct_stale_senders, a round with no news still tells the *dead* and
        *left* members picked our verdict: if they are alive after all (a healed
        partition, or a member restarted after a graceful leave that has no seed to
        join through), they refute it, or answer with their newer alive message.
        memberlist gossips to recently dead members but never to left ones.
        """
        quiet = not self._queue
        stale_senders = self._config.correct_stale_senders
        if quiet and not stale_senders:
            return
        dead_window = self._config.gossip_to_the_dead_time
        gone = (DEAD, LEFT) if stale_senders else (DEAD,)
        targets = self._random_members(
            self._config.gossip_nodes,
            lambda m: m.status in (ALIVE, SUSPECT) or (m.status in gone and now - m.since <= dead_window),
        )
        for target in targets:
            if not quiet:
                self._send(target.address, [])
            elif target.status in gone:
                self._emit_datagram(target.address, self._header, [self._verdict_part(target)])

    def _retry_join(self, now: float) -> None:
        if self._leaving or not self._join_seeds or any(
            m.status == ALIVE and m is not self._me for m in self._members.values()
        ):
            self._join_at = float("inf")
            return
        self._join_at = now + self._config.probe_interval
        for seed in self._join_seeds:
            self._send(seed, [encode_message(Join(self._next_seq())), self._alive_part()], piggyback=False)

    def _send(self, address: Address, parts: list[bytes], *, piggyback: bool = True) -> None:
        """Pack `parts` into as few datagrams as fit the packet size; fill the last with news."""
        limit = self._config.packet_size
        header = self._header
        current: list[bytes] = []
        empty = FRAME_OVERHEAD + len(header)
        size = empty
        for part in parts:
            if current and size + len(part) > limit:
                self._emit_datagram(address, header, current)
                current, size = [], empty
            current.append(part)
            size += len(part)
        if piggyback:
            news = self._queue.take(limit - size, self._config.retransmit_limit(len(self._members)))
            current.extend(news)
        if current:
            self._emit_datagram(address, header, current)

    def _emit_datagram(self, address: Address, header: bytes, parts: list[bytes]) -> None:
        data = frame(header, parts)
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(data)
        self._datagrams.append((address, data))

    def _random_members(self, k: int, accept: Callable[[Member], bool]) -> list[Member]:
        """Up to k distinct random members (not us) passing `accept` (memberlist kRandomNodes)."""
        order = self._probe_order
        n = len(order)
        picked: list[Member] = []
        if k <= 0 or n == 0:
            return picked
        seen: set[str] = set()
        for _ in range(3 * n):
            name = order[self._rng.randrange(n)]
            if name in seen:
                continue
            seen.add(name)
            m = self._members.get(name)
            if m is not None and accept(m):
                picked.append(m)
                if len(picked) == k:
                    break
        return picked

    def _emit(self, kind: EventKind, member: Member, now: float) -> None:
        self._events.append(MemberEvent(kind, member.view(), now))

    @staticmethod
    def _check_meta(meta: bytes, config: SwimConfig) -> None:
        if len(meta) > config.max_meta_size:
            raise ValueError(f"metadata of {len(meta)} bytes exceeds max_meta_size={config.max_meta_size}")

