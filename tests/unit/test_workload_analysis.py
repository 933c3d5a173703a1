"""Sizing reads the cluster's node kinds, never every GPU: it runs on every allocate.

The scenario: a cluster of two H100 nodes (8 GPUs) and one A100 node (4 GPUs),
held in an inventory that fails the test if anything walks its GPUs or nodes
(at 8,000 GPUs that walk cost ~1 ms of the event loop per allocate,
tests/bench/bench_heartbeat.py). The estimate plans for the largest GPU, or
the requested model's; the advisor hears the largest node's GPU count.
"""

from __future__ import annotations

from typing import Iterator

import trio

from coordinator.inventory import Inventory
from coordinator.model import GpuView
from coordinator.request_parsing import parse_allocate_body
from coordinator.workload import WorkloadEstimate, analyze_workload
from agent.workload_analysis import WorkloadAnalysis

H100, H100_MB = "NVIDIA H100 80GB HBM3", 81559
A100, A100_MB = "NVIDIA A100-SXM4-40GB", 40960


class NoWalk(Inventory):
    """An inventory that refuses to be walked GPU by GPU or node by node."""

    walkable = True

    def __iter__(self) -> Iterator[GpuView]:
        assert self.walkable, "sizing walked every GPU of the inventory"
        return super().__iter__()

    def nodes(self) -> list[str]:
        assert self.walkable, "sizing walked every node of the inventory"
        return super().nodes()


def cluster() -> NoWalk:
    inventory = NoWalk()
    for node, name, memory, count in (("h1", H100, H100_MB, 8), ("h2", H100, H100_MB, 8), ("a1", A100, A100_MB, 4)):
        inventory.set_node(node, [GpuView(node, i, f"{node}-{i}", name, memory) for i in range(count)])
    inventory.walkable = False
    return inventory


class Advisor:
    def __init__(self) -> None:
        self.max_gpus_per_node: list[int] = []

    async def advise(
        self, service_name: str, workload_type: str, workload_data: dict[str, object],
        fallback: WorkloadEstimate, *, max_gpus_per_node: int,
    ) -> "Advice":
        self.max_gpus_per_node.append(max_gpus_per_node)
        return Advice(fallback, "advisor", None)


class Advice:
    def __init__(self, estimate: WorkloadEstimate, decided_by: str, fallback_reason: str | None) -> None:
        self.estimate, self.decided_by, self.fallback_reason = estimate, decided_by, fallback_reason


def body(gpu_model: str | None = None) -> object:
    fields: dict[str, object] = {"service_name": "svc", "workload_type": "inference", "workload_data": {"params_b": 70}}
    if gpu_model is not None:
        fields["constraints"] = {"gpu_model": gpu_model}
    return parse_allocate_body(fields)


def test_the_estimate_plans_for_the_largest_gpu_or_the_requested_models_without_walking_the_gpus() -> None:
    inventory = cluster()
    analysis = WorkloadAnalysis(lambda: inventory)

    async def main() -> None:
        for model, memory in ((None, H100_MB), ("a100", A100_MB), ("H100", H100_MB), ("L4", None)):
            got = await analysis.analyze(body(model))  # type: ignore[arg-type]
            assert got.estimate == analyze_workload("inference", {"params_b": 70}, gpu_memory_mb=memory), model
            assert got.decided_by == "analyzer"

    trio.run(main)


def test_the_advisor_hears_the_largest_nodes_gpu_count() -> None:
    inventory = cluster()
    advisor = Advisor()
    analysis = WorkloadAnalysis(lambda: inventory, advisor)

    async def main() -> None:
        got = await analysis.analyze(body())  # type: ignore[arg-type]
        assert got.decided_by == "advisor"

    trio.run(main)
    assert advisor.max_gpus_per_node == [8]
