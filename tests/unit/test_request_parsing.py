"""Request bodies into validated values: every field's type and bound, and how the request is built.

A client's mistake must come back as InvalidRequest (HTTP 400) naming the
field, never as a crash (a 500): the bad values below include the ones JSON
makes easy to send by accident (booleans for numbers, huge integers, strings
with a trailing newline).
"""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.errors import InvalidRequest, Unsatisfiable
from coordinator.model import AllocationRequest, Requirements
from coordinator.request_parsing import (
    MAX_GPU_COUNT,
    MAX_MEMORY_MB,
    AllocateBody,
    ReleaseBody,
    RenewBody,
    UsageQuery,
    build_request,
    parse_allocate_body,
    parse_release_body,
    parse_renew_body,
    parse_usage_query,
    split_over_nodes,
    valid_id,
)
from coordinator.workload import WorkloadEstimate, analyze_workload

ESTIMATE = WorkloadEstimate(
    required_gpus=4,
    min_memory_mb=16384,
    priority=5,
    max_utilization=90.0,
    estimate={"workload_type": "training", "method": "table"},
)


def invalid(body: object, match: str, code: str = "invalid_request") -> None:
    with pytest.raises(InvalidRequest, match=match) as info:
        parse_allocate_body(body)
    assert info.value.code == code
    assert info.value.http_status == 400


def build(body: dict[str, Any], *, default_ttl_s: float = 86400.0, max_ttl_s: float = 30 * 86400.0,
          decided_by: str = "analyzer") -> AllocationRequest:
    return build_request(
        parse_allocate_body(body),
        ESTIMATE,
        decided_by=decided_by,
        request_id="req-1",
        now=1000.0,
        default_ttl_s=default_ttl_s,
        max_ttl_s=max_ttl_s,
    )


# ---------------------------------------------------------------- allocate: defaults


def test_a_minimal_body_gets_the_defaults() -> None:
    """Only service_name given: generic workload, queue on, nothing else fixed."""
    assert parse_allocate_body({"service_name": "svc"}) == AllocateBody(
        service_name="svc",
        workload_type="generic",
        workload_data={},
        priority=None,
        gpu_count=None,
        min_memory_mb=None,
        max_utilization=None,
        ttl_seconds=None,
        queue=True,
        request_id=None,
        webhook_url=None,
        gpu_model=None,
        node=None,
    )


def test_every_field_is_read() -> None:
    """A full body is parsed field by field, constraints included."""
    body = parse_allocate_body({
        "service_name": "trainer.v2:main",
        "workload_type": "training",
        "workload_data": {"model_size": "large", "workflow_id": "wf-9"},
        "priority": 10,
        "gpu_count": 8,
        "min_memory_mb": 40960,
        "max_utilization": 50,
        "ttl_seconds": 600,
        "queue": False,
        "request_id": "job-42_a",
        "webhook_url": "https://hooks.example.com/gpu?x=1",
        "constraints": {"gpu_model": "H100", "node": "gpu-host-3"},
    })
    assert body == AllocateBody(
        service_name="trainer.v2:main",
        workload_type="training",
        workload_data={"model_size": "large", "workflow_id": "wf-9"},
        priority=10,
        gpu_count=8,
        min_memory_mb=40960,
        max_utilization=50.0,
        ttl_seconds=600.0,
        queue=False,
        request_id="job-42_a",
        webhook_url="https://hooks.example.com/gpu?x=1",
        gpu_model="H100",
        node="gpu-host-3",
    )
    assert body.workflow_id == "wf-9"
    assert body.fully_specified


def test_required_gpus_is_the_seeds_name_for_gpu_count() -> None:
    """required_gpus (the DeepAgents tool's name) sets gpu_count."""
    assert parse_allocate_body({"service_name": "s", "required_gpus": 2}).gpu_count == 2


def test_integral_floats_are_accepted_as_integers() -> None:
    """JSON 2.0 is the integer 2; 2.5 is not an integer."""
    assert parse_allocate_body({"service_name": "s", "gpu_count": 2.0}).gpu_count == 2
    invalid({"service_name": "s", "gpu_count": 2.5}, "gpu_count must be an integer")


