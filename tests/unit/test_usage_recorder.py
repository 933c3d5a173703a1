"""The leader's usage recorder, driven by hand: what it observes and what it proposes.

A fake lease service applies RecordUsage to a real LeaseTable; the inventory is
built by the test. `trio.testing.MockClock` runs the loop without waiting.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import trio
import trio.testing

from agent.usage_recorder import UsageRecorder
from coordinator.commands import RecordUsage, Release
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import GpuView
from tests.unit.test_usage_accounting import grant, lease

RETENTION_S = 30 * 86_400.0


class FakeService:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.table = LeaseTable()
        self.clock = clock
        self.records: list[list[tuple[str, str, float]]] = []

    async def record_usage(self, rows: Sequence[tuple[str, str, float]], retention_s: float) -> None:
        if not rows and retention_s == self.table.usage_retention_s:
            return
        self.records.append(list(rows))
        result = self.table.apply(RecordUsage(self.clock(), tuple(rows), retention_s))
        assert result.ok, result.error


def views(utilization: dict[int, float | None], node: str = "n1") -> Inventory:
    return Inventory.of(
        GpuView(node=node, index=i, uuid=f"GPU-{i}", name="H100", memory_total_mb=81559, utilization_pct=u)
        for i, u in utilization.items()
    )


def recorder(service: FakeService, inventory: list[Inventory]) -> UsageRecorder:
    fake: Any = service
    return UsageRecorder(fake, lambda: inventory[0], record_interval_s=60.0, retention_s=RETENTION_S, clock=service.clock)


def test_leased_gpus_are_measured_and_recorded_per_queue_and_service() -> None:
    """Two leased GPUs at 50 % and 100 % for 10 s: 15 utilized GPU-seconds; the unleased GPU counts for nobody."""
    clock = [0.0]
    service = FakeService(lambda: clock[0])
    grant(service.table, lease("a", [0, 1], 0.0, service="train", queue="batch"))
    inventory = [views({0: 50.0, 1: 100.0, 2: 100.0})]
    r = recorder(service, inventory)
    for at in (0.0, 5.0, 10.0):
        r.poll(at)
    clock[0] = 10.0
    trio.run(r.record)
    assert service.records == [[("batch", "train", 15.0)]]
    assert service.table.usage(0, 3600, "queue", now=10.0) == [("batch", 20.0, 15.0)]


def test_a_gpu_missing_from_the_inventory_counts_as_unknown() -> None:
    service = FakeService(lambda: 0.0)
    grant(service.table, lease("a", [0, 1], 0.0))
    inventory = [views({0: 100.0})]  # GPU 1's host is not alive in gossip
    r = recorder(service, inventory)
    r.poll(0.0)
    r.poll(5.0)
    assert r.meter.take() == [("default", "svc", 5.0)]


def test_the_loop_records_each_interval_and_only_when_there_is_something_to_say() -> None:
    """A lease at 100 % for 60 s gives one record of 60 s; once released, nothing more is proposed.

    The second between the last poll and the release is not counted: the meter
    counts an interval only when it sees its end under the same lease (errs low).
    """
    service = FakeService(trio.current_time)
    grant(service.table, lease("a", [0], 0.0))
    inventory = [views({0: 100.0})]
    # The retention is the table's already: an empty record would say nothing.
    service.table.apply(RecordUsage(0.0, (), RETENTION_S))

    async def main() -> None:
        r = recorder(service, inventory)
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            await trio.sleep(61.0)
            assert service.records == [[("default", "svc", 60.0)]]
            assert service.table.apply(Release(trio.current_time(), ("a",))).ok
            await trio.sleep(300.0)
            assert service.records == [[("default", "svc", 60.0)]]
            nursery.cancel_scope.cancel()

    # The mocked clock starts at 0, where the lease was granted.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
