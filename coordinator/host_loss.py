"""When a host that gossip stopped seeing counts as lost: the leader's grace-period policy.

Theory of operation
-------------------
Gossip (SWIM) tells every agent which members are alive, suspect, dead or
left; a dead or left member's GPUs already drop out of the scheduler's pool
(agent/cluster.py: ClusterRuntime.inventory). Its *leases*, though, stay live:
a host that is only cut off (a switch reboot, a flapping link) may come back
with its jobs still running, and ending their leases would hand the same GPUs
to someone else. So the leader waits a grace period, and only a host that
stays gone for all of it has its leases marked lost (MarkHostLost).

`HostLossPolicy` is that clock, with no I/O and no clock of its own: the
caller feeds it `observe(node, status, now)` and asks `lost(now)`.

- A host is *gone* while gossip lists it "dead" or "left", or no longer lists
  it at all (status None): a dead or left member is forgotten after
  `gossip_to_the_dead_time` (30 s on "lan"), far sooner than any sensible grace,
  and forgetting it must not restart its clock.
- Any other status ("alive", "suspect") means the host is, or may well be,
  running: its clock is dropped, and a later departure starts a fresh one.
  SWIM only leaves "dead" through a refutation, i.e. through "alive", so a
  suspect after dead means the host came back in between.
- The clock starts at the first observation of the host gone, not at the time
  gossip declared it dead: the policy lives in one leader's memory, so a new
  leader starts from scratch and a lease is never marked lost early because
  leadership moved (it may be marked up to one grace period late).
- The caller's own node is never reported: a leader does not declare itself
  lost, and its own gossip view of itself is always alive anyway.

`now` is any clock that only moves forward (the agent passes trio's monotonic
clock, so a wall-clock step neither fires nor delays a decision).
"""

from __future__ import annotations

import math
from typing import Literal

# Gossip statuses under which a host counts as gone. None (not listed) is gone too.
GONE_STATUSES = frozenset({"dead", "left"})

Transition = Literal["gone", "back"]


class HostLossPolicy:
    """Per-host grace clocks; `lost(now)` names the hosts gone for at least `grace_s`."""

    def __init__(self, grace_s: float, own_node: str) -> None:
        """Raises ValueError unless `grace_s` is a finite number > 0 (0 = off is the caller's to handle)."""
        if not (math.isfinite(grace_s) and grace_s > 0):
            raise ValueError(f"host-loss grace must be a finite number of seconds > 0, got {grace_s}")
        self.grace_s = grace_s
        self.own_node = own_node
        # Host -> when it was first observed gone (since its last return).
        self._gone_since: dict[str, float] = {}

    def observe(self, node: str, status: str | None, now: float) -> Transition | None:
        """Record gossip's `status` for `node` at `now` (None: gossip no longer lists it).

        Returns "gone" when this observation starts the node's clock, "back" when
        it stops a running one, else None (for the caller's log).
        """
        if node == self.own_node:
            return None
        if status is None or status in GONE_STATUSES:
            if node in self._gone_since:
                return None
            self._gone_since[node] = now
            return "gone"
        if self._gone_since.pop(node, None) is not None:
            return "back"
        return None

    def forget(self, node: str) -> None:
        """Stop tracking `node` (it holds nothing any more, so no decision is wanted)."""
        self._gone_since.pop(node, None)

    def gone_since(self, node: str) -> float | None:
        """When `node` was first observed gone, or None while it is not."""
        return self._gone_since.get(node)

    def tracked(self) -> list[str]:
        """The nodes whose clocks are running, sorted."""
        return sorted(self._gone_since)

    def lost(self, now: float) -> list[str]:
        """The nodes gone for at least the grace period at `now`, sorted.

        A node stays in this answer while it stays gone, so a proposal that
        failed (leadership lost, a refused entry) is retried by asking again.
        """
        return sorted(n for n, since in self._gone_since.items() if now - since >= self.grace_s)

    def next_deadline(self) -> float | None:
        """The earliest time a tracked node crosses the grace period, or None."""
        if not self._gone_since:
            return None
        return min(self._gone_since.values()) + self.grace_s
