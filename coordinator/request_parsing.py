"""Turning API request bodies into validated values, with precise 400 errors.

The HTTP edge hands over whatever JSON it decoded; everything here checks type
and bounds field by field and names the field in the error, so bad input gets
a clear answer and changes nothing. Booleans are never accepted as numbers
(Python's `True == 1` would otherwise let `"gpu_count": true` through).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from coordinator.errors import Forbidden, InvalidRequest, Unsatisfiable, brief
from coordinator.mig import MAX_UNIT_INDEX, PROFILE_RE
from coordinator.model import MIG_ANY, AllocationRequest, Requirements
from coordinator.queues import DEFAULT_QUEUE, QueuePolicy, QueueSpec
from coordinator.workload import WORKLOAD_TYPES, WorkloadEstimate

# `\Z`, not `$`: `$` also matches before a trailing newline, which would let "svc\n" through.
SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
MAX_GPU_COUNT = 64
# The most nodes one gang may span (coordinator/gang_placement.py searches at most
# GANG_NODE_SEARCH_LIMIT nodes per decision, which this stays within).
MAX_GANG_NODES = 256
MAX_MEMORY_MB = 2_097_152  # 2 TiB: above any GPU made; larger is a typo, not a request
MAX_URL_LENGTH = 2048
MAX_TEXT_LENGTH = 256  # constraints, a drain's node and reason
# A node name, as `[agent] node_name` allows it (agent/config_checks.py keeps the same rule).
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")

# A webhook URL: http or https, a host that parses (a DNS name, IPv4, or a bracketed
# IPv6 address), an optional port up to 65535, and a path, query and fragment of the
# characters RFC 3986 allows (so no spaces, no control characters, nothing outside
# ASCII). One pattern, shared with the OpenAPI document, so the two cannot disagree.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_H16 = r"[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join(
    (
        rf"(?:{_H16}:){{7}}{_H16}",
        rf"(?:{_H16}:){{1,7}}:",
        rf"(?:{_H16}:){{1,6}}:{_H16}",
        rf"(?:{_H16}:){{1,5}}(?::{_H16}){{1,2}}",
        rf"(?:{_H16}:){{1,4}}(?::{_H16}){{1,3}}",
        rf"(?:{_H16}:){{1,3}}(?::{_H16}){{1,4}}",
        rf"(?:{_H16}:){{1,2}}(?::{_H16}){{1,5}}",
        rf"{_H16}:(?::{_H16}){{1,6}}",
        rf":(?:(?::{_H16}){{1,7}}|:)",
    )
)
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
WEBHOOK_URL_PATTERN = (
    r"https?://"
    r"(?:[A-Za-z0-9._~%!$&'()*+,;=:-]+@)?"
    rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[(?:{_IPV6})\])"
    rf"(?::{_PORT})?"
    r"(?:[/?#][A-Za-z0-9._~%!$&'()*+,;=:@/?#\[\]-]*)?"
)
_WEBHOOK_URL_RE = re.compile(rf"^(?:{WEBHOOK_URL_PATTERN})\Z")

_ALLOCATE_FIELDS = (
    "service_name",
    "workload_type",
    "workload_data",
    "priority",
    "gpu_count",
    "required_gpus",  # the seed's DeepAgents tool sends this name for gpu_count
    "min_memory_mb",
    "max_utilization",
    "ttl_seconds",
    "queue",
    "request_id",
    "webhook_url",
    "constraints",
    "preemptible",
    "nodes",  # a gang: this many nodes...
    "gpus_per_node",  # ...with this many GPUs on each
    "mig_profile",
    "sharing",  # "exclusive" (default) or "shared": a share of one GPU...
    "gpu_memory_mb",  # ...with this memory budget
)
_CONSTRAINT_FIELDS = ("gpu_model", "node")


@dataclass(frozen=True, slots=True)
class AllocateBody:
    """A validated `POST /gpu/allocate` (or `/gpu/workload`) body; None = not given."""

    service_name: str
    workload_type: str
    workload_data: dict[str, Any]
    priority: int | None
    gpu_count: int | None
    min_memory_mb: int | None
    max_utilization: float | None
    ttl_seconds: float | None
    queue: bool
    request_id: str | None
    webhook_url: str | None
    gpu_model: str | None
    node: str | None
    # False: never preempted; allowed only in a queue with a guarantee (see queue_for).
    preemptible: bool = True
    # A gang's node count (1 = an ordinary request); gpu_count is then per node.
    # None: a gang sized from its total (gpu_count, else the analyzer's count),
    # split over nodes of at most `gpus_per_node` (see resolve_requirements).
    nodes: int | None = 1
    gpus_per_node: int | None = None
    # One MIG slice of this profile, or of any (MIG_ANY); None = whole GPUs.
    mig_profile: str | None = None
    # A share of one GPU with this memory budget (sharing "shared"); None = exclusive.
    share_mb: int | None = None

    @property
    def workflow_id(self) -> str | None:
        value = self.workload_data.get("workflow_id")
        return value if isinstance(value, str) and value else None

    @property
    def fully_specified(self) -> bool:
        """The caller fixed count, memory and priority: nobody needs to estimate."""
        return None not in (self.gpu_count, self.min_memory_mb, self.priority)


def parse_allocate_body(body: object, *, require_service: bool = True) -> AllocateBody:
    """Validate an allocate body. Raises InvalidRequest naming the offending field."""
    obj = _object(body, "request body")
    unknown = sorted(set(obj) - set(_ALLOCATE_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(_ALLOCATE_FIELDS)}",
            code="unknown_field",
        )
    if obj.get("gpu_count") is not None and obj.get("required_gpus") is not None:
        raise InvalidRequest("give gpu_count or required_gpus, not both")
    service = obj.get("service_name")
    if service is None and not require_service:
        service = "analysis"
    service_name = _name(service, "service_name", SERVICE_NAME_RE)
    workload_type = _or(obj.get("workload_type"), "generic")
    if workload_type not in WORKLOAD_TYPES:
        raise InvalidRequest(
            f"workload_type must be one of {', '.join(WORKLOAD_TYPES)}, got {brief(repr(workload_type))}",
            code="unknown_workload_type",
        )
    workload_data = _object(_or(obj.get("workload_data"), {}), "workload_data")
    _check_log_safe(workload_data, "workload_data")
    constraints = _object(_or(obj.get("constraints"), {}), "constraints")
    unknown = sorted(set(constraints) - set(_CONSTRAINT_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"unknown constraint(s) {', '.join(unknown)}; valid: {', '.join(_CONSTRAINT_FIELDS)}",
            code="unknown_field",
        )
    count_field = "gpu_count" if obj.get("required_gpus") is None else "required_gpus"
    queue = _or(obj.get("queue"), True)
    if not isinstance(queue, bool):
        raise InvalidRequest("queue must be true or false")
    preemptible = _or(obj.get("preemptible"), True)
    if not isinstance(preemptible, bool):
        raise InvalidRequest("preemptible must be true or false")
    nodes, per_node = _gang_shape(obj, constraints)
    # Per node in a gang of given nodes; else the total (of a sized gang, too).
    gpu_count = per_node if nodes is not None and per_node is not None else _opt_int(obj, count_field, 1, MAX_GPU_COUNT)
    mig_profile = _opt_mig_profile(obj.get("mig_profile"), gpu_count, count_field)
    if mig_profile is not None and per_node is not None:
        raise InvalidRequest(
            "a MIG slice is one unit on one node: mig_profile cannot be asked with gpus_per_node",
            code="invalid_gang",
        )
    share_mb = _opt_share(obj, gpu_count, nodes, mig_profile)
    return AllocateBody(
        service_name=service_name,
        workload_type=str(workload_type),
        workload_data=dict(workload_data),
        priority=_opt_int(obj, "priority", 1, 10),
        gpu_count=gpu_count,
        min_memory_mb=_opt_int(obj, "min_memory_mb", 0, MAX_MEMORY_MB),
        max_utilization=_opt_number(obj, "max_utilization", 0.0, 100.0),
        ttl_seconds=_opt_number(obj, "ttl_seconds", 0.0, math.inf),
        queue=queue,
        request_id=None if obj.get("request_id") is None else _name(obj["request_id"], "request_id", REQUEST_ID_RE),
        webhook_url=_opt_url(obj.get("webhook_url"), "webhook_url"),
        gpu_model=_opt_str(constraints.get("gpu_model"), "constraints.gpu_model"),
        node=_opt_str(constraints.get("node"), "constraints.node"),
        preemptible=preemptible,
        nodes=nodes,
        gpus_per_node=per_node if nodes is None else None,
        mig_profile=mig_profile,
        share_mb=share_mb,
    )


def _opt_share(obj: Mapping[str, Any], gpu_count: int | None, nodes: int | None, mig_profile: str | None) -> int | None:
    """A body's share budget in MB (`sharing: "shared"`), or None for exclusive units. Raises InvalidRequest.

    A share is part of one GPU on one node: a count above 1, a gang or a MIG
    slice beside it would ask for something no single share can be.
    """
    sharing = _or(obj.get("sharing"), "exclusive")
    if sharing not in ("exclusive", "shared"):
        raise InvalidRequest(
            f'sharing must be "exclusive" or "shared", got {brief(repr(sharing))}', code="invalid_share"
        )
    memory = obj.get("gpu_memory_mb")
    if sharing == "exclusive":
        if memory is not None:
            raise InvalidRequest(
                'gpu_memory_mb is the budget of a share: give it with sharing "shared" '
                "(min_memory_mb is the memory a whole GPU must have)",
                code="invalid_share",
            )
        return None
    if isinstance(memory, float) and memory.is_integer():
        memory = int(memory)  # JSON has one number type: 259.0 is the integer 259, as for other counts
    if isinstance(memory, bool) or not isinstance(memory, int) or not 0 < memory <= MAX_MEMORY_MB:
        raise InvalidRequest(
            f'sharing "shared" needs gpu_memory_mb, the share\'s memory budget: an integer from 1 to '
            f"{MAX_MEMORY_MB}, got {brief(repr(memory))}",
            code="invalid_share",
        )
    if gpu_count not in (None, 1):
        raise InvalidRequest(f"a share is part of one GPU: gpu_count must be 1 or left out, got {gpu_count}", code="invalid_share")
    if nodes != 1 or "gpus_per_node" in obj and obj["gpus_per_node"] is not None:
        raise InvalidRequest("a share is part of one GPU on one node: it cannot be a gang", code="invalid_share")
    if mig_profile is not None:
        raise InvalidRequest("a share is of a whole GPU: mig_profile cannot be asked with sharing \"shared\"", code="invalid_share")
    return memory


def _gang_shape(obj: Mapping[str, Any], constraints: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(nodes, gpus_per_node) of a body: (1, None) for an ordinary request.

    With both, `gpus_per_node` is the count on each node, so `gpu_count` beside
    them would be ambiguous (per node or in all?), and `constraints.node` cannot
    pin what spans nodes. `nodes: 1` is an ordinary request of `gpus_per_node`
    GPUs. `gpus_per_node` alone sizes a gang from the total (`gpu_count`, or the
    analyzer's count): (None, gpus_per_node), resolved by resolve_requirements.
    `nodes` alone names no count: 400.
    """
    nodes = _opt_int(obj, "nodes", 1, MAX_GANG_NODES)
    per_node = _opt_int(obj, "gpus_per_node", 1, MAX_GPU_COUNT)
    if nodes is None and per_node is None:
        return 1, None
    if per_node is None:
        raise InvalidRequest(
            "a gang needs gpus_per_node: with nodes (e.g. {\"nodes\": 2, \"gpus_per_node\": 8}), "
            "or alone to split the total over nodes",
            code="invalid_gang",
        )
    if nodes is None:
        return None, per_node
    if obj.get("gpu_count") is not None or obj.get("required_gpus") is not None:
        raise InvalidRequest(
            "give gpus_per_node with nodes, not gpu_count/required_gpus (a gang's count is per node); "
            "or gpu_count with gpus_per_node alone to split that total over nodes",
            code="invalid_gang",
        )
    if nodes > 1 and constraints.get("node") is not None:
        raise InvalidRequest("a gang spans nodes: constraints.node cannot pin it to one", code="invalid_gang")
    return nodes, per_node


