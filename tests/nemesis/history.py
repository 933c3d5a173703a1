"""What a nemesis run observed: every call, every fault, and the cluster's state at the end.

Plain data, written by the runner (tests/nemesis/run.py) and read by the pure checker
(tests/nemesis/checker.py). Times are wall-clock seconds (`time.time()`), because the
agents stamp `allocated_at` and `updated_at` with the same clock on the same machine and
the checker compares them with the calls' start and end.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Call:
    """One HTTP call the workload made, and what came back."""

    op: str  # "allocate" or "release"
    node: str  # the agent it was sent to
    worker: int
    request_id: str  # the allocation's idempotency key (a release names its allocation's too)
    start: float
    end: float
    status: int | None  # None: no answer (refused, reset, timed out on the client side)
    body: Any = None  # the parsed JSON answer, or the raw text when it was not JSON
    allocation_id: str | None = None  # what a release asked to release
    error: str | None = None  # the exception's name when there was no answer

    @property
    def code(self) -> str | None:
        """The error code of an error answer, else None."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            code = self.body["error"].get("code")
            return code if isinstance(code, str) else None
        return None


@dataclass
class Fault:
    """One injected fault: what, on whom, and when it started, healed and settled."""

    kind: str
    targets: tuple[str, ...]  # the nodes it cuts off, stops or stalls: not "survivors" meanwhile
    down: tuple[str, ...]  # nodes not expected to answer meanwhile (killed or paused)
    old_leader: str | None  # the leader when the fault began
    start: float
    heal: float = 0.0
    settled: float = 0.0
    # node -> first time after `heal` it answered a linearizable read with 200
    serving_after_heal: dict[str, float] = field(default_factory=dict)
    note: str = ""  # for the table: who, and how hard
    crashed: tuple[str, ...] = ()  # agents found exited at the heal that the fault did not kill


@dataclass
class FinalState:
    """The cluster read back after the last fault healed and the workload stopped."""

    servers: tuple[str, ...]
    clients: tuple[str, ...]
    # node -> its allocations: each server's own replica (?stale=true), each client's forwarded read
    allocations: dict[str, list[dict[str, Any]]]
    # request id -> GET /gpu/requests/{id} from a server's replica, for the ids the checker asks about
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    end: float = 0.0  # when the final reads were taken


@dataclass
class History:
    seed: int
    calls: list[Call] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    final: FinalState | None = None

    def dump(self) -> str:
        return json.dumps(asdict(self), indent=None, separators=(",", ":"))

    @staticmethod
    def load(text: str) -> History:
        raw = json.loads(text)
        final = raw.get("final")
        return History(
            seed=raw["seed"],
            calls=[Call(**c) for c in raw["calls"]],
            faults=[Fault(**{**f, "targets": tuple(f["targets"]), "down": tuple(f["down"]), "crashed": tuple(f["crashed"])})
                    for f in raw["faults"]],
            final=None if final is None else FinalState(
                **{**final, "servers": tuple(final["servers"]), "clients": tuple(final["clients"])}
            ),
        )
