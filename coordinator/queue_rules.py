"""The queue rules of one scheduling pass: guarantees, caps, borrowing and fair share.

Theory of operation
-------------------
A `QueueBook` is built per pass from the table's per-queue counts (queue_ledger.py)
and the cluster's capacity; the pass tells it of every placement it plans
(`take`), of every reservation a guaranteed request makes (`count_reserved`,
for the rest of the pass) and of every lease it picks to preempt (`give_back`),
so later requests of the same pass are judged against what the pass already
decided.

A request is classified against its queue (`classify`):

- ``QUOTA``: it may not run now whatever is free - its queue (or its parent)
  would pass `max_gpus`; or it is beyond the guarantee and either asks not to be
  preemptible or its queue may not borrow. It waits with reason `queue_quota`.
- ``GUARANTEED``: the queue's use (of the request's model, for per-model
  guarantees) plus the request stays within the guarantee, and within the
  parent's guarantee when the parent has one. Served first, by priority, and
  may reclaim borrowed GPUs by preemption.
- ``BORROW``: beyond the guarantee, on idle capacity: served after every
  guaranteed request, queue by queue in order of least borrowed per weight.

Fair share (`fair_shares`) is weighted max-min water-filling, the dominant
resource being GPUs: every queue first gets min(demand, guarantee); what is
left is split in proportion to weights among queues that want more, none
getting more than it asks for (its demand: held plus waiting GPUs, capped by
`max_gpus`); what a capped queue does not take goes to the others. Top-level
queues share the cluster; children share their parent's fair share the same
way. A queue that does not lend keeps its unused guarantee out of everyone
else's share. Borrowers below their fair share may reclaim from queues above
theirs (KAI Scheduler's "reclaim toward fair share"), never below a victim
queue's guarantee.

Cost: O(queues) to build, O(1) per classify or take (per-model guarantees
add a pass over the queue's GPU models).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Mapping

from coordinator.model import AllocationRequest
from coordinator.queue_ledger import QueueLedger
from coordinator.queues import QueuePolicy, QueueSpec


class Standing(Enum):
    QUOTA = "queue_quota"
    GUARANTEED = "guaranteed"
    BORROW = "borrow"
    # Not a classification: a preemption candidate that may take only lower-priority
    # work (by the gap), its own queue's or borrowed, whatever its queue's share.
    PRIORITY = "priority"


@dataclass(frozen=True, slots=True)
class Verdict:
    standing: Standing
    # For QUOTA: why, in words (the why-pending detail).
    detail: str = ""


class QueueBook:
    """Per-queue GPU counts for one pass, and the rules read against them."""

    def __init__(
        self,
        policy: QueuePolicy,
        ledger: QueueLedger,
        capacity: int,
        claims: Mapping[str, AllocationRequest] | None = None,
    ) -> None:
        self.policy = policy
        self.ledger = ledger
        self.capacity = capacity
        # GPUs per queue that leases hold and keep (the table's, less leases in their
        # grace period), minus those this pass picks to preempt: what protects a
        # victim queue's guarantee. Placements planned or in flight are left out,
        # as they may yet be refused.
        self.held: Counter[str] = Counter({q: ledger.kept(q) for q in ledger.gpus})
        # GPUs per queue as the pass goes: what it keeps, plus what its claimants
        # (requests victims are being preempted for) will get, plus placements
        # planned, plus GPUs reserved for its guaranteed waiters (`count_reserved`). Counting a claim from the moment its Preempt is decided is what
        # keeps the next pass from preempting again for the same entitlement.
        self.used: Counter[str] = Counter(self.held)
        # Model-keyed use for per-model guarantees: (queue, model key) -> GPUs.
        self._model_used: dict[tuple[str, str], int] = {}
        for spec in policy.queues:
            for model, _ in spec.guaranteed_by_model:
                self._model_used[(spec.name, model)] = ledger.model_gpus(spec.name, model)
        self.total_used = sum(self.used.values())
        self._claims: dict[str, AllocationRequest] = {}
        for request in (claims or {}).values():
            self.claim(request)
        # GPUs the pass reserved for guaranteed requests (`count_reserved`), counted
        # in `used` until `forget_reserved`.
        self._reserved: list[tuple[AllocationRequest, tuple[str, ...]]] = []
        self._shares: dict[str, float] | None = None

    # ------------------------------------------------------------------ counts

    def parent_used(self, parent: str) -> int:
        return sum(self.used[c] for c in self.policy.children(parent))

    def parent_held(self, parent: str) -> int:
        return sum(self.held[c] for c in self.policy.children(parent))

    def group_used(self, name: str) -> int:
        """GPUs `name` holds, with its children's for a parent."""
        children = self.policy.children(name)
        return sum(self.used[c] for c in children) if children else self.used[name]

    def borrowed(self, name: str) -> int:
        """GPUs `name` holds beyond its guarantee."""
        return max(0, self.used[name] - self.policy.spec(name).guarantee)

    def withheld(self) -> int:
        """Unused guarantee of queues that do not lend: GPUs no borrower may take."""
        return sum(
            max(0, spec.guarantee - self.group_used(spec.name)) for spec in self.policy.queues if not spec.lend
        )

    # ------------------------------------------------------------------ rules

    def classify(self, request: AllocationRequest) -> Verdict:
        """Where `request` stands against its queue now (see the module docstring)."""
        name = request.queue_name
        spec = self.policy.spec(name)
        need = request.requirements.total_gpus
        parent = self.policy.spec(spec.parent) if spec.parent is not None else None
        if spec.max_gpus is not None and self.used[name] + need > spec.max_gpus:
            return Verdict(
                Standing.QUOTA, f"queue {name} holds {self.used[name]} of its max_gpus {spec.max_gpus}"
            )
        if parent is not None and parent.max_gpus is not None:
            held = self.parent_used(parent.name)
            if held + need > parent.max_gpus:
                return Verdict(
                    Standing.QUOTA, f"parent queue {parent.name} holds {held} of its max_gpus {parent.max_gpus}"
                )
        if self._within_guarantee(request, spec, parent):
            return Verdict(Standing.GUARANTEED)
        if not request.preemptible:
            return Verdict(
                Standing.QUOTA,
                f"not preemptible, and beyond queue {name}'s guarantee of {spec.guarantee} GPU(s)",
            )
        if not spec.borrow or (parent is not None and not parent.borrow):
            return Verdict(
                Standing.QUOTA, f"queue {name} is at its guarantee of {spec.guarantee} GPU(s) and may not borrow"
            )
        return Verdict(Standing.BORROW)

    def _within_guarantee(self, request: AllocationRequest, spec: QueueSpec, parent: QueueSpec | None) -> bool:
        need = request.requirements.total_gpus
        model, guarantee = spec.model_guarantee(request.requirements.gpu_model)
        used = self._model_used.get((spec.name, model), 0) if model is not None else self.used[spec.name]
        if used + need > guarantee:
            return False
        if parent is not None and parent.guarantee > 0:
            return self.parent_used(parent.name) + need <= parent.guarantee
        return True

    def may_borrow(self, need: int) -> bool:
        """Whether `need` more borrowed GPUs leave every non-lending queue's unused guarantee idle."""
        return self.total_used + need <= self.capacity - self.withheld()

    def take(self, request: AllocationRequest, gpu_names: tuple[str, ...], sign: int = 1) -> None:
        """Count a placement the pass plans (`sign` -1: uncount it)."""
        name = request.queue_name
        self.used[name] += sign * len(gpu_names)
        self.total_used += sign * len(gpu_names)
        for spec_model in self._models_of(name):
            self._model_used[(name, spec_model)] += sign * sum(1 for g in gpu_names if spec_model.lower() in g.lower())

    def count_reserved(self, request: AllocationRequest, gpu_names: tuple[str, ...]) -> None:
        """Count GPUs the pass reserved for guaranteed `request` as its queue's, until `forget_reserved`.

        They are held for the queue against everyone ranked later, as if it held
        them: the queue's next waiters are judged with them counted, so what its
        waiters reserve together never passes its unused guarantee, and the free
        GPUs other queues are owed stay open for them.
        """
        self._reserved.append((request, gpu_names))
        self.take(request, gpu_names)

    def forget_reserved(self) -> None:
        """Stop counting what `count_reserved` counted: the pass is over, and a reservation lasts one pass."""
        for request, gpu_names in self._reserved:
            self.take(request, gpu_names, sign=-1)
        self._reserved.clear()

    def claim(self, request: AllocationRequest) -> None:
        """Count `request` as holding its GPUs: victims are being preempted for it."""
        if request.request_id in self._claims:
            return
        self._claims[request.request_id] = request
        self._count_claim(request, 1)

    def unclaim(self, request_id: str) -> None:
        """Stop counting a claim: its request is placed (`take` counts it then) or waits like any other."""
        request = self._claims.pop(request_id, None)
        if request is not None:
            self._count_claim(request, -1)

    def _count_claim(self, request: AllocationRequest, sign: int) -> None:
        name, need = request.queue_name, request.requirements.total_gpus
        self.used[name] += sign * need
        self.total_used += sign * need
        model, _ = self.policy.spec(name).model_guarantee(request.requirements.gpu_model)
        if model is not None:
            self._model_used[(name, model)] = self._model_used.get((name, model), 0) + sign * need

    def give_back(self, queue: str, gpu_names: tuple[str, ...]) -> None:
        """Count a lease the pass picked to preempt as gone from `queue`."""
        self.used[queue] -= len(gpu_names)
        self.held[queue] -= len(gpu_names)
        self.total_used -= len(gpu_names)
        for spec_model in self._models_of(queue):
            self._model_used[(queue, spec_model)] -= sum(1 for g in gpu_names if spec_model.lower() in g.lower())

    def _models_of(self, name: str) -> list[str]:
        return [model for model, _ in self.policy.spec(name).guaranteed_by_model]

    # ------------------------------------------------------------------ fair share

    def fair_share(self, name: str) -> float:
        """`name`'s fair share of the cluster's GPUs (see `fair_shares`).

        Worked out once per pass: demand (held + waiting) does not change when
        the pass moves GPUs from waiting to held, and a lease picked to preempt
        leaves its queue's demand as it was (its holder's work still wants GPUs).
        """
        if self._shares is None:
            held, waiting = self.ledger.gpus, self.ledger.pending_gpus
            demand = {q: held[q] + waiting[q] for q in {*held, *waiting}}
            self._shares = fair_shares(self.policy, self.capacity, demand)
        return self._shares.get(name, 0.0)


