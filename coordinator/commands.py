"""The lease table's commands: the only way its state ever changes.

Every command carries `at`, the wall-clock time stamped by the proposer (the
leader, or the single agent). Applying a command never reads a clock, so the
same log gives the same table on every server and on every replay. A command
that no longer fits the state when it is applied (a GPU taken meanwhile, an id
already released) is rejected deterministically: every replica rejects it too.

Commands travel as plain dicts (`to_wire` / `command_from_wire`); in a log
entry they are msgpack'd (`encode_command` / `decode_command`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

import msgpack

from coordinator.errors import InvalidRequest
from coordinator.model import Allocation, AllocationRequest, Wire
from coordinator.queues import QueuePolicy


@dataclass(frozen=True, slots=True)
class Allocate:
    """Grant `allocation`; if its request id waits in the queue, it leaves the queue.

    For a gang (coordinator/gang_placement.py) `allocation` is its first node's lease and
    `gang_rest` the other nodes' in rank order: one entry, so the table grants
    all of them or none.
    """

    at: float
    allocation: Allocation
    gang_rest: tuple[Allocation, ...] = ()

    @property
    def members(self) -> tuple[Allocation, ...]:
        """Every lease this command grants: one, or a gang's, in rank order."""
        return (self.allocation, *self.gang_rest)

    @property
    def gpu_total(self) -> int:
        return sum(len(a.gpus) for a in self.members)

    def to_wire(self) -> Wire:
        if self.allocation.share_group is not None:
            # Its own op for the same reason as a gang's: a server that predates shares
            # would grant a share as a whole GPU and refuse the next share of it.
            return {"op": "allocate_share", "at": self.at, "allocation": self.allocation.to_wire()}
        if not self.gang_rest:
            return {"op": "allocate", "at": self.at, "allocation": self.allocation.to_wire()}
        # Its own op, not "allocate" with more fields: a server that predates gangs
        # would grant the first member and ignore the rest (its replica diverging);
        # an unknown op stops it at this entry instead, as any newer log does.
        return {
            "op": "allocate_gang",
            "at": self.at,
            "allocation": self.allocation.to_wire(),
            "gang_rest": [a.to_wire() for a in self.gang_rest],
        }


@dataclass(frozen=True, slots=True)
class Enqueue:
    """Put `request` in the wait queue until `deadline` (None = waits forever)."""

    at: float
    request: AllocationRequest
    deadline: float | None

    def to_wire(self) -> Wire:
        return {
            "op": "enqueue",
            "at": self.at,
            "request": self.request.to_wire(),
            "deadline": self.deadline,
        }