def test_service_name_may_default_for_analysis_only() -> None:
    """/gpu/workload needs no service_name; /gpu/allocate does."""
    assert parse_allocate_body({}, require_service=False).service_name == "analysis"
    invalid({}, "service_name is required")


def test_an_empty_webhook_url_means_none() -> None:
    """webhook_url "" is the same as leaving it out."""
    assert parse_allocate_body({"service_name": "s", "webhook_url": ""}).webhook_url is None


# ---------------------------------------------------------------- allocate: errors


@pytest.mark.parametrize("field", ["priority", "gpu_count", "required_gpus", "min_memory_mb"])
@pytest.mark.parametrize("value", [True, False, "2", [2], {"n": 2}, float("nan"), float("inf")])
def test_integer_fields_reject_non_integers(field: str, value: object) -> None:
    """Booleans, strings, lists, objects, NaN and infinity are not integers."""
    invalid({"service_name": "s", field: value}, f"{field} must be an integer")


@pytest.mark.parametrize(
    ("field", "value", "bounds"),
    [
        ("priority", 0, "between 1 and 10"),
        ("priority", 11, "between 1 and 10"),
        ("priority", -5, "between 1 and 10"),
        ("gpu_count", 0, f"between 1 and {MAX_GPU_COUNT}"),
        ("gpu_count", -1, f"between 1 and {MAX_GPU_COUNT}"),
        ("gpu_count", MAX_GPU_COUNT + 1, f"between 1 and {MAX_GPU_COUNT}"),
        ("gpu_count", 10**30, f"between 1 and {MAX_GPU_COUNT}"),
        ("gpu_count", 1e300, f"between 1 and {MAX_GPU_COUNT}"),
        ("required_gpus", 0, f"between 1 and {MAX_GPU_COUNT}"),
        ("min_memory_mb", -1, f"between 0 and {MAX_MEMORY_MB}"),
        ("min_memory_mb", MAX_MEMORY_MB + 1, f"between 0 and {MAX_MEMORY_MB}"),
    ],
)
def test_integer_fields_are_bounded(field: str, value: object, bounds: str) -> None:
    """Counts, priority and memory outside their ranges are refused with the range in the message."""
    invalid({"service_name": "s", field: value}, f"{field} must be {bounds}")


@pytest.mark.parametrize(("field", "value"), [("priority", 1), ("priority", 10), ("gpu_count", MAX_GPU_COUNT),
                                              ("min_memory_mb", 0), ("min_memory_mb", MAX_MEMORY_MB)])
def test_integer_bounds_are_inclusive(field: str, value: int) -> None:
    """The ends of each range are valid values."""
    assert getattr(parse_allocate_body({"service_name": "s", field: value}), field) == value


@pytest.mark.parametrize("field", ["max_utilization", "ttl_seconds"])
@pytest.mark.parametrize("value", [True, "60", float("nan"), float("inf"), [1]])
def test_number_fields_reject_non_numbers(field: str, value: object) -> None:
    """Booleans, strings, lists, NaN and infinity are not numbers."""
    invalid({"service_name": "s", field: value}, f"{field} must be a finite number")


@pytest.mark.parametrize("field", ["priority", "gpu_count", "min_memory_mb", "max_utilization", "ttl_seconds",
                                   "request_id", "webhook_url"])
def test_null_means_not_given(field: str) -> None:
    """An explicit JSON null leaves an optional field unset."""
    assert getattr(parse_allocate_body({"service_name": "s", field: None}), field) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_utilization", -0.1, "max_utilization must be between 0 and 100"),
        ("max_utilization", 100.5, "max_utilization must be between 0 and 100"),
        ("ttl_seconds", -1, "ttl_seconds must be at least 0"),
    ],
)
def test_number_fields_are_bounded(field: str, value: float, message: str) -> None:
    """Utilization is a percentage; a TTL cannot be negative."""
    invalid({"service_name": "s", field: value}, message)


@pytest.mark.parametrize("field", ["max_utilization", "ttl_seconds"])
def test_an_integer_too_large_for_a_float_is_invalid_not_a_crash(field: str) -> None:
    """A 400-digit integer (valid JSON) is refused as out of range, not an OverflowError."""
    invalid({"service_name": "s", field: 10**400}, field)


