"""SWIM configuration: every knob with its default, its formula and its source.

Theory of operation
-------------------
A `SwimConfig` is plain, frozen data. The timing formulas that turn it into
concrete timeouts for a cluster of N members live here too, as methods, so the
core, the simulation's detection bound and the docs all use one definition:

    retransmit limit   = retransmit_mult · ⌈log10(N + 1)⌉               (memberlist util.go)
    suspicion min      = suspicion_mult · max(1, log10(max(1, N))) · probe_interval
    suspicion max      = suspicion_max_timeout_mult · suspicion min
    suspicion timeout  = max(min, max − (log(c + 1) / log(k + 1)) · (max − min))
                         after c of k wanted independent confirmations  (Lifeguard §IV-B,
                         memberlist suspicion.go); k = 0 when N − 2 < k, and then the
                         timeout is simply min
    scaled timeout     = timeout · (health_score + 1)                    (Lifeguard §IV-A,
                         memberlist awareness.go); health_score ∈ [0, awareness_max_multiplier − 1]

Profiles are built from one another, like memberlist's `DefaultLANConfig` /
`DefaultLocalConfig`: `memberlist_lan()` reproduces memberlist's LAN defaults
(for the comparison benchmark), `lan()` is ours (the production default) and
`local()` is for loopback tests. `without_lifeguard()` turns the three Lifeguard
mechanisms off on any profile.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from coordinator.swim_messages import MAX_META_LIMIT, worst_case_sizes


class InvalidSwimConfig(ValueError):
    """A configuration that would make the protocol misbehave, or an unknown key."""


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """SWIM + Lifeguard parameters. Times are seconds; N is the member count (self included)."""

    # Failure detection period: one member is probed per interval, in shuffled
    # round-robin order (SWIM §4.3). Scaled by the health score (Lifeguard LHA-Probe).
    probe_interval: float = 1.0
    # How long to wait for a direct ack before asking `indirect_checks` members
    # to probe on our behalf. Must be < probe_interval (the rest of the interval
    # is the window for indirect acks). Typically the 99th percentile RTT.
    probe_timeout: float = 0.5
    # Lifeguard scales the direct probe timeout by the health score too;
    # memberlist deliberately does not (it only scales the interval).
    scale_probe_timeout: bool = True
    # Members asked to relay a failed probe (SWIM's k).
    indirect_checks: int = 3
    # Relays answer "nack" when they got no ack in probe_timeout, so a prober
    # that hears neither ack nor nack knows *it* is the one with trouble (Lifeguard).
    nacks: bool = True
    # Each broadcast is piggybacked at most retransmit_mult · ⌈log10(N+1)⌉ times.
    retransmit_mult: int = 4
    # Suspicion lasts suspicion_mult · max(1, log10(N)) · probe_interval at least ...
    suspicion_mult: int = 4
    # ... and starts at suspicion_max_timeout_mult times that, shrinking towards the
    # minimum as independent confirmations arrive (Lifeguard LHA-Suspicion).
    suspicion_max_timeout_mult: int = 6
    # Independent confirmations (k) that drive the timeout down to the minimum.
    # memberlist uses suspicion_mult − 2.
    suspicion_confirmations: int = 2
    # Every gossip_interval, send pending broadcasts to gossip_nodes random members.
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    # Keep gossiping to dead/left members this long (lets a wrongly-declared member
    # hear it and refute), then forget them at the next probe-round boundary.
    gossip_to_the_dead_time: float = 30.0
    # Upper bound of the health multiplier: timeouts stretch up to this many times.
    awareness_max_multiplier: int = 8
    # A dead/left member may come back at a new address after this long
    # (None = never, memberlist's DeadNodeReclaimTime = 0).
    dead_node_reclaim_time: float | None = 0.0
    # Tell a sender we hold as suspect/dead/left (at its incarnation or newer) so
    # it refutes at once - heals partitions within gossip_to_the_dead_time.
    correct_stale_senders: bool = True
    # How many other members' alive messages a JOIN reply carries, packet permitting.
    join_reply_members: int = 8
    # Hard bound on every datagram we produce (a typical Ethernet MTU minus headers).
    packet_size: int = 1400
    # Hard cap on a member's metadata bytes (memberlist: 512).
    max_meta_size: int = 1024
    # Broadcasts queued beyond this are dropped, most-transmitted first.
    max_broadcast_queue: int = 4096
    # For the shell: full TCP state exchange with a random member every
    # push_pull_interval · push_pull_scale(N) (memberlist pushPullScale), and its timeout.
    push_pull_interval: float = 30.0
    tcp_timeout: float = 10.0

    # --- formulas ------------------------------------------------------------------------

    def retransmit_limit(self, n: int) -> int:
        """How many times one broadcast is piggybacked: retransmit_mult · ⌈log10(N+1)⌉."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def suspicion_min(self, n: int) -> float:
        """suspicion_mult · max(1, log10(max(1, N))) · probe_interval."""
        return self.suspicion_mult * max(1.0, math.log10(max(1, n))) * self.probe_interval

    def suspicion_max(self, n: int) -> float:
        return self.suspicion_max_timeout_mult * self.suspicion_min(n)

    def suspicion_k(self, n: int) -> int:
        """Confirmations wanted; 0 when the cluster is too small to supply them."""
        k = self.suspicion_confirmations
        return 0 if n - 2 < k else k

    @staticmethod
    def suspicion_timeout(confirmations: int, k: int, lo: float, hi: float) -> float:
        """Total suspicion timeout after `confirmations` of `k` (memberlist remainingSuspicionTime)."""
        if k < 1:
            return lo
        frac = math.log(confirmations + 1) / math.log(k + 1)
        raw = math.floor(1000.0 * (hi - frac * (hi - lo))) / 1000.0
        return max(lo, raw)

    def push_pull_scale(self, n: int) -> float:
        """Multiplier for push_pull_interval above 32 members (memberlist pushPullScale)."""
        if n <= 32:
            return 1.0
        return float(math.ceil(math.log2(n) - math.log2(32)) + 1)

    def meta_update_interval(self, n: int, meta_size: int, budget_bytes_per_s: float = 10_000.0) -> float:
        """Shortest average interval between one member's metadata changes that keeps the
        gossip they cause within `budget_bytes_per_s` per member.

        Each change is an alive message (meta_size + ~40 bytes) that every member sends
        retransmit_limit(N) times, so the cluster-wide change rate U costs each member
        U · retransmit_limit(N) · size bytes/s; U = N / interval.
        """
        return n * self.retransmit_limit(n) * (meta_size + 40) / budget_bytes_per_s

    def detection_bound(self, n: int) -> float:
        """A generous upper bound on crash → every live member knows it is dead.

        Round-robin order guarantees a crashed member is probed by each live member
        within N−1 intervals; we bound its *first* probe by one full interval (N−1
        live probers make that overwhelmingly likely), add the failed probe's
        interval, the maximum suspicion, and dissemination of the dead message
        (retransmit limit rounds of gossip).
        """
        return (
            2 * self.probe_interval
            + self.suspicion_max(n)
            + self.retransmit_limit(n) * self.gossip_interval
        )

    # --- checks ---------------------------------------------------------------------------

    def validate(self) -> SwimConfig:
        """Return self, or raise InvalidSwimConfig naming the first nonsense found."""
        checks: list[tuple[bool, str]] = [
            (self.probe_interval > 0, "probe_interval must be > 0"),
            (0 < self.probe_timeout < self.probe_interval, "need 0 < probe_timeout < probe_interval"),
            (self.indirect_checks >= 0, "indirect_checks must be >= 0"),
            (self.retransmit_mult >= 1, "retransmit_mult must be >= 1"),
            (self.suspicion_mult >= 1, "suspicion_mult must be >= 1"),
            (self.suspicion_max_timeout_mult >= 1, "suspicion_max_timeout_mult must be >= 1"),
            (self.suspicion_confirmations >= 0, "suspicion_confirmations must be >= 0"),
            (self.gossip_interval > 0, "gossip_interval must be > 0"),
            (self.gossip_nodes >= 1, "gossip_nodes must be >= 1"),
            (self.gossip_to_the_dead_time >= 0, "gossip_to_the_dead_time must be >= 0"),
            (self.awareness_max_multiplier >= 1, "awareness_max_multiplier must be >= 1"),
            (
                self.dead_node_reclaim_time is None or self.dead_node_reclaim_time >= 0,
                "dead_node_reclaim_time must be None or >= 0",
            ),
            (self.join_reply_members >= 0, "join_reply_members must be >= 0"),
            (0 <= self.max_meta_size <= MAX_META_LIMIT, f"max_meta_size must be in 0..{MAX_META_LIMIT}"),
            (self.max_broadcast_queue >= 16, "max_broadcast_queue must be >= 16"),
            (self.push_pull_interval > 0, "push_pull_interval must be > 0"),
            (self.tcp_timeout > 0, "tcp_timeout must be > 0"),
        ]
        for ok, why in checks:
            if not ok:
                raise InvalidSwimConfig(why)
        header, biggest = worst_case_sizes(self.max_meta_size)
        if header + biggest > self.packet_size or self.packet_size > 65_507:
            raise InvalidSwimConfig(
                f"packet_size {self.packet_size} must be <= 65507 and hold the largest message "
                f"({header} header + {biggest} bytes with {self.max_meta_size}-byte metadata)"
            )
        return self

    def replace(self, **changes: Any) -> SwimConfig:
        """A validated copy with some fields changed; unknown keys are an error."""
        return with_overrides(self, changes)

    def without_lifeguard(self) -> SwimConfig:
        """The same profile with Lifeguard's three mechanisms off (classic SWIM + suspicion):
        no health awareness, no nacks, fixed suspicion timeout (= the minimum)."""
        return self.replace(
            awareness_max_multiplier=1, nacks=False, suspicion_max_timeout_mult=1, suspicion_confirmations=0
        )


