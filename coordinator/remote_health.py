"""Which GPU health verdicts that other hosts gossip the leader records in the lease table.

Theory of operation
-------------------
Each agent's health policy (coordinator/gpu_health.py) decides its own GPUs'
health and gossips the verdict; only the leader may write the table, so it
copies what the others announce. Recording a verdict is what tells a lease
holder that its remote GPU failed (the table's `gpu_unhealthy` event).

`RemoteHealthPolicy.decide` compares one GPU's gossiped verdict with the
table's record and returns the verdict to propose, or None:

- equal verdicts need nothing (the record is compared as gossip would carry
  it, reasons cut short, so a verdict a host recorded in full while it led is
  not proposed again for nothing);
- an unhealthy record is kept for `quiet_s` (the health policy's quiet period)
  from when this leader first saw it, even if the host now gossips healthy: its
  own policy would not have lifted it so soon, so the host restarted and forgot
  (a client holds no replica to restore it from);
- otherwise the gossiped verdict is recorded.

The policy lives in one leader's memory: a new leader starts its clocks afresh,
so a verdict may be lifted late, never early. `now` is any clock that only
moves forward (the agent passes trio's monotonic clock).
"""

from __future__ import annotations

from coordinator.model import UNHEALTHY, GpuRef

Verdict = tuple[str, tuple[str, ...]]


class RemoteHealthPolicy:
    """Per-GPU memory of unhealthy records; `decide` says what to record."""

    def __init__(self, quiet_s: float) -> None:
        self.quiet_s = quiet_s
        # GPU -> when this leader first saw the table hold it unhealthy.
        self._unhealthy_since: dict[GpuRef, float] = {}

    def decide(self, gpu: GpuRef, gossiped: Verdict, recorded: Verdict, now: float) -> Verdict | None:
        """The verdict to propose for `gpu`, or None to leave the record as it is.

        `recorded` is the table's verdict with its reasons as gossip would carry them.
        """
        if recorded[0] == UNHEALTHY:
            since = self._unhealthy_since.setdefault(gpu, now)
        else:
            self._unhealthy_since.pop(gpu, None)
        if recorded == gossiped:
            return None
        if recorded[0] == UNHEALTHY and gossiped[0] != UNHEALTHY and now - since < self.quiet_s:
            return None  # lifted before its quiet period: the host forgot it, the leader has not
        return gossiped