def test_unknown_fields_are_refused_by_name() -> None:
    """A misspelt field is an error naming it, not silently ignored."""
    invalid({"service_name": "s", "gpu_cuont": 2}, r"unknown field\(s\) gpu_cuont", code="unknown_field")
    invalid({"service_name": "s", "constraints": {"zone": "a"}}, r"unknown constraint\(s\) zone",
            code="unknown_field")


def test_gpu_count_and_required_gpus_together_are_refused() -> None:
    """Both names for the GPU count at once is ambiguous; a null one is not given (OpenAPI says the same)."""
    invalid({"service_name": "s", "gpu_count": 1, "required_gpus": 1}, "gpu_count or required_gpus, not both")
    assert parse_allocate_body({"service_name": "s", "gpu_count": 2, "required_gpus": None}).gpu_count == 2
    assert parse_allocate_body({"service_name": "s", "gpu_count": None, "required_gpus": 3}).gpu_count == 3


def test_null_object_fields_take_their_defaults() -> None:
    """null means "not given" for workload_type, workload_data, constraints and queue too."""
    body = parse_allocate_body(
        {"service_name": "s", "workload_type": None, "workload_data": None, "constraints": None, "queue": None}
    )
    assert (body.workload_type, body.workload_data, body.gpu_model, body.queue) == ("generic", {}, None, True)


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com",
        "https://hooks.example.com:8443/gpu?x=1&y=%20#frag",
        "http://10.0.0.5:80/",
        "http://[::1]:9000/hook",
        "http://[2001:db8::8a2e:370:7334]/",
        "https://user:pw@example.com./a",
    ],
)
def test_webhook_urls_that_are_accepted(url: str) -> None:
    assert parse_allocate_body({"service_name": "s", "webhook_url": url}).webhook_url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",  # the sweep's unclosed IPv6 bracket
        "http://[1:2:3]/",  # not an IPv6 address
        "http://exa mple.com/",
        "http://example.com/a b",
        "http://example.com/\x00",
        "http://example.com/\n",
        "http://example.com/\u00e9",
        "http://example.com:65536/",
        "http://example.com:/",
        "http:///path",
        "ftp://example.com/",
        "//example.com/",
        "http://-bad-.com/",
        "https://" + "a" * 2050 + ".com",
    ],
)
def test_webhook_urls_that_are_refused(url: str) -> None:
    invalid({"service_name": "s", "webhook_url": url}, "webhook_url must be an http:// or https:// URL")


@pytest.mark.parametrize("value", ["quantum", "Training", "", 3])
def test_an_unknown_workload_type_is_refused(value: object) -> None:
    """workload_type must be one of the analyzer's six types."""
    invalid({"service_name": "s", "workload_type": value}, "workload_type must be one of",
            code="unknown_workload_type")


@pytest.mark.parametrize("field", ["service_name", "request_id"])
@pytest.mark.parametrize(
    "value",
    ["", "-lead", ".hidden", "has space", "slash/y", "semi;colon", "new\nline", "trailing\n", "é", "x" * 129, 5,
     True],
)
def test_names_allow_only_safe_characters(field: str, value: object) -> None:
    """service_name and request_id: 1-128 of letters, digits, . _ : - starting alphanumeric."""
    body: dict[str, Any] = {"service_name": "s", field: value}
    invalid(body, field)


def test_a_name_may_be_128_characters() -> None:
    """The length limit is inclusive."""
    name = "a" * 128
    body = parse_allocate_body({"service_name": name, "request_id": name})
    assert (body.service_name, body.request_id) == (name, name)


