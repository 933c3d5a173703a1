"""The leader's queue-policy sync: its configuration becomes the table's, at once and after each reload.

A fake lease service applies SetQueuePolicy to a real LeaseTable (so a repeat is
refused as the table refuses it); `trio.testing.MockClock` runs the loop without waiting.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio.testing

from agent.queue_policy_sync import RETRY_S, ConfiguredPolicy, sync_queue_policy
from coordinator.commands import SetQueuePolicy
from coordinator.lease_table import LeaseTable
from coordinator.queues import UNCONFIGURED, QueuePolicy, QueueSpec
from coordinator.raft import NotLeader

TEAMS = QueuePolicy.of([QueueSpec("research", guaranteed_gpus=4), QueueSpec("batch", services=("nightly",))])


class FakeService:
    def __init__(self, table: LeaseTable | None = None, failures: int = 0) -> None:
        self.table = table or LeaseTable()
        self.proposed: list[QueuePolicy] = []
        self.failures = failures

    async def set_queue_policy(self, policy: QueuePolicy) -> None:
        self.proposed.append(policy)
        if self.failures:
            self.failures -= 1
            raise NotLeader(None, "stepped down")
        result = self.table.apply(SetQueuePolicy(trio.current_time(), policy))
        if result.error is not None:
            raise result.error


def run(main: Callable[[], Awaitable[None]]) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_new_leader_proposes_its_configured_policy_once() -> None:
    service, configured = FakeService(), ConfiguredPolicy(TEAMS)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync_queue_policy, service, configured)
            await trio.sleep(60.0)
            nursery.cancel_scope.cancel()

    run(main)
    assert service.table.queue_policy == TEAMS
    assert service.proposed == [TEAMS]


def test_nothing_is_proposed_when_the_table_already_has_it() -> None:
    """The unconfigured agent on an unconfigured table (the drop-in default): no entry at all."""
    service, configured = FakeService(), ConfiguredPolicy(UNCONFIGURED)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync_queue_policy, service, configured)
            await trio.sleep(60.0)
            nursery.cancel_scope.cancel()

    run(main)
    assert service.proposed == []


def test_a_reload_that_changes_the_queues_is_proposed_and_one_that_does_not_is_not() -> None:
    """Removing every queue is a change too: the cluster returns to strict priority."""
    service, configured = FakeService(), ConfiguredPolicy(TEAMS)
    wider = QueuePolicy.of([*TEAMS.queues, QueueSpec("vision", weight=2.0)])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync_queue_policy, service, configured)
            await trio.sleep(1.0)
            assert not configured.update(TEAMS)
            await trio.sleep(1.0)
            assert configured.update(wider)
            await trio.sleep(1.0)
            assert service.table.queue_policy == wider
            assert configured.update(UNCONFIGURED)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

    run(main)
    assert service.proposed == [TEAMS, wider, UNCONFIGURED]
    assert service.table.queue_policy == UNCONFIGURED


def test_a_failed_proposal_is_retried_while_leading() -> None:
    service, configured = FakeService(failures=2), ConfiguredPolicy(TEAMS)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync_queue_policy, service, configured)
            await trio.sleep(RETRY_S * 0.5)
            assert service.table.queue_policy == UNCONFIGURED
            await trio.sleep(RETRY_S * 3)
            nursery.cancel_scope.cancel()

    run(main)
    assert service.proposed == [TEAMS, TEAMS, TEAMS]
    assert service.table.queue_policy == TEAMS


def test_a_policy_already_in_force_is_not_an_error() -> None:
    """Another proposal got there first (the table refuses the repeat as policy_unchanged): nothing is retried."""
    table = LeaseTable()

    class Racing(FakeService):
        async def set_queue_policy(self, policy: QueuePolicy) -> None:
            assert self.table.apply(SetQueuePolicy(trio.current_time(), policy)).ok  # the racing entry
            await super().set_queue_policy(policy)

    service, configured = Racing(table), ConfiguredPolicy(TEAMS)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync_queue_policy, service, configured)
            await trio.sleep(10 * RETRY_S)
            nursery.cancel_scope.cancel()

    run(main)
    assert service.proposed == [TEAMS]
