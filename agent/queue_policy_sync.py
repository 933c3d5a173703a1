"""The leader makes its configured queue policy the cluster's.

Theory of operation
-------------------
Queues are replicated state (coordinator/queues.py): every replica schedules by
the policy in its table, set only by a SetQueuePolicy entry. Each agent reads
`[queues.<name>]` and the scheduler's sharing knobs from its own file
(`ConfiguredPolicy`, replaced on a SIGHUP reload); the ready leader compares
that with the table's and, when they differ, proposes its own. It does so when
its leadership starts and again whenever a reload changes its configuration,
and nowhere else: followers' files are not consulted.

So the leader's configuration wins. Servers whose files differ change the rules
at every failover (each new leader proposes its own); keep the `[queues]` of
every server the same (docs/configuration.md "Queues").

A proposal that fails (leadership moving, a slow disk) is retried after
RETRY_S while this leadership lasts; a new leadership starts afresh.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from coordinator.errors import Conflict
from coordinator.lease_table import LeaseTable
from coordinator.queues import QueuePolicy

log = logging.getLogger(__name__)

# Seconds between attempts to propose the configured policy after one failed.
RETRY_S = 1.0


class PolicyProposer(Protocol):
    """What the sync needs of the leader's lease service (agent/lease_service.LeaseService)."""

    @property
    def table(self) -> LeaseTable: ...

    async def set_queue_policy(self, policy: QueuePolicy) -> None: ...


class ConfiguredPolicy:
    """This agent's configured queue policy, and a wake-up when a reload changes it.

    Used on the trio thread only (the SIGHUP handler updates it after reading the file in a worker thread).
    """

    def __init__(self, policy: QueuePolicy) -> None:
        self._policy = policy
        self._changed = trio.Event()

    @property
    def policy(self) -> QueuePolicy:
        return self._policy

    def update(self, policy: QueuePolicy) -> bool:
        """Replace the policy; returns whether it changed (then waiters wake)."""
        if policy == self._policy:
            return False
        self._policy = policy
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def wait_changed(self, seen: QueuePolicy) -> None:
        """Return once the configured policy is no longer `seen` (at once if it is not already)."""
        while self._policy == seen:
            changed = self._changed
            await changed.wait()


async def sync_queue_policy(service: PolicyProposer, configured: ConfiguredPolicy, *, retry_s: float = RETRY_S) -> None:
    """Keep the table's policy equal to `configured`'s for as long as this leadership lasts (module docstring)."""
    while True:
        wanted = configured.policy
        if service.table.queue_policy != wanted:
            try:
                await service.set_queue_policy(wanted)
            except Exception as error:  # noqa: BLE001 - retried below while this leadership lasts
                if not (isinstance(error, Conflict) and error.code == "policy_unchanged"):
                    log.warning("queue policy not applied (%s); retrying in %g s", error, retry_s)
                    with trio.move_on_after(retry_s):
                        await configured.wait_changed(wanted)
                    continue
            names = ", ".join(spec.name for spec in wanted.queues) or "none: strict priority"
            log.info("queue policy of this leader's configuration in force (queues: %s)", names)
        await configured.wait_changed(wanted)
