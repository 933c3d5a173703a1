"""Sizing a request: the built-in workload analyzer, refined by the DeepAgents advisor when one is set.

Any agent answers `POST /gpu/workload` from here (it reads only the inventory),
and the leader's lease service sizes every allocate with it before deciding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from coordinator.inventory import Inventory
from coordinator.request_parsing import AllocateBody
from coordinator.workload import WorkloadEstimate, analyze_workload


class Advisor(Protocol):
    """What sizing needs of the DeepAgents client (agent.advisor.DeepAgentsAdvisor)."""

    async def advise(
        self,
        service_name: str,
        workload_type: str,
        workload_data: dict[str, object],
        fallback: WorkloadEstimate,
        *,
        max_gpus_per_node: int,
    ) -> "AdviceLike": ...


class AdviceLike(Protocol):
    @property
    def estimate(self) -> WorkloadEstimate: ...
    @property
    def decided_by(self) -> str: ...
    @property
    def fallback_reason(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Analysis:
    """The figures a request will be scheduled with, and who decided them."""

    estimate: WorkloadEstimate
    decided_by: str
    fallback_reason: str | None


class WorkloadAnalysis:
    """Turns an allocate body into figures: the analyzer's, or the advisor's when it answers well."""

    def __init__(
        self,
        inventory: Callable[[], Inventory],
        advisor: Advisor | None = None,
        on_advice: Callable[[str, str], None] = lambda decided_by, reason: None,
    ) -> None:
        self._inventory = inventory
        self.advisor = advisor
        self._on_advice = on_advice

    async def analyze(self, body: AllocateBody) -> Analysis:
        """The built-in analyzer's figures, or the advisor's when it is set and answers well.

        Raises InvalidRequest for workload data the analyzer rejects.
        """
        gpus = self._inventory()
        estimate = analyze_workload(
            body.workload_type, body.workload_data, gpu_memory_mb=_target_gpu_memory(gpus, body.gpu_model)
        )
        if self.advisor is None or body.fully_specified:
            return Analysis(estimate, "analyzer", None)
        advice = await self.advisor.advise(
            body.service_name,
            body.workload_type,
            body.workload_data,
            estimate,
            max_gpus_per_node=max((len(kind) for kind in gpus.kinds()), default=1),
        )
        analysis = Analysis(advice.estimate, advice.decided_by, advice.fallback_reason)
        largest = _target_gpu_memory(gpus, None)
        if advice.decided_by == "advisor" and largest is not None and advice.estimate.min_memory_mb > largest:
            # Advice no GPU here could satisfy would turn the request into a 400: the
            # advisor may only refine the analyzer, never make a request unschedulable.
            analysis = Analysis(
                estimate, "analyzer", f"invalid_output: min_memory_mb above every GPU ({largest} MB)"
            )
        reason = (analysis.fallback_reason or "").split(":", 1)[0]
        self._on_advice(analysis.decided_by, reason)
        return analysis


def _target_gpu_memory(gpus: Inventory, gpu_model: str | None) -> int | None:
    """The GPU memory an estimate should plan for: the requested model's, else the largest GPU's.

    Read from the node kinds (each node's (name, memory) pairs; a cluster has a
    handful however many nodes it has), not from every GPU: this runs on every
    allocate, and walking 8,000 GPUs there cost about 1 ms of the event loop each.
    """
    wanted = None if gpu_model is None else gpu_model.lower()
    return max(
        (memory for kind in gpus.kinds() for name, memory in kind if wanted is None or wanted in name.lower()),
        default=None,
    )