def split_over_nodes(total: int, most_per_node: int) -> tuple[int, int]:
    """(nodes, GPUs on each) for `total` GPUs on nodes of at most `most_per_node`.

    The fewest nodes that hold the total, with the same count on each (a
    torch.distributed launch runs one `nproc_per_node`): 24 over 8 is 3 × 8,
    12 over 8 is 2 × 6, and 10 over 4 is 3 × 4, the total rounded up to even nodes.
    """
    nodes = -(-total // most_per_node)
    return nodes, -(-total // nodes)


def queue_for(body: AllocateBody, policy: QueuePolicy, key_queue: str | None = None) -> QueueSpec:
    """The queue `body` goes to, once checked against that queue's terms.

    The queue is `key_queue` (the API key's, when it names one), else the one
    `policy` maps the service to, else `default`. With no queue configured every
    request goes to `default` on today's terms: nothing is refused here.

    Raises Forbidden `unknown_queue` for a key naming a queue the policy does
    not declare, `parent_queue` for one naming a queue with child queues (work
    runs in the children), and `priority_ceiling` for a `priority` above the
    queue's `max_priority`, `sharing_not_allowed` for a share in a queue with
    `allow_shares = false`; InvalidRequest `preemptible_without_guarantee` for
    `preemptible: false` where the queue guarantees no GPU such a request could
    use (it could never be within its guarantee, so it could never be placed).
    """
    if not policy.configured:
        return policy.spec(DEFAULT_QUEUE)
    if key_queue is not None:
        if key_queue != DEFAULT_QUEUE and not policy.declared(key_queue):
            raise Forbidden(
                f"the API key names queue {key_queue!r}, which the cluster's queue policy does not declare "
                f"(queues: {', '.join(policy.names())}); an operator must fix the key or the queues",
                code="unknown_queue",
            )
        name = key_queue
    else:
        name = policy.queue_of_service(body.service_name)
    if not policy.is_leaf(name):
        raise Forbidden(
            f"queue {name!r} has child queues ({', '.join(policy.children(name))}); requests go to one of them",
            code="parent_queue",
        )
    spec = policy.spec(name)
    if body.priority is not None and body.priority > spec.max_priority:
        raise Forbidden(
            f"priority {body.priority} is above the ceiling of queue {name!r}: max_priority {spec.max_priority}",
            code="priority_ceiling",
        )
    if body.share_mb is not None and not spec.allow_shares:
        raise Forbidden(
            f"queue {name!r} does not allow shares of a GPU (allow_shares = false): ask for whole GPUs "
            "(leave sharing out) or use a queue that allows shares",
            code="sharing_not_allowed",
        )
    if not body.preemptible:
        _, guaranteed = spec.model_guarantee(body.gpu_model)
        if guaranteed == 0:
            within = (
                "it names no GPU model its per-model guarantees cover"
                if spec.guaranteed_by_model
                else "it guarantees no GPUs"
            )
            raise InvalidRequest(
                f"preemptible: false needs a guarantee to stay within, and queue {name!r} has none for this "
                f"request: {within}",
                code="preemptible_without_guarantee",
            )
    return spec


def build_request(
    body: AllocateBody,
    estimate: WorkloadEstimate,
    *,
    decided_by: str,
    request_id: str,
    now: float,
    default_ttl_s: float,
    max_ttl_s: float,
    queue: QueueSpec | None = None,
) -> AllocationRequest:
    """Merge the caller's explicit fields over an estimate into an AllocationRequest.

    Explicit fields win; `decided_by` becomes "request" when the caller fixed
    every figure. The request counts against `queue` (as `queue_for` chose it;
    None: `default`), and an estimated priority is capped at its `max_priority`
    (an explicit one above it was refused by `queue_for`). Raises
    InvalidRequest for a TTL that `resolve_ttl` refuses.
    """
    queue = QueueSpec(DEFAULT_QUEUE) if queue is None else queue
    ttl = resolve_ttl(body.ttl_seconds, default_ttl_s=default_ttl_s, max_ttl_s=max_ttl_s)
    requirements = resolve_requirements(body, estimate)
    return AllocationRequest(
        request_id=request_id,
        service_name=body.service_name,
        workload_type=body.workload_type,
        priority=body.priority if body.priority is not None else min(estimate.priority, queue.max_priority),
        requirements=requirements,
        ttl_s=ttl,
        submitted_at=now,
        queue=body.queue,
        workload_data=body.workload_data,
        webhook_url=body.webhook_url,
        workflow_id=body.workflow_id,
        decided_by="request" if body.fully_specified else decided_by,
        estimate=estimate.estimate,
        queue_name=queue.name,
        preemptible=body.preemptible,
    )


def resolve_requirements(body: AllocateBody, estimate: WorkloadEstimate) -> Requirements:
    """The requirements `body` asks for: its explicit fields over the estimate's.

    A MIG request takes one slice, whatever the analyzer counted; a named
    profile fixes the memory, so only an explicit min_memory_mb narrows it. A
    gang sized from its total (`gpus_per_node` alone) takes the fewest nodes
    that hold the total (split_over_nodes); the analyzer's per-GPU memory stays,
    since each GPU holds no more than the estimate gave it. Raises Unsatisfiable
    for such a gang pinned to one node by constraints.node.
    """
    nodes = body.nodes
    if body.share_mb is not None:
        # A share's budget is its memory need: the GPU must hold at least that much.
        gpu_count = 1
        default_memory = body.share_mb
    elif body.mig_profile is not None:
        gpu_count = 1
        default_memory = 0 if body.mig_profile != MIG_ANY else estimate.min_memory_mb
    else:
        gpu_count = body.gpu_count if body.gpu_count is not None else estimate.required_gpus
        default_memory = estimate.min_memory_mb
    if nodes is None:
        assert body.gpus_per_node is not None, "parse_allocate_body sets gpus_per_node for a sized gang"
        nodes, gpu_count = split_over_nodes(gpu_count, body.gpus_per_node)
        if nodes > 1 and body.node is not None:
            raise Unsatisfiable(
                f"{nodes} nodes of {gpu_count} GPU(s) are needed (gpus_per_node {body.gpus_per_node}): "
                f"constraints.node {body.node!r} cannot pin a gang to one node",
                code="unsatisfiable",
            )
    return Requirements(
        gpu_count=gpu_count,
        min_memory_mb=body.min_memory_mb if body.min_memory_mb is not None else default_memory,
        max_utilization=(
            body.max_utilization if body.max_utilization is not None else estimate.max_utilization
        ),
        gpu_model=body.gpu_model,
        node=body.node,
        nodes=nodes,
        mig_profile=body.mig_profile,
        share_mb=body.share_mb,
    )


def resolve_ttl(requested: float | None, *, default_ttl_s: float, max_ttl_s: float) -> float:
    """The lease length to grant: the request's, else the default; 0 = never expires.

    With a cap (`max_ttl_s` > 0) a lease must end within it, so 0 ("never") is
    refused too: the cap is how an operator makes sure forgotten leases come back.
    Raises InvalidRequest naming the cap.
    """
    ttl = default_ttl_s if requested is None else requested
    if max_ttl_s > 0 and (ttl > max_ttl_s or ttl == 0):
        raise InvalidRequest(
            f"ttl_seconds must be more than 0 and at most {max_ttl_s:g} ([scheduler] max_ttl_s)"
        )
    return ttl


@dataclass(frozen=True, slots=True)
class ReleaseBody:
    """Exactly one selector of what to release."""

    allocation_id: str | None = None
    service_name: str | None = None
    request_id: str | None = None


def parse_release_body(body: object) -> ReleaseBody:
    """Validate a release body: one of allocation_id, service_name or request_id."""
    obj = _object(body, "request body")
    fields = ("allocation_id", "service_name", "request_id")
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(unknown)}; give one of {', '.join(fields)}",
            code="unknown_field",
        )
    given = [f for f in fields if obj.get(f) is not None]
    if len(given) != 1:
        raise InvalidRequest("give exactly one of allocation_id, service_name or request_id")
    name = given[0]
    pattern = SERVICE_NAME_RE if name == "service_name" else REQUEST_ID_RE
    value = _name(obj[name], name, pattern)
    return ReleaseBody(**{name: value})


