"""The OpenAPI 3.1 description served at GET /openapi.json: the API's contract.

Kept true by two tests. tests/integration/test_http_api.py: the routes and
methods here equal the app's, and every (route, method, status) documented here
is produced by its tests, and nothing else. tests/integration/test_openapi_contract.py
runs schemathesis against a live agent (auth on and off): every request the
schemas below allow must be accepted, every one they forbid refused with a 4xx,
and every answer must match its response schema.

So the request schemas state exactly what coordinator/request_parsing.py checks:
the same id and URL patterns (imported, not copied), the same bounds, `null`
allowed wherever the server reads null as "not given", and the document depends
on the agent's configuration where the checks do (the TTL cap, the auth header).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from coordinator.mig import MAX_UNIT_INDEX, PROFILE_PATTERN
from coordinator.model import MIG_ANY
from coordinator.request_parsing import (
    MAX_GANG_NODES,
    MAX_GPU_COUNT,
    MAX_MEMORY_MB,
    MAX_TEXT_LENGTH,
    MAX_URL_LENGTH,
    DURATION_PATTERN,
    RFC3339_PATTERN,
    UNIX_SECONDS_PATTERN,
    WEBHOOK_URL_PATTERN,
)
from coordinator.pending_reasons import REASONS
from coordinator.workload import WORKLOAD_TYPES

JsonObject = dict[str, Any]

_ERROR_TEXT = {
    400: "Invalid request (bad JSON, wrong types, out of bounds, can never fit)",
    401: "Missing or invalid API key (auth enabled)",
    403: "The API key may not act for this service (allocate: or the priority is above its queue's "
    "max_priority, code priority_ceiling)",
    404: "Unknown id",
    409: "Conflict (no capacity with queue=false, or the request_id was already used)",
    413: "Request body too large",
    503: "Queue full or state file unavailable; retry after Retry-After seconds",
}


def _ref(name: str) -> JsonObject:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: JsonObject, description: str) -> JsonObject:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    ok: dict[int, JsonObject],
    errors: tuple[int, ...],
    body: str | None = None,
    operation_id: str | None = None,
) -> JsonObject:
    responses: JsonObject = {str(status): resp for status, resp in ok.items()}
    for status in errors:
        responses[str(status)] = _json(_ref("Error"), _ERROR_TEXT[status])
    op: JsonObject = {"summary": summary, "responses": responses}
    if operation_id is not None:
        op["operationId"] = operation_id
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return op


# An id (service_name, request_id, allocation_id), as request_parsing.SERVICE_NAME_RE
# and REQUEST_ID_RE check it; a node name as NODE_NAME_RE does.
ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
NODE_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# OpenAPI links: what schemathesis's stateful run follows (allocate -> get -> renew -> release).
_ALLOCATION_LINKS = {
    "GetAllocation": {
        "operationId": "getAllocation",
        "parameters": {"allocation_id": "$response.body#/allocation_id"},
    },
    "RenewAllocation": {
        "operationId": "renew",
        "requestBody": {"allocation_id": "$response.body#/allocation_id"},
    },
    "ReleaseAllocation": {
        "operationId": "release",
        "requestBody": {"allocation_id": "$response.body#/allocation_id"},
    },
    "GetRequest": {"operationId": "getRequest", "parameters": {"request_id": "$response.body#/request_id"}},
}
_QUEUED_LINKS = {
    "GetRequest": {"operationId": "getRequest", "parameters": {"request_id": "$response.body#/request_id"}},
    "CancelRequest": {"operationId": "release", "requestBody": {"request_id": "$response.body#/request_id"}},
}


def _linked(response: JsonObject, links: JsonObject) -> JsonObject:
    return {**response, "links": links}


_WRITE_ERRORS = (400, 401, 403, 404, 413)
_READ_ERRORS = (401,)


@lru_cache(maxsize=4)
def openapi_document(*, auth_header: str | None = None, max_ttl_s: float = 0.0) -> JsonObject:
    """The API's OpenAPI document for an agent with this configuration (built once per configuration).

    `auth_header`: the API-key header when authentication is on (None: off; then no
    operation declares security). `max_ttl_s`: `[scheduler] max_ttl_s`, which bounds
    `ttl_seconds` (0: no bound, and 0 itself means "never expires").
    """
    obj = {"type": "object"}
    paths: JsonObject = {
        "/": {
            "get": {
                "summary": "The status page: static HTML whose script polls /gpu/list and /cluster/members "
                "(open; with auth on, the page asks for a key for those calls)",
                "responses": {
                    "200": {"description": "OK", "content": {"text/html": {"schema": {"type": "string"}}}},
                },
            }
        },
        "/healthz": {"get": _op("Liveness and a summary of the agent's state", {200: _json(_ref("Health"), "OK")}, ())},
        "/gpu/allocate": {
            "post": _op(
                "Allocate GPUs now, or queue the request",
                {
                    200: _linked(_json(_ref("Allocation"), "Allocated now"), _ALLOCATION_LINKS),
                    202: _linked(_json(_ref("QueuedRequest"), "Queued; the webhook hears the outcome"), _QUEUED_LINKS),
                },
                (400, 401, 403, 409, 413, 503),
                body="AllocateRequest",
                operation_id="allocate",
            )
        },
        "/gpu/release": {
            "post": _op(
                "Release an allocation, all of a service's, or cancel a queued request",
                {200: _json(_ref("ReleaseResult"), "Released")},
                _WRITE_ERRORS,
                body="ReleaseRequest",
                operation_id="release",
            )
        },
        "/gpu/renew": {
            "post": _op(
                "Extend a lease",
                {
                    200: _linked(
                        _json(_ref("Allocation"), "Renewed"),
                        {"ReleaseAllocation": _ALLOCATION_LINKS["ReleaseAllocation"]},
                    )
                },
                _WRITE_ERRORS,
                body="RenewRequest",
                operation_id="renew",
            )
        },
        "/gpu/status": {
            "get": _op(
                "Every GPU in stable (node, index) order; one node, a page, or a per-node summary",
                {
                    200: _json(
                        {
                            "type": "object",
                            "properties": {
                                "gpus": {"type": "array", "items": _ref("Gpu")},
                                "next_after": {
                                    "type": ["string", "null"],
                                    "description": "with limit: the after= of the next page; null on the last",
                                },
                                "summary": {
                                    "type": "object",
                                    "properties": {"largest_request": _ref("LargestRequest")},
                                },
                                "nodes": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {"largest_request": _ref("LargestRequest")},
                                    },
                                },
                            },
                        },
                        "OK (summary=true: summary and nodes instead of gpus)",
                    )
                },
                (400, *_READ_ERRORS),
            )
        },
        "/gpu/list": {
            "get": _op(
                "GPUs, live allocations and the queue",
                {
                    200: _json(
                        {
                            "type": "object",
                            "properties": {
                                "gpus": {"type": "array", "items": _ref("Gpu")},
                                "allocations": {"type": "array", "items": _ref("Allocation")},
                                "queue": {"type": "array", "items": _ref("QueuedRequest")},
                                "totals": {"type": "object", "description": "with limit: the lists' full lengths"},
                                "summary": {"type": "object", "description": "summary=true: counts only"},
                            },
                        },
                        "OK",
                    )
                },
                (400, *_READ_ERRORS),
            )
        },
        "/gpu/workload": {
            "post": _op(
                "Analyse a workload without allocating",
                {200: _json(_ref("WorkloadAnalysis"), "The requirements it would be scheduled with")},
                (400, 401, 413),
                body="WorkloadRequest",
            )
        },
        "/gpu/drain": {
            "post": _op(
                "Take a GPU out of scheduling (leases on it run on); admin keys only",
                {200: _json(_ref("Gpu"), "The GPU, now drained")},
                _WRITE_ERRORS,
                body="DrainRequest",
            )
        },
        "/gpu/undrain": {
            "post": _op(
                "Return a drained GPU to scheduling; admin keys only",
                {200: _json(_ref("Gpu"), "The GPU, no longer drained")},
                _WRITE_ERRORS,
                body="UndrainRequest",
            )
        },
        "/gpu/allocations/{allocation_id}": {
            "get": _op(
                "One live allocation", {200: _json(_ref("Allocation"), "OK")}, (401, 404), operation_id="getAllocation"
            )
        },
        "/gpu/requests/{request_id}": {
            "get": _op(
                "Where a request id stands: queued, allocated, released, expired, cancelled or lost",
                {200: _json(_ref("Request"), "OK")},
                (401, 404),
                operation_id="getRequest",
            )
        },
        "/usage": {
            "get": _op(
                "GPU-seconds allocated and utilized per queue or service over the whole hours covering [since, until)",
                {200: _json(_ref("Usage"), "OK")},
                (400, *_READ_ERRORS),
            )
        },
        "/queues": {
            "get": _op(
                "Every queue: its terms (the leader's queue policy) and where it stands now",
                {200: _json({"type": "object", "required": ["queues"], "properties": {"queues": {"type": "array", "items": _ref("Queue")}}}, "OK")},
                _READ_ERRORS,
            )
        },
        "/cluster/members": {
            "get": _op("Cluster members", {200: _json(obj, "OK")}, _READ_ERRORS)
        },
        "/cluster/leader": {
            "get": _op("The current leader", {200: _json(obj, "OK")}, _READ_ERRORS)
        },
        "/cluster/servers": {
            "get": _op(
                "The Raft voters (answered by the leader) and the servers gossip knows that are not voters",
                {200: _json(_ref("Servers"), "OK")},
                _READ_ERRORS,
            ),
            "post": _op(
                "Make a server alive in gossip a voter (one change at a time); answered once the change is "
                "applied; admin keys only. 404: gossip knows no such member; 400: not a server, not alive, "
                "or a bad name; 409: already a voter, a change in flight, or a lone agent",
                {200: _json(_ref("Servers"), "The servers after the change")},
                (400, 401, 403, 404, 409, 413),
                body="AddServerRequest",
            ),
        },
        "/cluster/servers/{name}": {
            "delete": _op(
                "Remove a voter, alive or dead (the leader too: it answers, then steps down); admin keys only. "
                "404: not a voter; 409: the last voter, or a change in flight",
                {200: _json(_ref("Servers"), "The servers after the change")},
                (401, 403, 404, 409),
            )
        },
        "/openapi.json": {"get": _op("This document", {200: _json(obj, "OK")}, ())},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                "responses": {
                    "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}},
                },
            }
        },
    }
    paths["/gpu/status"]["get"]["parameters"] = paths["/gpu/list"]["get"]["parameters"] = [
        {"name": "node", "in": "query", "required": False, "description": "only this node's GPUs",
         "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}},
        {"name": "after", "in": "query", "required": False, "description": "start after this GPU (next_after of the page before)",
         "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}/[0-9]{1,6}$"}},
        {"name": "limit", "in": "query", "required": False, "description": "at most this many GPUs (then next_after is set)",
         "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
        {"name": "summary", "in": "query", "required": False, "description": "counts per node instead of GPU rows",
         "schema": {"type": "boolean"}},
    ]
    time_text = (
        "RFC 3339 with an offset (2026-12-01T00:00:00Z), Unix seconds, or a duration back from now (90m, 24h, 7d), "
        "clamped to 1970 … 1e11; a date that does not exist (February 30) or since after until is 400"
    )
    a_time = {"anyOf": [{"type": "string", "pattern": p} for p in (RFC3339_PATTERN, UNIX_SECONDS_PATTERN, DURATION_PATTERN)]}
    paths["/usage"]["get"]["parameters"] = [
        {"name": "since", "in": "query", "required": False, "description": f"{time_text}; default: until − 24 h",
         "schema": a_time},
        {"name": "until", "in": "query", "required": False, "description": f"{time_text}; default: now",
         "schema": a_time},
        {"name": "by", "in": "query", "required": False, "description": "group by queue or service (default)",
         "schema": {"type": "string", "enum": ["queue", "service"]}},
    ]
    for template, method in (
        ("/gpu/allocations/{allocation_id}", "get"),
        ("/gpu/requests/{request_id}", "get"),
        ("/cluster/servers/{name}", "delete"),
    ):
        name = template.rsplit("{", 1)[1].rstrip("}")
        # Any string reaches the handler (one that is not an id is simply unknown: 404), so the
        # parameter is a plain string; the description says what a known one looks like.
        paths[template][method]["parameters"] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "minLength": 1},
                "description": "an id or node name: 1-128 letters, digits, '.', '_', ':' (ids) or '-'; "
                "anything else is unknown (404)",
            }
        ]
    security_schemes: JsonObject = {}
    if auth_header is not None:
        security_schemes = {
            "apiKey": {"type": "apiKey", "in": "header", "name": auth_header},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
        for path, operations in paths.items():
            if path not in ("/", "/healthz", "/metrics", "/openapi.json"):
                for op in operations.values():
                    op["security"] = [{"apiKey": []}, {"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gpu-orchestrator agent API",
            "version": "1",
            "description": "Every error is {\"error\": {\"code\", \"message\"}}. With auth enabled, send "
            "X-API-Key (or Authorization: Bearer); /, /healthz, /metrics and /openapi.json stay open. "
            "A method a path does not list answers 405 with an Allow header; an unknown path 404. "
            "Any write may answer 503 storage_unavailable with Retry-After if the state file fails.",
        },
        "components": {
            "securitySchemes": security_schemes,
            "schemas": _schemas(max_ttl_s),
        },
        "paths": paths,
    }


def _nullable(schema: JsonObject) -> JsonObject:
    """`schema` or null: an optional field whose null means "not given"."""
    return {"anyOf": [schema, {"type": "null"}]}


def _schemas(max_ttl_s: float) -> JsonObject:
    string, integer, number = {"type": "string"}, {"type": "integer"}, {"type": "number"}
    an_id = {"type": "string", "pattern": ID_PATTERN}
    text = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_LENGTH}
    if max_ttl_s > 0:
        ttl: JsonObject = {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": max_ttl_s,
            "description": f"seconds; at most [scheduler] max_ttl_s ({max_ttl_s:g}); null: the default TTL",
        }
    else:
        ttl = {"type": "number", "minimum": 0, "description": "seconds; 0 = never expires; null: the default TTL"}
    allocate_properties: JsonObject = {
        "service_name": an_id,
        "workload_type": _nullable({"enum": list(WORKLOAD_TYPES), "default": "generic"}),
        "workload_data": _nullable(
            {
                "type": "object",
                "description": "the workload analyzer's fields (docs/workload-analyzer.md); other keys are "
                "ignored. Nested at most 32 levels deep, counting the request body itself; every integer in it "
                "within -2**63 .. 2**64-1 (it travels in a log entry)",
            }
        ),
        "priority": _nullable({"type": "integer", "minimum": 1, "maximum": 10}),
        "gpu_count": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_GPU_COUNT}),
        "required_gpus": _nullable(
            {"type": "integer", "minimum": 1, "maximum": MAX_GPU_COUNT, "description": "gpu_count's other name"}
        ),
        "min_memory_mb": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_MEMORY_MB}),
        "max_utilization": _nullable({"type": "number", "minimum": 0, "maximum": 100}),
        "ttl_seconds": _nullable(ttl),
        "queue": _nullable({"type": "boolean", "default": True}),
        "mig_profile": _nullable(
            {
                "type": "string",
                "pattern": f"^(?:{MIG_ANY}|{PROFILE_PATTERN})$",
                "description": "one MIG slice of this profile (\"1g.10gb\"), or \"auto\": the smallest slice "
                "with min_memory_mb; gpu_count must then be 1 or absent (docs/shapes.md#mig-slices)",
            }
        ),
        "sharing": _nullable(
            {
                "enum": ["exclusive", "shared"],
                "default": "exclusive",
                "description": "\"shared\": a share of one GPU with the memory budget gpu_memory_mb, packed beside "
                "other shares of its queue (docs/shapes.md#shared-gpus-by-memory)",
            }
        ),
        "gpu_memory_mb": _nullable(
            {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_MEMORY_MB,
                "description": "a share's memory budget; required with sharing \"shared\", refused without it",
            }
        ),
        "preemptible": _nullable(
            {
                "type": "boolean",
                "default": True,
                "description": "false: never preempted; only within the queue's guarantee (400 "
                "preemptible_without_guarantee in a queue without one)",
            }
        ),
        "request_id": _nullable({**an_id, "description": "idempotency key"}),
        "webhook_url": _nullable(
            {
                "type": "string",
                "maxLength": MAX_URL_LENGTH,
                "pattern": f"^(?:{WEBHOOK_URL_PATTERN})?$",
                "description": "http:// or https:// URL; \"\" = none",
            }
        ),
        "constraints": _nullable(
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {"gpu_model": _nullable(text), "node": _nullable(text)},
            }
        ),
        "nodes": _nullable(
            {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_GANG_NODES,
                "description": "a gang: this many distinct nodes, all or none (docs/shapes.md); needs gpus_per_node, "
                "excludes gpu_count/required_gpus and constraints.node (400 invalid_gang)",
            }
        ),
        "gpus_per_node": _nullable(
            {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_GPU_COUNT,
                "description": "a gang's GPUs on each node; without nodes, the most on each node, the total "
                "(gpu_count, or the analyzer's count) split over the fewest nodes (docs/shapes.md)",
            }
        ),
    }
    # gpu_count and required_gpus name the same thing: both (not null) is a 400.
    not_both_counts: dict[str, Any] = {
        "not": {
            "required": ["gpu_count", "required_gpus"],
            "properties": {"gpu_count": {"not": {"type": "null"}}, "required_gpus": {"not": {"type": "null"}}},
        }
    }
    # `nodes` comes with gpus_per_node and without gpu_count/required_gpus (400 invalid_gang);
    # gpus_per_node alone splits the total (gpu_count, or the analyzer's) over nodes.
    given = {"not": {"type": "null"}}
    not_both_counts["allOf"] = [
        {
            "if": {"required": ["nodes"], "properties": {"nodes": given}},
            "then": {
                "required": ["gpus_per_node"],
                "properties": {
                    "gpus_per_node": given,
                    "gpu_count": {"type": "null"},
                    "required_gpus": {"type": "null"},
                },
            },
        },
        {
            "if": {"required": ["nodes"], "properties": {"nodes": {"type": "integer", "minimum": 2}}},
            "then": {
                "anyOf": [
                    {"not": {"required": ["constraints"]}},
                    {"properties": {"constraints": {"anyOf": [
                        {"type": "null"},
                        {"not": {"required": ["node"]}},
                        {"properties": {"node": {"type": "null"}}},
                    ]}}},
                ]
            },
        },
    ]
    # A MIG request takes one slice: mig_profile with a count above 1 is a 400.
    one_slice = [
        {
            "not": {
                "required": ["mig_profile", count],
                "properties": {"mig_profile": {"type": "string"}, count: {"type": "integer", "minimum": 2}},
            }
        }
        for count in ("gpu_count", "required_gpus")
    ] + [
        # Nor is a slice part of a gang (400 invalid_gang).
        {
            "not": {
                "required": ["mig_profile", field],
                "properties": {"mig_profile": {"type": "string"}, field: {"type": "integer"}},
            }
        }
        for field in ("nodes", "gpus_per_node")
    ]
    # A share is part of one GPU on one node (400 invalid_share otherwise): a budget,
    # no count above 1, no gang, no MIG slice; and a budget only with sharing "shared".
    shared = {"required": ["sharing"], "properties": {"sharing": {"const": "shared"}}}
    one_share = [
        {
            "if": shared,
            "then": {
                "required": ["gpu_memory_mb"],
                "properties": {
                    "gpu_memory_mb": {"type": "integer"},
                    "gpu_count": {"type": ["integer", "null"], "maximum": 1},
                    "required_gpus": {"type": ["integer", "null"], "maximum": 1},
                    "nodes": {"type": "null"},
                    "gpus_per_node": {"type": "null"},
                    "mig_profile": {"type": "null"},
                },
            },
            "else": {"properties": {"gpu_memory_mb": {"type": "null"}}},
        }
    ]
    release_selectors = ("allocation_id", "service_name", "request_id")
    nullable_string = {"type": ["string", "null"]}
    time = {"type": ["string", "null"], "format": "date-time"}
    requirements = {
        "type": "object",
        "properties": {
            "gpu_count": integer,
            "min_memory_mb": integer,
            "max_utilization": number,
            "gpu_model": nullable_string,
            "node": nullable_string,
            "nodes": {"type": "integer", "description": "a gang's node count (gangs only; gpu_count is then per node)"},
            "gpus_per_node": {"type": "integer", "description": "a gang's GPUs per node (gangs only)"},
            "mig_profile": nullable_string,
            "ttl_seconds": number,
            "decided_by": {"enum": ["request", "analyzer", "advisor"]},
            "estimate": {"type": "object"},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": string, "message": string},
                }
            },
        },
        "AllocateRequest": {
            "type": "object",
            "required": ["service_name"],
            "additionalProperties": False,
            "properties": allocate_properties,
            "allOf": [not_both_counts, *one_slice, *one_share],
        },
        "WorkloadRequest": {
            "type": "object",
            "additionalProperties": False,
            "description": "an allocate body; service_name may be left out (it only labels the analysis)",
            "properties": {**allocate_properties, "service_name": _nullable(an_id)},
            "allOf": [not_both_counts, *one_slice, *one_share],
        },
        "ReleaseRequest": {
            "type": "object",
            "additionalProperties": False,
            "properties": {name: _nullable(an_id) for name in release_selectors},
            "description": "exactly one of the three is given (not null)",
            "oneOf": [
                {"required": [name], "properties": {name: an_id}} for name in release_selectors
            ],
        },
        "RenewRequest": {
            "type": "object",
            "required": ["allocation_id"],
            "additionalProperties": False,
            "properties": {"allocation_id": an_id, "ttl_seconds": _nullable(ttl)},
        },
        "DrainRequest": {
            "type": "object",
            "required": ["index"],
            "additionalProperties": False,
            "properties": {
                "index": {"type": "integer", "minimum": 0, "maximum": MAX_UNIT_INDEX},
                "node": _nullable(
                    {"type": "string", "pattern": NODE_NAME_PATTERN, "description": "default: the agent answering"}
                ),
                "reason": _nullable({"type": "string", "maxLength": MAX_TEXT_LENGTH}),
            },
        },
        "UndrainRequest": {
            "type": "object",
            "required": ["index"],
            "additionalProperties": False,
            "properties": {
                "index": {"type": "integer", "minimum": 0, "maximum": MAX_UNIT_INDEX},
                "node": _nullable({"type": "string", "pattern": NODE_NAME_PATTERN}),
            },
        },
        "ReleaseResult": {
            "type": "object",
            "properties": {
                "status": {"const": "released"},
                "released": {"type": "array", "items": string},
                "cancelled": {"type": "array", "items": string},
                "repeated": {
                    "const": True,
                    "description": "present when the allocation had already been released by its caller (a retry)",
                },
            },
        },
        "AllocatedGpu": {
            "type": "object",
            "properties": {
                "node": string,
                "index": integer,
                "uuid": string,
                "name": string,
                "memory_total_mb": integer,
                "mig_profile": {"type": "string", "description": "present for a MIG slice"},
                "parent_uuid": {"type": "string", "description": "a MIG slice's GPU"},
            },
        },
        "Allocation": {
            "type": "object",
            "required": ["id", "allocation_id", "service_name", "node", "gpu_ids", "gpus", "cuda_visible_devices"],
            "properties": {
                "id": string,
                "allocation_id": string,
                "status": {"const": "allocated"},
                "request_id": string,
                "service_name": string,
                "workload_type": string,
                "priority": integer,
                "node": string,
                "gpu_ids": {"type": "array", "items": integer},
                "gpus": {"type": "array", "items": _ref("AllocatedGpu")},
                "cuda_visible_devices": string,
                "allocated_at": time,
                "expires_at": time,
                "queue_name": {"type": "string", "description": "the queue the lease counts against"},
                "preemptible": {"type": "boolean"},
                "requirements": requirements,
                "workflow_id": string,
                "topology": _nullable(_ref("AllocationTopology")),
                "gang_id": {"type": "string", "description": "a gang's id (the same as id): every node's lease together"},
                "nodes": {
                    "type": "array",
                    "description": "a gang's leases, one per node in rank order",
                    "items": {
                        "type": "object",
                        "properties": {
                            "rank": integer,
                            "node": string,
                            "allocation_id": string,
                            "gpu_ids": {"type": "array", "items": integer},
                            "cuda_visible_devices": string,
                            "topology": _nullable(_ref("AllocationTopology")),
                        },
                    },
                },
                "rendezvous": {
                    "type": "object",
                    "description": "a gang's hint for torch.distributed: --master_addr, --master_port, --nnodes",
                    "properties": {
                        "address": string,
                        "port": integer,
                        "port_range": {"type": "array", "items": integer},
                        "nnodes": integer,
                    },
                },
                "gang": {
                    "type": "object",
                    "description": "on one member lease of a gang (listings): which gang and its place",
                    "properties": {"gang_id": string, "rank": integer, "size": integer},
                },
                "shared": _nullable(
                    {
                        "type": "object",
                        "description": "the share of a GPU held (docs/shapes.md#shared-gpus-by-memory); null for whole units",
                        "properties": {
                            "gpu_memory_mb": integer,
                            "gpu_memory_total_mb": integer,
                            "cross_queue": {"type": "boolean"},
                            "co_tenants": {"type": ["integer", "null"], "description": "other shares on the GPU"},
                            "mps": _nullable(
                                {
                                    "type": "object",
                                    "description": "the environment of a CUDA MPS client; null without MPS configured",
                                    "properties": {
                                        "CUDA_MPS_PIPE_DIRECTORY": string,
                                        "CUDA_MPS_LOG_DIRECTORY": string,
                                        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": {
                                            "type": "string",
                                            "description": "the budget as MPS's per-client limit on device 0 "
                                            "(the GPU of cuda_visible_devices), e.g. \"0=12000M\"",
                                        },
                                    },
                                }
                            ),
                        },
                    }
                ),
                "mig": _nullable(
                    {
                        "type": "object",
                        "properties": {
                            "profile": string,
                            "instance_uuids": {"type": "array", "items": string},
                            "gpu_uuids": {"type": "array", "items": string},
                        },
                    }
                ),
            },
        },
        "AllocationTopology": {
            "type": "object",
            "description": "how the allocation's GPUs are wired, as placement chose them (docs/shapes.md)",
            "required": ["score", "links", "numa_node", "cpu_list"],
            "properties": {
                "score": {"type": "integer", "minimum": 0, "description": "sum of the link weights of every GPU pair"},
                "links": {
                    "type": ["string", "null"],
                    "description": "the weakest pair, as nvidia-smi topo -m: NV<n>, PIX, PXB, PHB, NODE, SYS, ?; null for one GPU",
                },
                "numa_node": {"type": ["integer", "null"], "description": "the NUMA node of every GPU, else null"},
                "cpu_list": {"type": ["string", "null"], "description": "nearby CPUs, Linux cpulist form"},
            },
        },
        "LargestRequest": {
            "type": "object",
            "description": "the largest request that fits now: any free GPUs, free GPUs all joined by NVLink, "
            "a MIG instance of each profile, a share",
            "required": ["gpus", "nvlink", "mig", "share_mb"],
            "properties": {
                "gpus": {"type": "integer", "minimum": 0},
                "nvlink": {"type": ["integer", "null"], "minimum": 0, "description": "null where the topology is unknown"},
                "mig": {
                    "type": ["object", "null"],
                    "additionalProperties": {"type": "integer", "minimum": 0},
                    "description": "free MIG instances by profile, every profile present (0 included); "
                    "null without MIG",
                },
                "share_mb": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "the largest gpu_memory_mb a share could get: a free GPU's memory, "
                    "or the room left on a shared GPU (for its sharing group)",
                },
            },
        },
        "QueuedRequest": {
            "type": "object",
            "properties": {
                "status": {"const": "queued"},
                "request_id": string,
                "service_name": string,
                "workload_type": string,
                "priority": integer,
                "position": integer,
                "submitted_at": time,
                "queue_deadline": time,
                "queue_name": {"type": "string", "description": "the queue the request counts against"},
                "preemptible": {"type": "boolean"},
                "reason": {
                    "enum": [*REASONS, None],
                    "description": "why it waits: queue_quota, priority, resources, reservation, "
                    "drained_or_unhealthy or preempting",
                },
                "reason_detail": {"type": ["string", "null"], "description": "the reason in words"},
                "preempting_deadline": {
                    **time,
                    "description": "with reason preempting: when the leases preempted for it end at the latest",
                },
                "requirements": requirements,
                "workflow_id": string,
            },
        },
        "Queue": {
            "type": "object",
            "required": ["name", "in_use_gpus", "fair_share_gpus", "pending_requests"],
            "properties": {
                "name": string,
                "declared": {
                    "type": "boolean",
                    "description": "false for default when [queues] does not declare it, and for a queue no longer "
                    "declared that still holds or awaits GPUs",
                },
                "parent": nullable_string,
                "children": {"type": "array", "items": string},
                "guaranteed_gpus": {"type": "integer", "description": "all models together"},
                "guaranteed_by_model": {"type": "object", "additionalProperties": integer},
                "weight": number,
                "max_gpus": {"type": ["integer", "null"]},
                "max_priority": integer,
                "borrow": {"type": "boolean"},
                "lend": {"type": "boolean"},
                "preemption_grace_s": number,
                "idle_reclaim": {
                    "anyOf": [
                        {"type": "null"},
                        {"type": "object", "properties": {"utilization_pct": number, "minutes": number}},
                    ]
                },
                "services": {"type": "array", "items": string},
                "allow_shares": {"type": "boolean", "description": "its requests may take shares of a GPU"},
                "cross_queue_shares": {
                    "type": "boolean",
                    "description": "its shares may pack beside other queues' shares that allow it too",
                },
                "in_use_gpus": integer,
                "borrowed_gpus": integer,
                "fair_share_gpus": number,
                "pending_requests": integer,
                "pending_gpus": integer,
                "preempting_leases": integer,
            },
        },
        "Request": {
            "type": "object",
            "properties": {
                "request_id": string,
                "service_name": string,
                "status": {"enum": ["queued", "allocated", "released", "expired", "cancelled", "lost"]},
                "submitted_at": time,
                "updated_at": time,
                "allocation_id": nullable_string,
                "reason": nullable_string,
                "allocation": _ref("Allocation"),
                "queue": _ref("QueuedRequest"),
            },
        },
        "Gpu": {
            "type": "object",
            "properties": {
                "id": integer,
                "node": string,
                "index": integer,
                "uuid": string,
                "name": string,
                "memory_total": integer,
                "memory_used": {"type": ["integer", "null"]},
                "memory_free": {"type": ["integer", "null"]},
                "utilization": {"type": ["number", "null"]},
                "temperature": {"type": ["number", "null"]},
                "power_draw": {"type": ["number", "null"]},
                "last_updated": time,
                "allocated": {"type": "boolean"},
                "allocated_to": nullable_string,
                "allocation_id": nullable_string,
                "allocated_at": time,
                "health": {"enum": ["healthy", "degraded", "unhealthy"]},
                "health_reasons": {"type": "array", "items": string},
                "healthy_again_at": time,
                "present": {"type": "boolean", "description": "false while the GPU is lost from NVML"},
                "drained": {"type": "boolean"},
                "drain_reason": nullable_string,
                "processes": {
                    "type": ["array", "null"],
                    "items": {"type": "object", "properties": {"pid": integer, "used_memory_mb": {"type": ["integer", "null"]}}},
                },
                "in_use_without_lease": {"type": "boolean"},
                "lease_idle_seconds": number,
                "telemetry": {"type": "object", "description": "every other NVML field, null where unsupported"},
                "mig_instances": {
                    "type": "array",
                    "description": "present for a GPU in MIG mode: its GPU instances, each leased apart "
                    "(docs/shapes.md#mig-slices)",
                    "items": {
                        "type": "object",
                        "properties": {
                            "index": integer,
                            "mig_index": {"type": ["integer", "null"]},
                            "gpu_instance_id": {"type": ["integer", "null"], "description": "null for another node's"},
                            "uuid": string,
                            "profile": string,
                            "memory_total": integer,
                            "memory_free": {"type": ["integer", "null"]},
                            "allocated": {"type": "boolean"},
                            "allocated_to": nullable_string,
                            "allocation_id": nullable_string,
                            "allocated_at": time,
                        },
                    },
                },
            },
        },
        "WorkloadAnalysis": {
            "type": "object",
            "properties": {
                "workload_type": string,
                "required_gpus": integer,
                "min_memory_mb": integer,
                "priority": integer,
                "max_utilization": number,
                "decided_by": {"enum": ["request", "analyzer", "advisor"]},
                "advisor_fallback_reason": nullable_string,
                "estimate": {"type": "object"},
            },
        },
        "AddServerRequest": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {"name": {"type": "string", "pattern": NODE_NAME_PATTERN}},
        },
        "Usage": {
            "type": "object",
            "required": ["by", "since", "until", "retention_days", "usage", "totals"],
            "properties": {
                "by": {"type": "string", "enum": ["queue", "service"]},
                "since": {"type": "string", "description": "start of the first whole hour read (RFC 3339)"},
                "until": {"type": "string", "description": "end of the last whole hour read (RFC 3339)"},
                "retention_days": number,
                "usage": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["allocated_gpu_seconds", "utilized_gpu_seconds", "utilization"],
                        "properties": {
                            "queue": string,
                            "service": string,
                            "allocated_gpu_seconds": number,
                            "utilized_gpu_seconds": number,
                            "utilization": {"type": ["number", "null"]},
                        },
                    },
                },
                "totals": {
                    "type": "object",
                    "properties": {"allocated_gpu_seconds": number, "utilized_gpu_seconds": number},
                },
            },
        },
        "Servers": {
            "type": "object",
            "properties": {
                "leader": nullable_string,
                "term": integer,
                "servers": {
                    "type": "array",
                    "description": "voters in configuration order, then non-voter servers by name",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": string,
                            "voter": {"type": "boolean"},
                            "alive": {"type": "boolean", "description": "alive in gossip"},
                            "status": {"enum": ["alive", "suspect", "dead", "left", "unknown"]},
                            "leader": {"type": "boolean"},
                            "address": {"type": ["string", "null"], "description": "Raft address host:port"},
                        },
                    },
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "service", "node", "role", "leader"],
            "properties": {
                "status": {"enum": ["ok", "degraded"]},
                "service": {"const": "gpu-orchestrator"},
                "node": string,
                "role": string,
                "leader": nullable_string,
            },
        },
    }
