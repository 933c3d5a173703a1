"""Which queue a request goes to, and the terms it is checked against there (SPEC "Sharing the fleet").

A request's queue is its API key's when the key names one, else its service's
mapping, else `default`. Above the queue's priority ceiling is 403
priority_ceiling; `preemptible: false` where no guarantee could ever cover it is 400.
"""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.errors import Forbidden, InvalidRequest
from coordinator.queues import UNCONFIGURED, QueuePolicy, QueueSpec
from coordinator.request_parsing import build_request, parse_allocate_body, queue_for
from coordinator.workload import WorkloadEstimate

POLICY = QueuePolicy.of(
    [
        QueueSpec("research", guaranteed_gpus=8),
        QueueSpec("vision", parent="research", guaranteed_by_model=(("H100", 4),), services=("detector",)),
        QueueSpec("interactive", guaranteed_gpus=2, max_priority=6, services=("notebook",)),
        QueueSpec("batch", services=("nightly",)),
    ]
)
ESTIMATE = WorkloadEstimate(required_gpus=1, min_memory_mb=1024, priority=8, max_utilization=80.0, estimate={})


def body(**fields: Any) -> Any:
    return parse_allocate_body({"service_name": "svc", **fields})


def test_preemptible_is_a_boolean_defaulting_to_true() -> None:
    assert body().preemptible is True
    assert body(preemptible=None).preemptible is True
    assert body(preemptible=False).preemptible is False
    bad: object
    for bad in (0, 1, "false", [], {}):
        with pytest.raises(InvalidRequest, match="preemptible must be true or false") as refused:
            body(preemptible=bad)
        assert refused.value.http_status == 400


def test_without_queues_everything_goes_to_default_unchecked() -> None:
    """The drop-in default: no queue configured refuses nothing that was accepted before."""
    spec = queue_for(body(priority=10, preemptible=False), UNCONFIGURED, key_queue="research")
    assert spec == QueueSpec("default")


def test_the_service_mapping_picks_the_queue_and_unmapped_services_go_to_default() -> None:
    assert queue_for(body(service_name="notebook"), POLICY).name == "interactive"
    assert queue_for(body(service_name="detector"), POLICY).name == "vision"
    assert queue_for(body(service_name="someone-else"), POLICY).name == "default"


def test_the_api_keys_queue_wins_over_the_service_mapping() -> None:
    assert queue_for(body(service_name="notebook"), POLICY, key_queue="batch").name == "batch"
    assert queue_for(body(service_name="notebook"), POLICY, key_queue="default").name == "default"


def test_a_key_naming_an_undeclared_or_parent_queue_is_refused() -> None:
    with pytest.raises(Forbidden, match="names queue 'ghost', which the cluster's queue policy does not declare") as refused:
        queue_for(body(), POLICY, key_queue="ghost")
    assert (refused.value.code, refused.value.http_status) == ("unknown_queue", 403)
    with pytest.raises(Forbidden, match=r"queue 'research' has child queues \(vision\)") as refused:
        queue_for(body(), POLICY, key_queue="research")
    assert refused.value.code == "parent_queue"


def test_a_priority_above_the_queues_ceiling_is_403_naming_the_limit() -> None:
    assert queue_for(body(service_name="notebook", priority=6), POLICY).name == "interactive"
    with pytest.raises(Forbidden, match="priority 7 is above the ceiling of queue 'interactive': max_priority 6") as refused:
        queue_for(body(service_name="notebook", priority=7), POLICY)
    assert (refused.value.code, refused.value.http_status) == ("priority_ceiling", 403)


def test_an_estimated_priority_is_capped_at_the_ceiling_not_refused() -> None:
    """The caller did not ask for priority 8; the analyzer did: the request runs at the ceiling."""
    request_body = body(service_name="notebook")
    spec = queue_for(request_body, POLICY)
    request = build_request(
        request_body, ESTIMATE, decided_by="analyzer", request_id="r", now=0.0, default_ttl_s=60.0, max_ttl_s=0.0, queue=spec
    )
    assert (request.priority, request.queue_name, request.preemptible) == (6, "interactive", True)


def test_not_preemptible_needs_a_guarantee_that_could_cover_it() -> None:
    """Within a guarantee or never placed: so a queue (or model) with none is told at once."""
    assert queue_for(body(service_name="notebook", preemptible=False), POLICY).name == "interactive"
    with pytest.raises(InvalidRequest, match="queue 'batch' has none for this request: it guarantees no GPUs") as refused:
        queue_for(body(service_name="nightly", preemptible=False), POLICY)
    assert (refused.value.code, refused.value.http_status) == ("preemptible_without_guarantee", 400)
    # Per-model guarantees: only a request naming a covered model can be within them.
    with_model = body(service_name="detector", preemptible=False, constraints={"gpu_model": "H100"})
    assert queue_for(with_model, POLICY).name == "vision"
    with pytest.raises(InvalidRequest, match="names no GPU model its per-model guarantees cover"):
        queue_for(body(service_name="detector", preemptible=False), POLICY)


def test_the_built_request_carries_its_queue_and_preemptibility() -> None:
    request_body = body(service_name="notebook", preemptible=False, priority=3)
    request = build_request(
        request_body,
        ESTIMATE,
        decided_by="analyzer",
        request_id="r",
        now=0.0,
        default_ttl_s=60.0,
        max_ttl_s=0.0,
        queue=queue_for(request_body, POLICY),
    )
    assert (request.queue_name, request.preemptible, request.priority) == ("interactive", False, 3)
    # Without a queue (callers that predate queues): default, preemptible as asked.
    plain = build_request(body(), ESTIMATE, decided_by="analyzer", request_id="r", now=0.0, default_ttl_s=60.0, max_ttl_s=0.0)
    assert (plain.queue_name, plain.preemptible, plain.priority) == ("default", True, 8)
