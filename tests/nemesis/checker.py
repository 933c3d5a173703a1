"""Judge a nemesis history: safety violations (the run fails on any) and liveness figures (reported).

Pure: it reads a `History` (tests/nemesis/history.py) and returns a `Verdict`; no
sockets, no clock. Unit-tested against small hand-made histories with planted
violations (tests/nemesis/test_checker.py).

Safety, each a `Violation`:

- **documented answers**: every answer is a status + error code that docs/api.md lists
  for its call (`ANSWERS`); a 500, an undocumented code, an allocation answered for
  another request id, or a release answer that does not name what it released fails;
- **one allocation per request id**: every 200 for a request id names the same
  allocation, and no node lists two allocations of one request id;
- **no GPU held twice**: two different allocations that share a GPU must not both be
  *surely* held at one moment. An allocation is surely held from the end of the first
  call that acknowledged it until the start of the first call that tried to release it
  (or the final read, if none did);
- **acknowledged means durable, everywhere**: at the end, every acknowledged allocation
  that no call tried to release is listed by every node, identical (node, GPUs, request
  id, service, expiry); every acknowledged release is listed by none; and all nodes list
  the same allocations;
- **no agent exits by itself**: an agent found not running at a heal that the fault did
  not kill is reported (and restarted).

Liveness, per fault (`FaultFigures`), reported and never asserted here:

- fault start → first 200 (allocate or release) through a surviving server, and through
  a surviving client (calls started after the fault began; when a fault hits every node,
  as a restart of all five does, through any);
- heal → every node serving (a linearizable read answered 200), and → the old leader
  serving again;
- the longest call through a node that was neither killed nor paused during it;
- `503 no_leader` answers for writes that were applied all the same: an allocate whose
  request was submitted (`submitted_at`, the leader's clock) between that call's start
  and end, or a release whose request ended `released` (`updated_at`) within the call.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable

from tests.nemesis.history import Call, Fault, History

# The 503 codes a Raft cluster's write may answer (docs/api.md, "Error codes").
RAFT_503: set[str | None] = {"no_leader", "not_leader", "proposal_lost", "outcome_unknown"}
# The answer of a request that ran past `[http] request_timeout_s` with nothing proposed
# (docs/api.md, "Bounds and timeouts"); one that may have been is `outcome_unknown`.
TIME_BOUND_503: set[str | None] = {"timeout"}
_BAD_BODY: set[str | None] = {"invalid_json", "invalid_request", "unknown_field"}

# (op, status) -> the error codes docs/api.md lists for it; None in the set: a success body.
ANSWERS: dict[tuple[str, int], set[str | None]] = {
    ("allocate", 200): {None},
    ("allocate", 202): {None},
    ("allocate", 400): _BAD_BODY | {"unknown_workload_type", "unsatisfiable"},
    ("allocate", 401): {"unauthorized"},
    ("allocate", 403): {"forbidden"},
    ("allocate", 409): {"no_capacity", "request_id_used", "request_id_conflict"},
    ("allocate", 413): {"body_too_large"},
    ("allocate", 503): {"queue_full", "storage_unavailable"} | RAFT_503 | TIME_BOUND_503,
    ("release", 200): {None},
    ("release", 400): set(_BAD_BODY),
    ("release", 401): {"unauthorized"},
    ("release", 403): {"forbidden"},
    ("release", 404): {"not_found"},
    ("release", 413): {"body_too_large"},
    ("release", 503): {"storage_unavailable"} | RAFT_503 | TIME_BOUND_503,
}

# What makes two listings of one allocation "identical".
IDENTITY_FIELDS = ("allocation_id", "request_id", "service_name", "node", "gpu_ids", "expires_at")


@dataclass(frozen=True)
class Violation:
    kind: str
    detail: str


@dataclass
class FaultFigures:
    """One fault's unavailability, in seconds (None: not observed)."""

    fault: Fault
    first_200_server: float | None
    first_200_client: float | None
    heal_all_serving: float | None
    old_leader_serving: float | None
    longest_call: float | None  # through nodes up during the call, calls started in this fault's window
    answers_503: int
    no_answer: int


@dataclass
class Verdict:
    violations: list[Violation] = field(default_factory=list)
    figures: list[FaultFigures] = field(default_factory=list)
    longest_call: float | None = None  # over the whole run, through nodes up during the call
    no_leader_applied: list[Call] = field(default_factory=list)
    calls: int = 0
    ok: int = 0

    @property
    def safe(self) -> bool:
        return not self.violations


