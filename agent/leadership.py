"""The leader's work, started when this server may lead and stopped, all of it, when it may not.

Theory of operation
-------------------
The Raft log publishes every change of (term, role, leader, ready) as a
`RoleState` (agent/raft_log.py, "Leadership"). `Leadership` follows those
events; nothing here polls:

- On a **ready** leadership (this server leads and has applied an entry of its
  own term, so its table holds every write any earlier leader committed) it
  builds a fresh `LeaseService`, with a fresh admission core, and starts the
  leader's tasks in a nursery of that term: the scheduler loop, the outbox
  deliverer, the health reporters, the host-loss watcher.
- On any other state (a follower, a candidate, a new term, a leader that has
  not applied its first entry yet, the log stopped) `service` is set to None at
  once, inside the event, so no new request is handled by the old term's
  service, and the term's nursery is cancelled: nothing of it runs on after a
  step-down. Requests already inside the old service finish against the log,
  which refuses them (NotLeader, ProposalLost) and the HTTP layer forwards them.

`wait_for_service` lets a request that arrives during an election (or a lone
agent's first milliseconds, before it has elected itself) wait, bounded, for
the outcome instead of being refused.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from agent.lease_service import LeaseService
from agent.raft_log import RaftLog, RoleState

log = logging.getLogger(__name__)

LeaderTask = Callable[[LeaseService], Awaitable[None]]


class Leadership:
    """Follows one server's Raft log; holds the leader's `LeaseService` while it is a ready leader."""

    def __init__(
        self,
        node: str,
        build_service: Callable[[RaftLog, int], LeaseService],
        tasks: Sequence[LeaderTask],
    ) -> None:
        self.node = node
        self._build_service = build_service
        self._tasks = tuple(tasks)
        self._log: RaftLog | None = None
        self._state: RoleState | None = None
        self._scope: trio.CancelScope | None = None
        self._service_term = 0
        self._changed = trio.Event()
        # The ready leadership's service; None whenever this server may not decide.
        self.service: LeaseService | None = None

    def follow(self, raft_log: RaftLog) -> None:
        """Follow `raft_log`'s role events (call once, before the log runs)."""
        self._log = raft_log
        raft_log.on_role(self._on_role)
        self._on_role(raft_log.role_state)

    @property
    def state(self) -> RoleState | None:
        return self._state

    @property
    def election_pending(self) -> bool:
        """This voter's log runs and no ready leader is known yet: an election (or its first entry) is under way.

        Never on a client or a server outside the configuration: they hear no
        election, and ask the servers who leads instead.
        """
        state = self._state
        if state is None or not state.running or not state.voter:
            return False
        return state.leader is None or (state.leader == self.node and not state.ready)

    async def wait_for_service(self, timeout_s: float) -> LeaseService | None:
        """The ready leader's service here, waiting at most `timeout_s` while an election is pending."""
        with trio.move_on_after(timeout_s):
            while self.service is None and self.election_pending:
                changed = self._changed
                await changed.wait()
        return self.service

    async def wait_deposed(self, service: LeaseService) -> None:
        """Return once `service` is no longer this server's ready leadership (at once if it is not)."""
        while self.service is service:
            changed = self._changed
            await changed.wait()

    def _on_role(self, state: RoleState) -> None:
        previous, self._state = self._state, state
        lead = state.ready and state.running
        if self.service is not None and (not lead or state.term != self._service_term):
            self.service = None
            if self._scope is not None:
                self._scope.cancel()
            log.info("raft: no longer the ready leader (term %d, %s); leader work stopped", state.term, state.role.value)
        if previous is None or (previous.term, previous.leader) != (state.term, state.leader):
            log.info("raft: term %d, role %s, leader %s", state.term, state.role.value, state.leader)
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run each ready leadership's work until cancelled."""
        task_status.started()
        while True:
            state = self._state
            if self._log is None or state is None or not (state.ready and state.running):
                changed = self._changed
                await changed.wait()
                continue
            await self._lead(self._log, state.term)

    async def _lead(self, raft_log: RaftLog, term: int) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            self._service_term = term
            service = self._build_service(raft_log, term)
            self.service = service
            self._changed.set()
            self._changed = trio.Event()
            log.info("raft: leading term %d; scheduler, outbox and watchers started", term)
            async with trio.open_nursery() as nursery:
                for task in self._tasks:
                    nursery.start_soon(task, service)
                await trio.sleep_forever()
        self._scope = None
        if self.service is service:
            self.service = None
            self._changed.set()
            self._changed = trio.Event()
