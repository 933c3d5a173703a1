"""The leader's host-loss watcher: a host gone for the grace period has its leases marked lost.

Theory of operation
-------------------
Runs on a ready Raft leader only (agent/leadership.py starts it with each
leadership, like the scheduler, and cancels it when leadership ends), as one
trio task. Every `poll_s` (and at the next
grace deadline, if sooner) it reads this agent's gossip view and the lease
table, and feeds the pure `HostLossPolicy` (coordinator/host_loss.py) one
observation per node that holds live allocations: its gossip status, or None
when gossip has forgotten it. Nodes that hold nothing are not watched: the
decision only exists to end leases.

For each node the policy reports lost, it proposes `MarkHostLost(at, node,
allocated_before)` through the lease service, with `at` from the wall clock and
`allocated_before` when the host was first seen gone (a lease placed after that,
on a host back just as the decision commits, is kept); the grace itself is
measured on trio's monotonic clock, so a wall-clock step neither fires nor
delays a decision. Every decision is logged at warning, and so are the clock
starting for a host (with the time left) and a host returning in time.

No host is marked lost while this leader sees fewer than half of the members
alive (`_view_trusted`): then its own gossip is the likelier fault.

A new leader starts with an empty policy (leadership starts this task afresh
on every term it leads), so the grace restarts from the new leader's own
observation: after a failover a lease is marked lost up to one grace period
late, never early. Gossip is each agent's own view, and a leader that only
just took over has not watched the host for any of the grace.

Error handling
--------------
A proposal that loses leadership (RaftError) ends quietly: this task is about
to be cancelled, and the next leader decides afresh. A refused MarkHostLost
(nothing live on the node any more: released meanwhile) is logged at info. Any
other failure (the state file refused the write) is logged with its traceback
and retried at the next poll, as the scheduler does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import trio

from coordinator.host_loss import HostLossPolicy
from coordinator.raft import RaftError

from agent.lease_service import LeaseService

log = logging.getLogger(__name__)

# How often gossip is read. The grace is minutes in production, so a second of
# lag is noise; deadlines within a poll are met exactly (see `run`).
POLL_S = 1.0


class HostLossWatcher:
    """Marks the leases of hosts gone from gossip for `grace_s` lost (leader only)."""

    def __init__(
        self,
        service: LeaseService,
        statuses: Callable[[], Mapping[str, str]],
        *,
        node: str,
        grace_s: float,
        poll_s: float = POLL_S,
    ) -> None:
        """`statuses` gives gossip's status of every member it lists, by node name.

        Raises ValueError unless grace_s > 0 (the app does not start the watcher at 0: off).
        """
        self._service = service
        self._statuses = statuses
        self.node = node
        self.grace_s = grace_s
        self.poll_s = poll_s
        HostLossPolicy(grace_s, node)  # validate now, not at the first election won
        self._trusted = True

    async def run(self) -> None:
        """Watch and decide until cancelled (when leadership is lost)."""
        policy = HostLossPolicy(self.grace_s, self.node)
        log.info("host-loss watcher: leases of a host gone from gossip for %gs will be marked lost", self.grace_s)
        while True:
            now = trio.current_time()
            due = self.observe(policy, now)
            if due and not self._view_trusted():
                due = []  # logged by _view_trusted; decided again at the next poll
            for node in due:
                await self._mark_lost(policy, node, now)
            # Wake at the next grace deadline when it falls within a poll. One
            # already passed is a node whose proposal just failed: retried at the
            # next poll, not in a busy loop.
            deadline = policy.next_deadline()
            wake = now + self.poll_s
            if deadline is not None and now < deadline < wake:
                wake = deadline
            await trio.sleep_until(wake)

    def _view_trusted(self) -> bool:
        """Whether this leader's gossip view may condemn a host: at least half of it is alive.

        A leader whose own UDP is cut (a firewall, a full conntrack table) still
        leads over Raft's TCP but sees every host dead, and would end every lease
        in the cluster while the jobs run on. Hosts really lost in that number
        (most of the cluster at once) are rare enough to wait, loudly, for an operator.
        """
        statuses = list(self._statuses().values())
        alive = sum(1 for status in statuses if status == "alive")
        trusted = alive * 2 >= len(statuses)
        if not trusted and self._trusted:
            log.error(
                "host-loss watcher: this leader sees only %d of %d members alive; its own gossip may be "
                "cut off, so no host's leases are marked lost until most members are alive again",
                alive,
                len(statuses),
            )
        self._trusted = trusted
        return trusted

    def observe(self, policy: HostLossPolicy, now: float) -> list[str]:
        """Feed the policy this moment's view; return the nodes whose leases are due to be marked lost."""
        statuses = self._statuses()
        holding: dict[str, int] = {}
        for alloc in self._service.table.allocations():
            holding[alloc.node] = holding.get(alloc.node, 0) + 1
        for node in policy.tracked():
            if node not in holding:
                policy.forget(node)
        for node in sorted(holding):
            status = statuses.get(node)
            seen = status or "no longer listed"
            change = policy.observe(node, status, now)
            if change == "gone":
                log.warning(
                    "host %s is %s in gossip and holds %d allocation(s); marking them lost in %gs "
                    "unless it returns",
                    node,
                    seen,
                    holding[node],
                    self.grace_s,
                )
            elif change == "back":
                log.info("host %s is %s again; its %d allocation(s) are kept", node, seen, holding[node])
        return policy.lost(now)

    async def _mark_lost(self, policy: HostLossPolicy, node: str, now: float) -> None:
        since = policy.gone_since(node)
        gone_for = 0.0 if since is None else now - since
        ids = [a.allocation_id for a in self._service.table.allocations() if a.node == node]
        log.warning(
            "host %s gone for %.1fs (grace %gs): marking its allocation(s) lost: %s",
            node,
            gone_for,
            self.grace_s,
            ", ".join(ids),
        )
        # Leases placed after the host was first seen gone are not its old tenants'.
        gone_at = time.time() - gone_for
        try:
            result = await self._service.mark_host_lost(node, allocated_before=gone_at)
        except RaftError as error:
            log.info("host %s: not marked lost (%s); the next leader decides afresh", node, error)
            return
        except Exception:
            log.exception("host %s: could not mark its allocations lost; retrying", node)
            return
        if result.error is not None:
            log.info("host %s: nothing marked lost (%s)", node, result.error)
        else:
            log.warning("host %s: %d allocation(s) marked lost: %s", node, len(result.affected), ", ".join(result.affected))