def parse_time(text: str) -> float:
    """RFC 3339 UTC as the API writes it ('2026-11-26T18:05:12.798Z') -> epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def check(history: History) -> Verdict:
    """Every safety violation and liveness figure of `history` (see the module docstring)."""
    verdict = Verdict(calls=len(history.calls), ok=sum(1 for c in history.calls if c.status == 200))
    verdict.violations += undocumented_answers(history.calls)
    verdict.violations += request_ids_with_two_allocations(history)
    verdict.violations += gpus_held_twice(history)
    verdict.violations += final_state_violations(history)
    verdict.violations += [
        Violation("agent_crashed", f"{name} had exited by itself when {f.kind} ({f.note}) healed")
        for f in history.faults for name in f.crashed
    ]
    verdict.no_leader_applied = no_leader_but_applied(history)
    down = down_windows(history.faults)
    verdict.longest_call = longest(c for c in history.calls if not overlaps_down(c, down))
    for i, fault in enumerate(history.faults):
        until = history.faults[i + 1].start if i + 1 < len(history.faults) else float("inf")
        verdict.figures.append(fault_figures(history, fault, until, down))
    return verdict


# --- safety -------------------------------------------------------------------------------


def undocumented_answers(calls: Iterable[Call]) -> list[Violation]:
    found = []
    for c in calls:
        if c.status is None:
            continue  # no answer is not an answer: indeterminate, judged by the other checks
        allowed = ANSWERS.get((c.op, c.status))
        code = c.code
        if allowed is None or code not in allowed:
            found.append(Violation("undocumented_answer", f"{describe(c)}: {c.status} {code or ''} {short(c.body)}"))
            continue
        if c.status == 200 and c.op == "allocate":
            body = c.body if isinstance(c.body, dict) else {}
            if body.get("request_id") != c.request_id or not body.get("allocation_id") or "gpu_ids" not in body:
                found.append(Violation("undocumented_answer", f"{describe(c)}: not this request's allocation: {short(c.body)}"))
        elif c.status == 200 and c.op == "release":
            released = c.body.get("released") if isinstance(c.body, dict) else None
            if not isinstance(released, list) or c.allocation_id not in released:
                found.append(Violation("undocumented_answer", f"{describe(c)}: 200 without the allocation released: {short(c.body)}"))
    return found


def acknowledged(calls: Iterable[Call]) -> dict[str, tuple[Call, dict[str, Any]]]:
    """allocation id -> (the first call that acknowledged it, its allocation)."""
    acks: dict[str, tuple[Call, dict[str, Any]]] = {}
    for c in sorted(calls, key=lambda c: c.end):
        if c.op == "allocate" and c.status == 200 and isinstance(c.body, dict) and c.body.get("allocation_id"):
            acks.setdefault(str(c.body["allocation_id"]), (c, c.body))
    return acks


def request_ids_with_two_allocations(history: History) -> list[Violation]:
    found = []
    by_request: dict[str, set[str]] = {}
    for c, body in acknowledged(history.calls).values():
        by_request.setdefault(c.request_id, set()).add(str(body["allocation_id"]))
    for request_id, ids in sorted(by_request.items()):
        if len(ids) > 1:
            found.append(Violation("request_id_two_allocations", f"request {request_id} acknowledged as {sorted(ids)}"))
    if history.final is not None:
        for node, allocations in sorted(history.final.allocations.items()):
            listed: dict[str, set[str]] = {}
            for a in allocations:
                listed.setdefault(str(a.get("request_id")), set()).add(str(a.get("allocation_id")))
            for request_id, ids in sorted(listed.items()):
                if len(ids) > 1:
                    found.append(Violation("request_id_two_allocations", f"{node} lists request {request_id} as {sorted(ids)}"))
    return found


def gpus_of(allocation: dict[str, Any]) -> set[tuple[str, int]]:
    return {(str(allocation.get("node")), int(i)) for i in allocation.get("gpu_ids") or ()}


def gpus_held_twice(history: History) -> list[Violation]:
    acks = acknowledged(history.calls)
    first_release: dict[str, float] = {}
    for c in history.calls:
        if c.op == "release" and c.allocation_id is not None:
            first_release[c.allocation_id] = min(first_release.get(c.allocation_id, c.start), c.start)
    final_end = history.final.end if history.final is not None else max((c.end for c in history.calls), default=0.0)
    held = []  # (gpu, surely-held from, until, allocation id)
    for allocation_id, (call, body) in acks.items():
        until = first_release.get(allocation_id, final_end)
        for gpu in gpus_of(body):
            held.append((gpu, call.end, until, allocation_id))
    found = []
    held.sort()
    for i, (gpu, a_from, a_until, a_id) in enumerate(held):
        for gpu2, b_from, b_until, b_id in held[i + 1:]:
            if gpu2 != gpu:
                break
            if a_id != b_id and max(a_from, b_from) < min(a_until, b_until):
                found.append(Violation(
                    "gpu_double_allocated",
                    f"GPU {gpu[0]}/{gpu[1]} held by {a_id} [{a_from:.3f}, {a_until:.3f}] "
                    f"and {b_id} [{b_from:.3f}, {b_until:.3f}]",
                ))
    if history.final is not None:
        for node, allocations in sorted(history.final.allocations.items()):
            owner: dict[tuple[str, int], str] = {}
            for a in allocations:
                for gpu in gpus_of(a):
                    other = owner.setdefault(gpu, str(a.get("allocation_id")))
                    if other != a.get("allocation_id"):
                        found.append(Violation("gpu_double_allocated", f"{node} lists GPU {gpu[0]}/{gpu[1]} in {other} and {a.get('allocation_id')}"))
    return found


def final_state_violations(history: History) -> list[Violation]:
    final = history.final
    if final is None:
        return [Violation("no_final_state", "the cluster was never read back at the end")]
    found = []
    acks = acknowledged(history.calls)
    release_tried = {c.allocation_id for c in history.calls if c.op == "release"}
    released = {c.allocation_id for c in history.calls if c.op == "release" and c.status == 200}
    listed = {node: {str(a.get("allocation_id")): a for a in allocations} for node, allocations in final.allocations.items()}
    for node in (*final.servers, *final.clients):
        if node not in listed:
            found.append(Violation("node_not_read", f"{node} could not be read at the end"))
    for allocation_id, (call, body) in sorted(acks.items()):
        if allocation_id in release_tried:
            continue
        for node, table in sorted(listed.items()):
            there = table.get(allocation_id)
            if there is None:
                found.append(Violation("acknowledged_lost", f"{node} does not list {allocation_id} ({describe(call)})"))
            elif identity(there) != identity(body):
                found.append(Violation("replica_differs", f"{node} lists {identity(there)}, acknowledged {identity(body)}"))
    for allocation_id in sorted(i for i in released if i is not None):
        for node, table in sorted(listed.items()):
            if allocation_id in table:
                found.append(Violation("released_still_present", f"{node} still lists {allocation_id}, whose release was acknowledged"))
    if listed:
        reference_node = sorted(listed)[0]
        reference = {i: identity(a) for i, a in listed[reference_node].items()}
        for node, table in sorted(listed.items()):
            mine = {i: identity(a) for i, a in table.items()}
            if mine != reference:
                diff = sorted(set(mine.items()) ^ set(reference.items()))
                found.append(Violation("replicas_disagree", f"{node} and {reference_node} differ: {diff[:4]}"))
    return found


def identity(allocation: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(tuple(v) if isinstance(v, list) else v for v in (allocation.get(f) for f in IDENTITY_FIELDS))


# --- liveness -----------------------------------------------------------------------------


def no_leader_but_applied(history: History) -> list[Call]:
    """503 no_leader answers to writes that the leader applied while that call ran."""
    requests = history.final.requests if history.final is not None else {}
    found = []
    for c in history.calls:
        if c.status != 503 or c.code != "no_leader":
            continue
        record = requests.get(c.request_id)
        if not record:
            continue
        stamp = record.get("submitted_at") if c.op == "allocate" else (
            record.get("updated_at") if record.get("status") == "released" else None
        )
        if isinstance(stamp, str) and c.start <= parse_time(stamp) <= c.end:
            found.append(c)
    return found


def down_windows(faults: Iterable[Fault]) -> dict[str, list[tuple[float, float]]]:
    windows: dict[str, list[tuple[float, float]]] = {}
    for f in faults:
        for node in f.down:
            windows.setdefault(node, []).append((f.start, f.heal))
    return windows


def overlaps_down(c: Call, down: dict[str, list[tuple[float, float]]]) -> bool:
    return any(c.start < until and frm < c.end for frm, until in down.get(c.node, ()))


def longest(calls: Iterable[Call]) -> float | None:
    return max((c.end - c.start for c in calls), default=None)


def fault_figures(history: History, fault: Fault, until: float, down: dict[str, list[tuple[float, float]]]) -> FaultFigures:
    final = history.final
    servers = final.servers if final is not None else ()
    clients = final.clients if final is not None else ()
    window = [c for c in history.calls if fault.start <= c.start < until]

    def first_200(nodes: Iterable[str]) -> float | None:
        # Survivors: nodes the fault neither stops nor cuts off; when it hits them all
        # (restart_all), any node's first 200 counts.
        nodes = set(nodes)
        survivors = (nodes - set(fault.targets) - set(fault.down)) or nodes
        ends = [c.end for c in window if c.status == 200 and c.node in survivors]
        return min(ends) - fault.start if ends else None

    serving = fault.serving_after_heal
    everyone = (*servers, *clients)
    return FaultFigures(
        fault=fault,
        first_200_server=first_200(servers),
        first_200_client=first_200(clients),
        heal_all_serving=(max(serving.values()) - fault.heal) if serving and all(n in serving for n in everyone) else None,
        old_leader_serving=(serving[fault.old_leader] - fault.heal) if fault.old_leader in serving else None,
        longest_call=longest(c for c in window if not overlaps_down(c, down)),
        answers_503=sum(1 for c in window if c.status == 503),
        no_answer=sum(1 for c in window if c.status is None),
    )


def median_max(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(median, max, how many were not observed) of a figure over several faults."""
    values = list(values)
    seen = [v for v in values if v is not None]
    if not seen:
        return None, None, len(values)
    return statistics.median(seen), max(seen), len(values) - len(seen)


def describe(c: Call) -> str:
    return f"{c.op} {c.request_id}{' ' + c.allocation_id if c.allocation_id else ''} via {c.node} at {c.start:.3f}"


def short(body: Any, limit: int = 160) -> str:
    text = str(body)
    return text if len(text) <= limit else text[:limit] + "…"