def fair_shares(policy: QueuePolicy, capacity: int, demand: Mapping[str, int]) -> dict[str, float]:
    """Each queue's fair share of `capacity` GPUs, given each leaf queue's `demand` (held + waiting).

    Weighted max-min water-filling (module docstring). Queues named in `demand`
    but not declared share with the default terms (top-level, weight 1, no
    guarantee). Parents get the sum of their children's; every share is at
    most its queue's demand (capped by max_gpus).
    """
    tops: dict[str, list[str]] = {}
    names = {*(s.name for s in policy.queues), *demand}
    for name in sorted(names):
        parent = policy.parent_of(name)
        if parent is None:
            tops.setdefault(name, [])
        else:
            tops.setdefault(parent, []).append(name)

    def capped(name: str, wanted: float) -> float:
        cap = policy.spec(name).max_gpus
        return wanted if cap is None else min(wanted, float(cap))

    leaf_demand = {n: capped(n, float(demand.get(n, 0))) for n in names if policy.is_leaf(n)}
    top_demand = {
        t: capped(t, sum(leaf_demand.get(c, 0.0) for c in children) if children else leaf_demand.get(t, 0.0))
        for t, children in tops.items()
    }
    # A non-lending queue keeps its unused guarantee out of the pool.
    withheld = sum(
        max(0.0, policy.spec(t).guarantee - top_demand[t]) for t in tops if not policy.spec(t).lend
    )
    shares = _water_fill(policy, max(0.0, capacity - withheld), top_demand)
    result = dict(shares)
    for top, children in tops.items():
        if children:
            result.update(_water_fill(policy, shares[top], {c: leaf_demand.get(c, 0.0) for c in children}))
    return result


def _water_fill(policy: QueuePolicy, capacity: float, demand: Mapping[str, float]) -> dict[str, float]:
    """Guarantees first (up to demand), then the rest by weight, none above its demand."""
    share = {n: min(d, float(policy.spec(n).guarantee)) for n, d in demand.items()}
    left = capacity - sum(share.values())
    if left < 0:
        # Guarantees oversubscribe what there is: scale them down alike.
        scale = capacity / (capacity - left) if capacity > 0 else 0.0
        return {n: s * scale for n, s in share.items()}
    wanting = {n for n, d in demand.items() if d > share[n]}
    while left > 1e-9 and wanting:
        weights = sum(policy.spec(n).weight for n in wanting)
        step = {n: left * policy.spec(n).weight / weights for n in wanting}
        full = {n for n in wanting if share[n] + step[n] >= demand[n]}
        if not full:
            for n in wanting:
                share[n] += step[n]
            break
        for n in full:
            left -= demand[n] - share[n]
            share[n] = demand[n]
        wanting -= full
    return share