@pytest.mark.parametrize(
    "url",
    ["ftp://host/x", "http://", "https:///path", "hooks.example.com", "http://host/with space",
     "http://host/x\n", "javascript:alert(1)", "http://" + "h" * 2048, 7, True, ["http://x"]],
)
def test_a_webhook_url_must_be_http_or_https(url: object) -> None:
    """webhook_url must be an absolute http(s) URL of sane length without whitespace."""
    invalid({"service_name": "s", "webhook_url": url}, "webhook_url must be an http:// or https:// URL")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "request body must be a JSON object"),
        ("s", "request body must be a JSON object"),
        (None, "request body must be a JSON object"),
        ({"service_name": "s", "workload_data": [1]}, "workload_data must be a JSON object"),
        ({"service_name": "s", "constraints": "H100"}, "constraints must be a JSON object"),
        ({"service_name": "s", "queue": "false"}, "queue must be true or false"),
        ({"service_name": "s", "queue": 0}, "queue must be true or false"),
        ({"service_name": "s", "constraints": {"gpu_model": ""}}, "constraints.gpu_model must be"),
        ({"service_name": "s", "constraints": {"node": 3}}, "constraints.node must be"),
        ({"service_name": "s", "constraints": {"node": "n" * 257}}, "constraints.node must be"),
    ],
)
def test_structural_errors_name_the_field(body: object, message: str) -> None:
    """Wrong shapes for the body and its object and boolean fields are refused by name."""
    invalid(body, message)


# ---------------------------------------------------------------- build_request


def test_the_estimate_fills_what_the_caller_left_out() -> None:
    """Without explicit figures the estimate decides count, memory, priority and utilization."""
    request = build({"service_name": "svc", "workload_type": "training",
                     "workload_data": {"model_size": "large", "workflow_id": "wf-1"}})
    assert request == AllocationRequest(
        request_id="req-1",
        service_name="svc",
        workload_type="training",
        priority=5,
        requirements=Requirements(gpu_count=4, min_memory_mb=16384, max_utilization=90.0),
        ttl_s=86400.0,
        submitted_at=1000.0,
        queue=True,
        workload_data={"model_size": "large", "workflow_id": "wf-1"},
        webhook_url=None,
        workflow_id="wf-1",
        decided_by="analyzer",
        estimate={"workload_type": "training", "method": "table"},
    )


def test_explicit_fields_override_the_estimate() -> None:
    """A field the caller gives wins over the estimate's; the rest still come from the estimate."""
    request = build({"service_name": "svc", "gpu_count": 1, "max_utilization": 30,
                     "constraints": {"gpu_model": "A100", "node": "n2"}, "queue": False},
                    decided_by="advisor")
    assert request.requirements == Requirements(
        gpu_count=1, min_memory_mb=16384, max_utilization=30.0, gpu_model="A100", node="n2"
    )
    assert request.priority == 5
    assert request.queue is False
    assert request.decided_by == "advisor"


def test_count_memory_and_priority_given_means_decided_by_request() -> None:
    """When the caller fixed count, memory and priority, decided_by is "request" whatever was passed."""
    request = build({"service_name": "svc", "gpu_count": 2, "min_memory_mb": 0, "priority": 9},
                    decided_by="advisor")
    assert (request.requirements.gpu_count, request.requirements.min_memory_mb, request.priority) == (2, 0, 9)
    assert request.requirements.max_utilization == 90.0
    assert request.decided_by == "request"
    # Two of the three are not enough.
    assert build({"service_name": "svc", "gpu_count": 2, "priority": 9}).decided_by == "analyzer"


def test_the_analyzers_own_estimate_builds_a_request() -> None:
    """build_request composes with analyze_workload for the seed's generic defaults."""
    body = parse_allocate_body({"service_name": "svc"})
    request = build_request(body, analyze_workload(body.workload_type, body.workload_data),
                            decided_by="analyzer", request_id="r", now=5.0,
                            default_ttl_s=60.0, max_ttl_s=3600.0)
    assert request.requirements == Requirements(1, 4096, 80.0)
    assert (request.priority, request.ttl_s, request.submitted_at) == (5, 60.0, 5.0)


@pytest.mark.parametrize(("ttl", "expected"), [(None, 86400.0), (60, 60.0), (2_592_000, 2_592_000.0)])
def test_ttl_defaults_and_explicit_values(ttl: int | None, expected: float) -> None:
    """No ttl_seconds takes the default; an explicit one up to the maximum is kept."""
    body: dict[str, Any] = {"service_name": "svc"}
    if ttl is not None:
        body["ttl_seconds"] = ttl
    assert build(body).ttl_s == expected