@dataclass(frozen=True, slots=True)
class Release:
    """End leases. reason: "released" (by the caller), "expired" (TTL), or an operator's word."""

    at: float
    allocation_ids: tuple[str, ...]
    reason: str = "released"

    def to_wire(self) -> Wire:
        return {
            "op": "release",
            "at": self.at,
            "allocation_ids": list(self.allocation_ids),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Renew:
    """Move a lease's expiry to `expires_at` (None = never expires)."""

    at: float
    allocation_id: str
    expires_at: float | None

    def to_wire(self) -> Wire:
        return {
            "op": "renew",
            "at": self.at,
            "allocation_id": self.allocation_id,
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True, slots=True)
class Cancel:
    """Withdraw queued requests. reason: "cancelled" (by the caller) or "queue_timeout"."""

    at: float
    request_ids: tuple[str, ...]
    reason: str = "cancelled"

    def to_wire(self) -> Wire:
        return {
            "op": "cancel",
            "at": self.at,
            "request_ids": list(self.request_ids),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class SetDrain:
    """An operator takes a GPU out of scheduling (drained) or returns it.

    Draining stops new allocations on the GPU; leases already on it run on.
    """

    at: float
    node: str
    index: int
    drained: bool
    reason: str = ""

    def to_wire(self) -> Wire:
        return {
            "op": "set_drain",
            "at": self.at,
            "node": self.node,
            "index": self.index,
            "drained": self.drained,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class ReportGpuHealth:
    """A GPU's health changed (decided by its node's health policy)."""

    at: float
    node: str
    index: int
    state: str
    reasons: tuple[str, ...] = ()

    def to_wire(self) -> Wire:
        return {
            "op": "report_gpu_health",
            "at": self.at,
            "node": self.node,
            "index": self.index,
            "state": self.state,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True, slots=True)
class MarkHostLost:
    """Gossip has not seen `node` running for the leader's grace period: its leases are lost.

    Every live allocation on `node` ends with status "lost" (reason "host_lost")
    and its GPUs are freed, so they are schedulable again once the host returns.
    Proposed by the leader's host-loss watcher (agent/host_loss.py); the decision
    that the host is gone is the leader's, taken before proposing, so applying
    needs nothing but the table and `at`.
    """

    at: float
    node: str
    # Only allocations made at or before this time end: the host was seen gone
    # from then on, so one placed later (the host came back just as the decision
    # was being committed) is a new tenant's, not a lost one. None: all of them.
    allocated_before: float | None = None

    def to_wire(self) -> Wire:
        wire: Wire = {"op": "mark_host_lost", "at": self.at, "node": self.node}
        if self.allocated_before is not None:
            wire["allocated_before"] = self.allocated_before
        return wire


@dataclass(frozen=True, slots=True)
class OutboxDelivered:
    """Every outbox row caused by entries at or below `through` was delivered or given up.

    Every server derives the same outbox rows from the log, but only the leader
    delivers them. The leader proposes its delivery progress, so every server
    drops those rows (a follower's outbox would otherwise grow forever) and a
    new leader does not deliver them again.
    """

    at: float
    through: int

    def to_wire(self) -> Wire:
        return {"op": "outbox_delivered", "at": self.at, "through": self.through}


# The most rows one RecordUsage carries: a log entry stays small (about 60 bytes
# a row) however many services run; the leader splits a longer report.
MAX_USAGE_ROWS = 512


@dataclass(frozen=True, slots=True)
class RecordUsage:
    """Utilized GPU-seconds the leader measured since its previous record, per (queue, service).

    Utilization is telemetry, which is not replicated: the leader integrates it
    (coordinator/usage_meter.py) and proposes the sums, coalesced, about once a
    minute. Each row is (queue, service, gpu_seconds), credited to the hour of
    `at`. `retention_s` is the leader's `[accounting] retention_days`: carried
    here so every replica prunes usage by the same rule whatever its own file says.
    """

    at: float
    rows: tuple[tuple[str, str, float], ...]
    retention_s: float

    def to_wire(self) -> Wire:
        return {
            "op": "record_usage",
            "at": self.at,
            "rows": [list(row) for row in self.rows],
            "retention_s": self.retention_s,
        }


@dataclass(frozen=True, slots=True)
class SetQueuePolicy:
    """Make `policy` the queues and sharing rules every replica schedules by.

    Proposed by the leader when its configuration (loaded at start, reloaded on
    SIGHUP) differs from the table's, so a failover never changes the rules.
    """

    at: float
    policy: QueuePolicy

    def to_wire(self) -> Wire:
        return {"op": "set_queue_policy", "at": self.at, "policy": self.policy.to_wire()}


@dataclass(frozen=True, slots=True)
class Preempt:
    """Start the grace period of leases the scheduler takes back.

    Each victim is (allocation_id, deadline): its holder hears `lease_preempting`
    and may release early; at the deadline the scheduler ends it (Release with
    reason "preempted", or "idle" for idle reclaim). `request_id` is the queued
    request the GPUs are taken for (None for idle reclaim); it claims `node`, so
    the GPUs freed there go to it and not to backfill. reason: "reclaim" (a
    guarantee or fair share taken back), "priority" (by the priority gap) or "idle".
    """

    at: float
    victims: tuple[tuple[str, float], ...]
    reason: str
    request_id: str | None = None
    node: str | None = None

    def to_wire(self) -> Wire:
        return {
            "op": "preempt",
            "at": self.at,
            "victims": [list(v) for v in self.victims],
            "reason": self.reason,
            "request_id": self.request_id,
            "node": self.node,
        }


Command = Union[
    Allocate,
    Enqueue,
    Release,
    Renew,
    Cancel,
    SetDrain,
    ReportGpuHealth,
    MarkHostLost,
    OutboxDelivered,
    RecordUsage,
    SetQueuePolicy,
    Preempt,
]


def command_from_wire(w: Mapping[str, Any]) -> Command:
    """Decode a command written by `to_wire`.

    Raises InvalidRequest for an unknown op (a log written by a newer version).
    """
    op = w.get("op")
    at = float(w["at"])
    if op == "allocate":
        return Allocate(at, Allocation.from_wire(w["allocation"]))
    if op == "allocate_share":
        share = Allocation.from_wire(w["allocation"])
        if share.share_group is None:
            raise InvalidRequest("allocate_share needs the share's sharing group", code="invalid_command")
        return Allocate(at, share)
    if op == "allocate_gang":
        rest = tuple(Allocation.from_wire(a) for a in w["gang_rest"])
        if not rest:
            raise InvalidRequest("allocate_gang needs the gang's other members", code="invalid_command")
        return Allocate(at, Allocation.from_wire(w["allocation"]), rest)
    if op == "enqueue":
        deadline = w.get("deadline")
        return Enqueue(
            at,
            AllocationRequest.from_wire(w["request"]),
            None if deadline is None else float(deadline),
        )
    if op == "release":
        return Release(at, tuple(str(i) for i in w["allocation_ids"]), str(w["reason"]))
    if op == "renew":
        expires = w.get("expires_at")
        return Renew(at, str(w["allocation_id"]), None if expires is None else float(expires))
    if op == "cancel":
        return Cancel(at, tuple(str(i) for i in w["request_ids"]), str(w["reason"]))
    if op == "set_drain":
        return SetDrain(at, str(w["node"]), int(w["index"]), bool(w["drained"]), str(w["reason"]))
    if op == "report_gpu_health":
        return ReportGpuHealth(
            at, str(w["node"]), int(w["index"]), str(w["state"]), tuple(str(r) for r in w["reasons"])
        )
    if op == "mark_host_lost":
        node = w["node"]
        # An empty or non-string node could never match an allocation's node; a
        # log entry carrying one is corrupt or forged, not a command to no-op on.
        if not isinstance(node, str) or not node:
            raise InvalidRequest(f"mark_host_lost needs a node name, got {node!r}", code="invalid_command")
        before = w.get("allocated_before")
        return MarkHostLost(at, node, None if before is None else float(before))
    if op == "outbox_delivered":
        return OutboxDelivered(at, int(w["through"]))
    if op == "record_usage":
        rows = tuple((str(q), str(svc), float(secs)) for q, svc, secs in w["rows"])
        return RecordUsage(at, rows, float(w["retention_s"]))
    if op == "set_queue_policy":
        try:
            return SetQueuePolicy(at, QueuePolicy.from_wire(w["policy"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequest(f"set_queue_policy carries an invalid policy: {exc}", code="invalid_command") from exc
    if op == "preempt":
        victims = tuple((str(i), float(d)) for i, d in w["victims"])
        request_id, node = w.get("request_id"), w.get("node")
        return Preempt(
            at,
            victims,
            str(w["reason"]),
            None if request_id is None else str(request_id),
            None if node is None else str(node),
        )
    raise InvalidRequest(f"unknown command op {op!r}", code="unknown_command")


def encode_command(command: Command) -> bytes:
    """A log entry's bytes for `command`."""
    data: bytes = msgpack.packb(command.to_wire(), use_bin_type=True)
    return data


def decode_command(data: bytes) -> Command:
    """The command in a log entry written by `encode_command`.

    Raises InvalidRequest for an unknown op; msgpack's errors for bytes that are not msgpack.
    """
    return command_from_wire(msgpack.unpackb(data, raw=False))