@dataclass(frozen=True, slots=True)
class RenewBody:
    allocation_id: str
    ttl_seconds: float | None


def parse_renew_body(body: object) -> RenewBody:
    """Validate a renew body: allocation_id and an optional ttl_seconds (0 = never expires)."""
    obj = _object(body, "request body")
    unknown = sorted(set(obj) - {"allocation_id", "ttl_seconds"})
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}", code="unknown_field")
    if obj.get("allocation_id") is None:
        raise InvalidRequest("allocation_id is required")
    return RenewBody(
        allocation_id=_name(obj["allocation_id"], "allocation_id", REQUEST_ID_RE),
        ttl_seconds=_opt_number(obj, "ttl_seconds", 0.0, math.inf),
    )


@dataclass(frozen=True, slots=True)
class DrainBody:
    """Which GPU to drain or undrain, and why."""

    node: str
    index: int
    reason: str


def parse_drain_body(body: object, *, default_node: str, draining: bool) -> DrainBody:
    """Validate a drain/undrain body: `index`, optional `node` (default: this agent's) and `reason`."""
    obj = _object(body, "request body")
    allowed = {"node", "index", "reason"} if draining else {"node", "index"}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}", code="unknown_field"
        )
    index = _opt_int(obj, "index", 0, MAX_UNIT_INDEX)
    if index is None:
        raise InvalidRequest("index is required: the GPU's index on its node")
    node = obj.get("node")
    if node is not None and (not isinstance(node, str) or not NODE_NAME_RE.match(node)):
        raise InvalidRequest("node must be a node name: 1-128 letters, digits, '.', '_' or '-'")
    reason = obj.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_TEXT_LENGTH):
        raise InvalidRequest(f"reason must be a string of at most {MAX_TEXT_LENGTH} characters")
    return DrainBody(node=node or default_node, index=index, reason=reason or "")