def test_a_ttl_above_the_maximum_is_refused() -> None:
    """ttl_seconds above max_ttl_s is a 400 that states the maximum."""
    with pytest.raises(InvalidRequest, match="at most 3600"):
        build({"service_name": "svc", "ttl_seconds": 3601}, default_ttl_s=60.0, max_ttl_s=3600.0)


def test_a_never_expiring_lease_is_refused_under_a_cap() -> None:
    """ttl_seconds 0 (never) would defeat max_ttl_s, so with a cap it is a 400 too."""
    with pytest.raises(InvalidRequest, match="more than 0 and at most 3600"):
        build({"service_name": "svc", "ttl_seconds": 0}, default_ttl_s=60.0, max_ttl_s=3600.0)


def test_a_max_ttl_of_zero_means_no_limit() -> None:
    """max_ttl_s = 0 is "no limit" (docs/configuration.md), so any ttl_seconds is allowed."""
    request = build({"service_name": "svc", "ttl_seconds": 10**9}, default_ttl_s=0.0, max_ttl_s=0.0)
    assert request.ttl_s == 1e9
    assert build({"service_name": "svc"}, default_ttl_s=0.0, max_ttl_s=0.0).ttl_s == 0.0


# ---------------------------------------------------------------- release and renew


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"allocation_id": "svc-00ff"}, ReleaseBody(allocation_id="svc-00ff")),
        ({"service_name": "svc"}, ReleaseBody(service_name="svc")),
        ({"request_id": "job-1"}, ReleaseBody(request_id="job-1")),
        ({"request_id": "job-1", "allocation_id": None}, ReleaseBody(request_id="job-1")),
    ],
)
def test_release_takes_exactly_one_selector(body: dict[str, Any], expected: ReleaseBody) -> None:
    """A release body names one of allocation_id, service_name or request_id."""
    assert parse_release_body(body) == expected


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        ({}, "exactly one of", "invalid_request"),
        ({"allocation_id": "a", "service_name": "s"}, "exactly one of", "invalid_request"),
        ({"allocation_id": "a", "gpu": 0}, r"unknown field\(s\) gpu", "unknown_field"),
        ({"allocation_id": 7}, "allocation_id is required and must be a non-empty string", "invalid_request"),
        ({"allocation_id": ""}, "allocation_id is required", "invalid_request"),
        ({"service_name": "bad name"}, "service_name must be 1-128 characters", "invalid_request"),
        ({"request_id": "x\n"}, "request_id must be 1-128 characters", "invalid_request"),
        (["a"], "request body must be a JSON object", "invalid_request"),
    ],
)
def test_release_errors(body: object, message: str, code: str) -> None:
    """Zero or several selectors, unknown fields and bad ids are refused."""
    with pytest.raises(InvalidRequest, match=message) as info:
        parse_release_body(body)
    assert info.value.code == code


def test_renew_takes_an_allocation_id_and_an_optional_ttl() -> None:
    """ttl_seconds may be left out (default TTL) or 0 (never expires)."""
    assert parse_renew_body({"allocation_id": "a-1"}) == RenewBody("a-1", None)
    assert parse_renew_body({"allocation_id": "a-1", "ttl_seconds": 0}) == RenewBody("a-1", 0.0)
    assert parse_renew_body({"allocation_id": "a-1", "ttl_seconds": 90.5}) == RenewBody("a-1", 90.5)


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        ({}, "allocation_id is required", "invalid_request"),
        ({"ttl_seconds": 5}, "allocation_id is required", "invalid_request"),
        ({"allocation_id": "a", "ttl_seconds": "long"}, "ttl_seconds must be a finite number", "invalid_request"),
        ({"allocation_id": "a", "ttl_seconds": True}, "ttl_seconds must be a finite number", "invalid_request"),
        ({"allocation_id": "a", "ttl_seconds": -1}, "ttl_seconds must be at least 0", "invalid_request"),
        ({"allocation_id": "a", "ttl_seconds": 10**400}, "ttl_seconds", "invalid_request"),
        ({"allocation_id": "a", "extra": 1}, r"unknown field\(s\) extra", "unknown_field"),
        ({"allocation_id": "a/b"}, "allocation_id must be 1-128 characters", "invalid_request"),
    ],
)
def test_renew_errors(body: object, message: str, code: str) -> None:
    """A renew body without a valid allocation_id, or with a bad ttl or extra field, is refused."""
    with pytest.raises(InvalidRequest, match=message) as info:
        parse_renew_body(body)
    assert info.value.code == code


