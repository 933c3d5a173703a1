"""Queues: who shares the fleet, on what terms (SPEC "Sharing the fleet").

Theory of operation
-------------------
Operators declare queues (`[queues.<name>]`); each service belongs to one. A
queue has a *guarantee* (GPUs it may always get back, by preemption if others
borrowed them), a *weight* (its share of what is idle beyond guarantees), a cap
(`max_gpus`), a priority ceiling, and whether it may borrow idle GPUs beyond its
guarantee and lend its own unused guarantee to others. Queues nest one level: a
child's guarantee and use also count against its parent's, and the parent's cap
bounds the children together.

The policy is part of the replicated state: the leader proposes it
(`SetQueuePolicy`) when its configuration differs from the table's, so every
replica - and the next leader - decides with the same rules.

With no queue configured the policy is *unconfigured*: one implicit `default`
queue, no guarantee, no cap, no preemption - the strict-priority scheduler of
before, unchanged (the drop-in default).

Per-model guarantees: `guaranteed_gpus = {"H100" = 8}` guarantees 8 GPUs whose
name contains "H100". A request counts as within such a guarantee only when it
names a matching `gpu_model` (so the scheduler cannot place "guaranteed" work
on another model); other requests of the queue borrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from coordinator.idle_reclaim import IdlePolicy
from coordinator.model import Wire

DEFAULT_QUEUE = "default"
MIN_PRIORITY, MAX_PRIORITY = 1, 10


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One queue's terms, as configured."""

    name: str
    # The parent queue (one level of nesting), or None for a top-level queue.
    parent: str | None = None
    # GPUs of any model the queue may always reclaim (0: everything it runs is borrowed).
    guaranteed_gpus: int = 0
    # Per-model guarantees as (model substring, GPUs), sorted; when set, they replace guaranteed_gpus.
    guaranteed_by_model: tuple[tuple[str, int], ...] = ()
    # Share of the idle capacity beyond guarantees, relative to other queues' weights.
    weight: float = 1.0
    # Most GPUs the queue (with its children) may hold at once; None: no cap.
    max_gpus: int | None = None
    # Highest priority a request of this queue may ask for (403 above it).
    max_priority: int = MAX_PRIORITY
    # May run beyond its guarantee on idle GPUs (and be preempted back from there).
    borrow: bool = True
    # Lets others borrow its unused guarantee (False keeps that many GPUs idle for it).
    lend: bool = True
    # Seconds a preempted lease of this queue keeps its GPUs after `lease_preempting`.
    preemption_grace_s: float = 30.0
    # Reclaim leases whose GPUs idle below a utilization for a period (off: None).
    idle_reclaim: IdlePolicy | None = None
    # Services whose requests go to this queue (without auth, or keys naming none).
    services: tuple[str, ...] = ()
    # May its requests take shares of a GPU (sharing "shared"; 403 sharing_not_allowed when not).
    allow_shares: bool = True
    # May its shares pack onto a GPU beside other queues' shares. Off by default:
    # time-sliced tenants share one fault domain (a crash or an OOM on the GPU hits
    # all), which teams should opt into; on both sides (each queue must allow it).
    cross_queue_shares: bool = False

    def __post_init__(self) -> None:
        problems = _spec_problems(self)
        if problems:
            raise ValueError(f"queue {self.name!r}: " + "; ".join(problems))

    @property
    def guarantee(self) -> int:
        """The queue's guaranteed GPUs, all models together."""
        if self.guaranteed_by_model:
            return sum(n for _, n in self.guaranteed_by_model)
        return self.guaranteed_gpus

    def model_guarantee(self, gpu_model: str | None) -> tuple[str | None, int]:
        """The guarantee entry a request for `gpu_model` draws on: (model key or None, GPUs).

        Without per-model guarantees: (None, the whole guarantee). With them: the
        entry whose model matches the request's, or (None, 0) when it names none
        that matches (it can only borrow).
        """
        if not self.guaranteed_by_model:
            return None, self.guaranteed_gpus
        if gpu_model is None:
            return None, 0
        wanted = gpu_model.lower()
        for model, gpus in self.guaranteed_by_model:
            if model.lower() in wanted or wanted in model.lower():
                return model, gpus
        return None, 0

    def to_wire(self) -> Wire:
        return {
            "name": self.name,
            "parent": self.parent,
            "guaranteed_gpus": self.guaranteed_gpus,
            "guaranteed_by_model": [list(e) for e in self.guaranteed_by_model],
            "weight": self.weight,
            "max_gpus": self.max_gpus,
            "max_priority": self.max_priority,
            "borrow": self.borrow,
            "lend": self.lend,
            "preemption_grace_s": self.preemption_grace_s,
            "idle_reclaim": None
            if self.idle_reclaim is None
            else {"utilization_pct": self.idle_reclaim.utilization_pct, "minutes": self.idle_reclaim.minutes},
            "services": list(self.services),
            "allow_shares": self.allow_shares,
            "cross_queue_shares": self.cross_queue_shares,
        }

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> QueueSpec:
        idle = w.get("idle_reclaim")
        max_gpus = w.get("max_gpus")
        return cls(
            name=str(w["name"]),
            parent=None if w.get("parent") is None else str(w["parent"]),
            guaranteed_gpus=int(w.get("guaranteed_gpus", 0)),
            guaranteed_by_model=tuple((str(m), int(n)) for m, n in w.get("guaranteed_by_model", ())),
            weight=float(w.get("weight", 1.0)),
            max_gpus=None if max_gpus is None else int(max_gpus),
            max_priority=int(w.get("max_priority", MAX_PRIORITY)),
            borrow=bool(w.get("borrow", True)),
            lend=bool(w.get("lend", True)),
            preemption_grace_s=float(w.get("preemption_grace_s", 30.0)),
            idle_reclaim=None if idle is None else IdlePolicy(float(idle["utilization_pct"]), float(idle["minutes"])),
            services=tuple(str(s) for s in w.get("services", ())),
            allow_shares=bool(w.get("allow_shares", True)),
            cross_queue_shares=bool(w.get("cross_queue_shares", False)),
        )