def valid_id(value: str) -> bool:
    """Whether a path parameter can be an allocation or request id at all."""
    return REQUEST_ID_RE.match(value) is not None


# ---------------------------------------------------------------- field checks


def _or(value: object, default: object) -> Any:
    """`value`, or `default` when it is null: null means "not given" for every optional field."""
    return default if value is None else value


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


def _name(value: object, field: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field} is required and must be a non-empty string")
    if not pattern.match(value):
        raise InvalidRequest(
            f"{field} must be 1-128 characters of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return value


def _opt_int(obj: Mapping[str, Any], field: str, low: int, high: int) -> int | None:
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidRequest(f"{field} must be an integer")
    if not low <= value <= high:
        raise InvalidRequest(f"{field} must be between {low} and {high}, got {brief(str(value))}")
    return int(value)


def _opt_number(obj: Mapping[str, Any], field: str, low: float, high: float) -> float | None:
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{field} must be a finite number")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits: valid JSON, no float holds it
        number = math.inf
    if not math.isfinite(number):
        raise InvalidRequest(f"{field} must be a finite number")
    if not low <= number <= high:
        bound = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise InvalidRequest(f"{field} must be {bound}, got {brief(str(value))}")
    return number


# The integers a log entry can carry (msgpack's range): workload_data travels in the
# request's Enqueue or Allocate entry, so a larger one could never be proposed.
_LOG_INT_MIN, _LOG_INT_MAX = -(2**63), 2**64 - 1


def _check_log_safe(value: object, field: str) -> None:
    """Refuse an integer outside msgpack's 64-bit range anywhere in `value` (nesting is bounded by the decoder)."""
    if isinstance(value, dict):
        for item in value.values():
            _check_log_safe(item, field)
    elif isinstance(value, list):
        for item in value:
            _check_log_safe(item, field)
    elif isinstance(value, int) and not isinstance(value, bool) and not _LOG_INT_MIN <= value <= _LOG_INT_MAX:
        raise InvalidRequest(
            f"{field} holds an integer outside -2**63 .. 2**64-1: {brief(str(value))}", code="integer_out_of_range"
        )


def _opt_mig_profile(value: object, gpu_count: int | None, count_field: str) -> str | None:
    """A request's `mig_profile`: None, MIG_ANY or a profile name. Raises InvalidRequest."""
    if value is None:
        return None
    if not isinstance(value, str) or not (value == MIG_ANY or PROFILE_RE.match(value)):
        raise InvalidRequest(
            f"mig_profile must be a MIG profile name such as \"1g.10gb\" or \"3g.40gb\", or \"{MIG_ANY}\" "
            f"for the smallest slice that fits, got {brief(repr(value))}"
        )
    if gpu_count is not None and gpu_count != 1:
        # CUDA runs a process on one MIG device only, whatever CUDA_VISIBLE_DEVICES lists.
        raise InvalidRequest(
            f"a MIG request takes exactly one slice (CUDA uses one MIG device per process): "
            f"{count_field} must be 1 or left out with mig_profile, got {gpu_count}"
        )
    return value


def _opt_str(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_LENGTH:
        raise InvalidRequest(f"{field} must be a non-empty string of at most {MAX_TEXT_LENGTH} characters")
    return value


def _opt_url(value: object, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_URL_LENGTH or not _WEBHOOK_URL_RE.match(value):
        raise InvalidRequest(
            f"{field} must be an http:// or https:// URL of at most {MAX_URL_LENGTH} characters, with a valid "
            "host (a name, IPv4 or [IPv6] address) and port, and no spaces or control characters"
        )
    return value


# The most rows one page of /gpu/status may ask for (a 1,000-host cluster has 8,000 GPUs).
MAX_PAGE_ROWS = 10_000
_CURSOR_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})/(\d{1,6})\Z")


@dataclass(frozen=True, slots=True)
class StatusQuery:
    """GET /gpu/status's query: one node, a page after a cursor, or the summary."""

    node: str | None = None
    after: tuple[str, int] | None = None
    limit: int | None = None
    summary: bool = False


def parse_status_query(args: Mapping[str, str]) -> StatusQuery:
    """Validate `node`, `after` ("node/index"), `limit` (1..MAX_PAGE_ROWS) and `summary` (true/false).

    Unknown parameters are ignored (as the API always has). Raises InvalidRequest.
    """
    node = args.get("node")
    if node is not None and not NODE_NAME_RE.match(node):
        raise InvalidRequest("node must be a node name: 1-128 letters, digits, '.', '_' or '-'", code="invalid_request")
    after: tuple[str, int] | None = None
    raw_after = args.get("after")
    if raw_after is not None:
        match = _CURSOR_RE.match(raw_after)
        if match is None:
            raise InvalidRequest('after must be "<node>/<index>", as next_after gives it', code="invalid_request")
        after = (match.group(1), int(match.group(2)))
    limit: int | None = None
    raw_limit = args.get("limit")
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE_ROWS:
            raise InvalidRequest(f"limit must be an integer from 1 to {MAX_PAGE_ROWS}", code="invalid_request")
        limit = int(raw_limit)
    raw_summary = args.get("summary", "false").lower()
    if raw_summary not in ("true", "false", "1", "0"):
        raise InvalidRequest("summary must be true or false", code="invalid_request")
    return StatusQuery(node, after, limit, raw_summary in ("true", "1"))


# GET /usage: times as RFC 3339, Unix seconds, or a duration back from now ("90m", "24h", "7d").
# The patterns are shared with the OpenAPI document, so the two cannot disagree.
USAGE_GROUPINGS = ("queue", "service")
DEFAULT_USAGE_SPAN_S = 86_400.0
UNIX_SECONDS_PATTERN = r"^[0-9]{1,11}(\.[0-9]{1,9})?$"
DURATION_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,6})?[smhd]$"
RFC3339_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]"
    r"(:[0-5][0-9](\.[0-9]{1,9})?)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