def with_overrides(base: SwimConfig, overrides: Mapping[str, Any]) -> SwimConfig:
    """Apply a mapping of overrides (e.g. from the agent's TOML), rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(SwimConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidSwimConfig(f"unknown SWIM config keys: {', '.join(unknown)}")
    return dataclasses.replace(base, **overrides).validate()


def memberlist_lan() -> SwimConfig:
    """hashicorp/memberlist DefaultLANConfig, field for field (where the field exists here).

    Not reproduced: the TCP fallback ping (a shell concern) and memberlist's
    refusal to take back a dead member at a new address (dead_node_reclaim_time=None
    reproduces that). Our two extensions (stale-sender correction, JOIN replies
    with members) are off.
    """
    return SwimConfig(
        probe_interval=1.0,
        probe_timeout=0.5,
        scale_probe_timeout=False,
        indirect_checks=3,
        nacks=True,
        retransmit_mult=4,
        suspicion_mult=4,
        suspicion_max_timeout_mult=6,
        suspicion_confirmations=4 - 2,
        gossip_interval=0.2,
        gossip_nodes=3,
        gossip_to_the_dead_time=30.0,
        awareness_max_multiplier=8,
        dead_node_reclaim_time=None,
        correct_stale_senders=False,
        join_reply_members=0,
        packet_size=1400,
        max_meta_size=512,
        push_pull_interval=30.0,
        tcp_timeout=10.0,
    ).validate()


def lan() -> SwimConfig:
    """Our production default for a data-centre LAN.

    Differences from memberlist_lan, and why:
    - suspicion_mult 3 (not 4), max mult 4 (not 6), k = 3: the *minimum* is lower,
      but reaching it needs three independent confirmations instead of two, so a
      single confused prober cannot make it; a lone accusation still waits
      4 · 3 · log10(N) s (36 s at N = 1000).
    - gossip every 0.1 s to 4 members: a broadcast reaches 1,000 members in
      ~1 s instead of ~2 s, which speeds both dissemination of "dead" and the
      arrival of confirmations. Bytes are spent only when there is news.
    - the probe timeout is scaled by the health score (Lifeguard as published).
    - 1,024-byte metadata for the compact GPU state, stale-sender correction on.
    """
    return dataclasses.replace(
        memberlist_lan(),
        scale_probe_timeout=True,
        suspicion_mult=3,
        suspicion_max_timeout_mult=4,
        suspicion_confirmations=3,
        gossip_interval=0.1,
        gossip_nodes=4,
        dead_node_reclaim_time=0.0,
        correct_stale_senders=True,
        join_reply_members=8,
        max_meta_size=1024,
    ).validate()


def local() -> SwimConfig:
    """Loopback / tests, after memberlist's DefaultLocalConfig: shorter timeouts."""
    return dataclasses.replace(
        lan(),
        probe_timeout=0.2,
        indirect_checks=1,
        retransmit_mult=2,
        gossip_interval=0.1,
        gossip_to_the_dead_time=15.0,
        push_pull_interval=15.0,
        tcp_timeout=1.0,
    ).validate()


PROFILES = {"lan": lan, "local": local, "memberlist": memberlist_lan}


def profile(name: str) -> SwimConfig:
    """A named profile: "lan", "local" or "memberlist"."""
    try:
        return PROFILES[name]()
    except KeyError:
        raise InvalidSwimConfig(f"unknown SWIM profile {name!r}; known: {', '.join(PROFILES)}") from None