@pytest.mark.parametrize(("value", "ok"), [("svc-0123abcd", True), ("a", True), ("a" * 128, True),
                                           ("a" * 129, False), ("", False), ("../x", False), ("x\n", False)])
def test_valid_id_for_path_parameters(value: str, ok: bool) -> None:
    """valid_id applies the request-id rule to ids taken from URL paths."""
    assert valid_id(value) is ok


def test_a_drain_node_must_be_a_node_name_and_null_means_this_agent() -> None:
    """node: "" or a non-name is a 400 (the OpenAPI pattern says so); null and absent mean this agent."""
    from coordinator.request_parsing import parse_drain_body

    assert parse_drain_body({"index": 0, "node": None}, default_node="me", draining=False).node == "me"
    assert parse_drain_body({"index": 0, "reason": ""}, default_node="me", draining=True).reason == ""
    for node in ("", "a/b", "x" * 129, 7):
        with pytest.raises(InvalidRequest, match="node must be a node name"):
            parse_drain_body({"index": 0, "node": node}, default_node="me", draining=True)
    with pytest.raises(InvalidRequest, match="reason"):
        parse_drain_body({"index": 0, "reason": "r" * 257}, default_node="me", draining=True)


# ---------------------------------------------------------------- GET /usage

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    "args, since, until, by",
    [
        ({}, NOW - 86_400, NOW, "service"),
        ({"since": "7d", "by": "queue"}, NOW - 7 * 86_400, NOW, "queue"),
        ({"since": "90m", "until": "30m"}, NOW - 5400, NOW - 1800, "service"),
        ({"since": "2026-12-01T00:00:00Z", "until": "2026-12-01T01:00:00+01:00"}, 1_796_083_200.0, 1_796_083_200.0, "service"),
        ({"since": "1796083200.5", "until": "1796083260"}, 1_796_083_200.5, 1_796_083_260.0, "service"),
        # Clamped to 1970 ... 1e11: a duration reaching before 1970 means from the start.
        ({"since": "999999999d", "until": "0001-01-01T00:00:00Z"}, 0.0, 0.0, "service"),
        ({"until": "9999-12-31T23:59:59Z"}, 1e11 - 86_400, 1e11, "service"),
    ],
)
def test_usage_query_takes_rfc3339_unix_seconds_or_durations(args: dict[str, str], since: float, until: float, by: str) -> None:
    assert parse_usage_query(args, NOW) == UsageQuery(since, until, by)