# Times are clamped to 1970 … about 5138: a duration reaching before 1970 means "from
# the start", and hour arithmetic stays exact.
_MAX_USAGE_TIME = 1e11
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
# Python's `$` also matches before a trailing newline: fullmatch instead.
_UNIX_SECONDS_RE = re.compile(UNIX_SECONDS_PATTERN.strip("^$"))
_DURATION_RE = re.compile(DURATION_PATTERN.strip("^$"))
_RFC3339_RE = re.compile(RFC3339_PATTERN.strip("^$"))


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """GET /usage's query: the range [since, until) in Unix seconds and the grouping."""

    since: float
    until: float
    by: str


def parse_usage_query(args: Mapping[str, str], now: float) -> UsageQuery:
    """Validate `since` and `until` (default: the last 24 h up to `now`) and `by` (queue or service, default service).

    Each time is RFC 3339 with an offset, Unix seconds, or a duration back from
    `now` such as "7d" (the patterns above), clamped to 1970 … 1e11. Unknown
    parameters are ignored (as the API always has). Raises InvalidRequest for
    another form, a date that does not exist (February 30), or `since` after `until`.
    """
    until = _usage_time(args.get("until"), "until", now, default=now)
    since = _usage_time(args.get("since"), "since", now, default=max(0.0, until - DEFAULT_USAGE_SPAN_S))
    if since > until:
        raise InvalidRequest("since must not be after until", code="invalid_request")
    by = args.get("by", "service")
    if by not in USAGE_GROUPINGS:
        raise InvalidRequest(f"by must be one of {', '.join(USAGE_GROUPINGS)}, got {brief(by)}", code="invalid_request")
    return UsageQuery(since, until, by)


def _usage_time(raw: str | None, name: str, now: float, *, default: float) -> float:
    if raw is None:
        return default
    if duration := _DURATION_RE.fullmatch(raw):
        value = now - float(duration.group(0)[:-1]) * _DURATION_UNITS[raw[-1]]
    elif _UNIX_SECONDS_RE.fullmatch(raw):
        value = float(raw)
    elif _RFC3339_RE.fullmatch(raw):
        try:
            value = datetime.fromisoformat(raw[:-1] + "+00:00" if raw[-1] in "Zz" else raw).timestamp()
        except ValueError:
            raise InvalidRequest(f"{name} names a date that does not exist: {brief(raw)}", code="invalid_request") from None
    else:
        raise InvalidRequest(
            f"{name} must be RFC 3339 with an offset (2026-12-01T00:00:00Z), Unix seconds or a duration "
            f"back from now (90m, 24h, 7d), got {brief(raw)}",
            code="invalid_request",
        )
    return min(max(value, 0.0), _MAX_USAGE_TIME)