def _spec_problems(spec: QueueSpec) -> list[str]:
    problems = []
    if not spec.name or not spec.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        problems.append("name must be letters, digits, '-', '_' or '.'")
    if spec.guaranteed_gpus < 0:
        problems.append(f"guaranteed_gpus must be >= 0, got {spec.guaranteed_gpus}")
    for model, gpus in spec.guaranteed_by_model:
        if not model or gpus < 0:
            problems.append(f"guaranteed_gpus[{model!r}] must name a model and be >= 0, got {gpus}")
    if not (math.isfinite(spec.weight) and spec.weight > 0):
        problems.append(f"weight must be a positive number, got {spec.weight}")
    if spec.max_gpus is not None and spec.max_gpus < spec.guarantee:
        problems.append(f"max_gpus ({spec.max_gpus}) is below the guarantee ({spec.guarantee})")
    if not MIN_PRIORITY <= spec.max_priority <= MAX_PRIORITY:
        problems.append(f"max_priority must be {MIN_PRIORITY}-{MAX_PRIORITY}, got {spec.max_priority}")
    if not (math.isfinite(spec.preemption_grace_s) and spec.preemption_grace_s >= 0):
        problems.append(f"preemption_grace_s must be >= 0, got {spec.preemption_grace_s}")
    if spec.parent == spec.name:
        problems.append("a queue cannot be its own parent")
    return problems


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Every queue, and the scheduler's sharing knobs: a value, replicated whole."""

    queues: tuple[QueueSpec, ...] = ()
    # Priority difference that lets a waiting request preempt a running one
    # (0: priority alone never preempts; guarantees and fair share still do).
    preemption_priority_gap: int = 3
    # Priority points a waiting request gains per hour waited, so a stream of
    # higher work cannot hold it back forever (0: no aging).
    age_weight_per_hour: float = 0.0
    _by_name: dict[str, QueueSpec] = field(init=False, repr=False, compare=False)
    _by_service: dict[str, str] = field(init=False, repr=False, compare=False)
    _children: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, QueueSpec] = {}
        for spec in self.queues:
            if spec.name in by_name:
                raise ValueError(f"queue {spec.name!r} is declared twice")
            by_name[spec.name] = spec
        by_service: dict[str, str] = {}
        children: dict[str, list[str]] = {}
        for spec in self.queues:
            if spec.parent is not None:
                parent = by_name.get(spec.parent)
                if parent is None:
                    raise ValueError(f"queue {spec.name!r}: parent {spec.parent!r} is not declared")
                if parent.parent is not None:
                    raise ValueError(f"queue {spec.name!r}: parent {spec.parent!r} has a parent itself (one level only)")
                children.setdefault(spec.parent, []).append(spec.name)
            for service in spec.services:
                if service in by_service:
                    raise ValueError(f"service {service!r} is mapped to queues {by_service[service]!r} and {spec.name!r}")
                by_service[service] = spec.name
        for parent_name, names in children.items():
            parent = by_name[parent_name]
            if parent.services:
                raise ValueError(f"queue {parent_name!r} has child queues, so it cannot take services itself")
            total = sum(by_name[n].guarantee for n in names)
            if total > parent.guarantee and parent.guarantee > 0:
                raise ValueError(
                    f"queue {parent_name!r}: its children's guarantees ({total}) exceed its own ({parent.guarantee})"
                )
        if self.preemption_priority_gap < 0:
            raise ValueError(f"preemption_priority_gap must be >= 0, got {self.preemption_priority_gap}")
        if not (math.isfinite(self.age_weight_per_hour) and self.age_weight_per_hour >= 0):
            raise ValueError(f"age_weight_per_hour must be >= 0, got {self.age_weight_per_hour}")
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_by_service", by_service)
        object.__setattr__(self, "_children", {p: tuple(sorted(n)) for p, n in children.items()})

    @classmethod
    def of(cls, queues: Iterable[QueueSpec], *, preemption_priority_gap: int = 3, age_weight_per_hour: float = 0.0) -> QueuePolicy:
        """A policy of `queues` in canonical (name) order, so equal configurations give equal policies."""
        return cls(tuple(sorted(queues, key=lambda s: s.name)), preemption_priority_gap, age_weight_per_hour)

    @property
    def configured(self) -> bool:
        """Whether any queue is declared; unconfigured means today's strict priority, no preemption."""
        return bool(self.queues)

    def spec(self, name: str) -> QueueSpec:
        """The spec of queue `name`; an undeclared name gets the implicit default terms."""
        spec = self._by_name.get(name)
        return spec if spec is not None else QueueSpec(name)

    def declared(self, name: str) -> bool:
        return name in self._by_name

    def parent_of(self, name: str) -> str | None:
        spec = self._by_name.get(name)
        return None if spec is None else spec.parent

    def children(self, name: str) -> tuple[str, ...]:
        return self._children.get(name, ())

    def is_leaf(self, name: str) -> bool:
        return name not in self._children

    def queue_of_service(self, service_name: str) -> str:
        """The queue `service_name` belongs to: its mapping, else `default`."""
        return self._by_service.get(service_name, DEFAULT_QUEUE)

    def names(self) -> list[str]:
        """Every declared queue, and `default` (always present: unmapped services go there)."""
        return sorted({*self._by_name, DEFAULT_QUEUE})

    def to_wire(self) -> Wire:
        return {
            "queues": [q.to_wire() for q in self.queues],
            "preemption_priority_gap": self.preemption_priority_gap,
            "age_weight_per_hour": self.age_weight_per_hour,
        }

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> QueuePolicy:
        return cls.of(
            (QueueSpec.from_wire(q) for q in w.get("queues", ())),
            preemption_priority_gap=int(w.get("preemption_priority_gap", 3)),
            age_weight_per_hour=float(w.get("age_weight_per_hour", 0.0)),
        )


UNCONFIGURED = QueuePolicy()
