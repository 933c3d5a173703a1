"""Which lifecycle events are delivered where: a request's webhook and the graph service.

Every applied log entry's events pass through `deliveries`, on every server
(the outbox rows are derived from the log, so a replay re-derives the same
rows and a new leader finds them). The rule:

- The **webhook** of a request hears what its caller cannot see from its own
  answer: the outcome of a queued request (the caller was told 202 and waits:
  allocated or cancelled), a lease's expiry, a GPU under the lease turning
  unhealthy, a lease lost with its host (the holder may not even know its
  host is gone), and a preemption: `lease_preempting` when the grace period
  starts (release early, or lose the GPUs at `deadline`) and `preempted` when
  it ends the lease. An allocation answered 200 is not repeated to the webhook.
- The **graph service**, when configured, hears every event, with the node
  that decided it.

Each delivery is keyed by (log index, position of the event in the entry,
kind), which `delivery_id` spells out: the same entry always yields the same
ids, so storing them with INSERT OR IGNORE never duplicates a delivery.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.model import LeaseEvent
from coordinator.views import JsonObject, graph_event, webhook_payload

WEBHOOK_KINDS = frozenset({"allocated", "expired", "cancelled", "gpu_unhealthy", "lost", "preempting", "preempted"})


@dataclass(frozen=True, slots=True)
class Delivery:
    """One POST the outbox owes: to `url`, of `payload`, for the event at (log_index, seq)."""

    id: str
    log_index: int
    kind: str  # "webhook" or "graph"
    url: str
    payload: JsonObject
    created_at: float


def delivery_id(log_index: int, seq: int, kind: str) -> str:
    return f"{log_index}.{seq}.{kind}"


def deliveries(
    log_index: int, events: tuple[LeaseEvent, ...], node: str, graph_url: str | None
) -> list[Delivery]:
    """The deliveries the events of one applied entry cause (see the module docstring)."""
    out: list[Delivery] = []
    for seq, event in enumerate(events):
        webhook = event.request.webhook_url
        if webhook and event.kind in WEBHOOK_KINDS and (event.was_queued or event.kind != "allocated"):
            out.append(
                Delivery(delivery_id(log_index, seq, "webhook"), log_index, "webhook", webhook, webhook_payload(event), event.at)
            )
        if graph_url:
            out.append(
                Delivery(delivery_id(log_index, seq, "graph"), log_index, "graph", graph_url, graph_event(event, node), event.at)
            )
    return out