@pytest.mark.parametrize(
    "args",
    [
        {"since": "yesterday"},
        {"since": "-5"},
        {"since": "1e400"},
        {"since": "2026-02-30T00:00:00Z"},
        {"since": "2026-12-01T00:00:00"},  # no offset: which zone is meant?
        {"since": "1h", "until": "2h"},
        {"by": "node"},
        {"since": "99999999999999"},
        {"since": "1796083200\n"},
        {"since": "2026-12-01T00:00:00+24:00"},
    ],
)
def test_usage_query_refuses_what_it_cannot_read(args: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_usage_query(args, NOW)
    assert refused.value.code == "invalid_request"


def test_an_integer_a_log_entry_cannot_carry_is_refused_in_workload_data() -> None:
    """workload_data travels in the request's log entry (msgpack: 64-bit integers); a larger one is a 400,
    not an entry that cannot be encoded (which stopped the agent's log)."""
    assert parse_allocate_body({"service_name": "svc", "workload_data": {"n": 2**64 - 1, "m": -(2**63)}})
    for big in (2**64, -(2**63) - 1):
        invalid({"service_name": "svc", "workload_data": {"deep": [{"n": big}]}}, "workload_data holds an integer outside",
                code="integer_out_of_range")


# ---------------------------------------------------------------- gangs (docs/shapes.md)


def test_a_gang_body_becomes_per_node_requirements() -> None:
    request = build({"service_name": "trainer", "nodes": 2, "gpus_per_node": 4})
    assert request.requirements.nodes == 2
    assert request.requirements.gpu_count == 4
    assert request.requirements.total_gpus == 8


def test_one_node_of_gpus_per_node_is_an_ordinary_request() -> None:
    request = build({"service_name": "trainer", "nodes": 1, "gpus_per_node": 4})
    assert request.requirements == Requirements(4, request.requirements.min_memory_mb, request.requirements.max_utilization)


@pytest.mark.parametrize(
    ("total", "most_per_node", "shape"),
    [(24, 8, (3, 8)), (12, 8, (2, 6)), (10, 4, (3, 4)), (7, 8, (1, 7)), (8, 8, (1, 8)), (9, 1, (9, 1))],
)
def test_a_total_is_split_over_the_fewest_nodes_evenly(total: int, most_per_node: int, shape: tuple[int, int]) -> None:
    assert split_over_nodes(total, most_per_node) == shape
    nodes, each = shape
    assert each <= most_per_node and nodes * each >= total and (nodes - 1) * most_per_node < total


def test_gpus_per_node_alone_sizes_a_gang_from_the_analyzers_count() -> None:
    """A 70B training job the analyzer sizes at 24 GPUs becomes 3 nodes x 8, not a refusal."""
    body = {"service_name": "trainer", "workload_type": "training", "workload_data": {"params_b": 70}}
    estimate = analyze_workload("training", body["workload_data"])
    assert estimate.required_gpus == 24
    request = build_request(
        parse_allocate_body({**body, "gpus_per_node": 8}),
        estimate,
        decided_by="analyzer",
        request_id="req-1",
        now=0.0,
        default_ttl_s=60.0,
        max_ttl_s=0.0,
    )
    assert (request.requirements.nodes, request.requirements.gpu_count) == (3, 8)
    assert request.requirements.min_memory_mb == estimate.min_memory_mb
    assert request.decided_by == "analyzer"


def test_gpus_per_node_alone_splits_an_explicit_total() -> None:
    assert build({"service_name": "s", "gpu_count": 12, "gpus_per_node": 8}).requirements.total_gpus == 12
    assert (build({"service_name": "s", "gpu_count": 12, "gpus_per_node": 8}).requirements.nodes) == 2
    # The ESTIMATE's 4 GPUs fit on one node of at most 8: an ordinary request of 4.
    assert build({"service_name": "s", "gpus_per_node": 8}).requirements == Requirements(4, 16384, 90.0)


def test_a_sized_gang_pinned_to_one_node_is_unsatisfiable_only_when_it_spans_nodes() -> None:
    pinned = {"service_name": "s", "gpus_per_node": 4, "constraints": {"node": "n1"}}
    assert build({**pinned, "gpu_count": 4}).requirements.node == "n1"
    with pytest.raises(Unsatisfiable, match="cannot pin a gang") as info:
        build({**pinned, "gpu_count": 8})
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"service_name": "s", "nodes": 2}, "needs gpus_per_node"),
        ({"service_name": "s", "gpus_per_node": 2, "mig_profile": "auto"}, "mig_profile cannot"),
        ({"service_name": "s", "nodes": 2, "gpus_per_node": 2, "gpu_count": 4}, "not gpu_count"),
        ({"service_name": "s", "nodes": 2, "gpus_per_node": 2, "constraints": {"node": "n1"}}, "constraints.node"),
        ({"service_name": "s", "nodes": 2, "gpus_per_node": 1, "mig_profile": "1g.10gb"}, "mig_profile cannot"),
        ({"service_name": "s", "nodes": 1, "gpus_per_node": 1, "mig_profile": "auto"}, "mig_profile cannot"),
    ],
)
def test_an_incomplete_or_ambiguous_gang_is_refused(body: dict[str, Any], match: str) -> None:
    invalid(body, match, code="invalid_gang")


@pytest.mark.parametrize("nodes", [0, 257, True, "2"])
def test_a_gang_node_count_out_of_bounds_is_refused(nodes: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_allocate_body({"service_name": "s", "nodes": nodes, "gpus_per_node": 2})
    assert info.value.http_status == 400
