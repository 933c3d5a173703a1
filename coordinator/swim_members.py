"""What SwimCore reports: member views, membership events and counters.

Theory of operation
-------------------
`MemberView` and `MemberEvent` are immutable snapshots handed to the shell; the
core's own mutable per-member record is `Member`, which only swim.py touches.
`SwimStats` are plain counters for the shell's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from coordinator.swim_messages import Address, Status

EventKind = Literal["join", "alive", "suspect", "dead", "left", "meta"]


@dataclass(frozen=True, slots=True)
class MemberView:
    name: str
    address: Address
    incarnation: int
    status: Status
    meta: bytes
    # When the member entered its current status (this core's clock).
    since: float


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """join: a new or returning member; alive: a suspect cleared; meta: its metadata changed."""

    kind: EventKind
    member: MemberView
    at: float


@dataclass(slots=True)
class SwimStats:
    probes: int = 0
    indirect_probes: int = 0
    suspicions: int = 0
    refutations: int = 0
    nacks_sent: int = 0
    packets_sent: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    malformed: int = 0


class Member:
    __slots__ = ("name", "address", "incarnation", "status", "meta", "since")

    def __init__(self, name: str, address: Address, incarnation: int, status: Status, meta: bytes, since: float):
        self.name = name
        self.address = address
        self.incarnation = incarnation
        self.status: Status = status
        self.meta = meta
        self.since = since

    def view(self) -> MemberView:
        return MemberView(self.name, self.address, self.incarnation, self.status, self.meta, self.since)
