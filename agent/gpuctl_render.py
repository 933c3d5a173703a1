"""`gpuctl`'s rendering: the API's JSON, and `now`, turned into text for people.

Every function here is pure: no HTTP, no clock (the caller passes `now`, seconds
since the epoch), so the tables are tested without an agent or a frozen clock.
Renderers take an answer as the API gives it and tolerate missing fields: a value
the API does not have is shown as `-`, an unparsable time as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

JsonObject = dict[str, Any]


def parse_time(text: Any) -> float | None:
    """An RFC 3339 timestamp as seconds since the epoch, or None if absent or unparsable."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def span(seconds: float) -> str:
    """A duration in at most two units: 45s, 4m10s, 23h59m, 3d4h."""
    s = int(round(abs(seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s" if s else f"{m}m"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m" if m else f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def relative(text: Any, now: float, *, missing: str = "-") -> str:
    """An RFC 3339 time relative to `now`: `in 23h59m`, `5m ago`, `now`."""
    moment = parse_time(text)
    if moment is None:
        return missing if text is None else str(text)
    delta = moment - now
    if abs(delta) < 1:
        return "now"
    return f"in {span(delta)}" if delta > 0 else f"{span(delta)} ago"


def absolute(text: Any, now: float, *, missing: str = "-") -> str:
    """An RFC 3339 time as given, followed by its relative form: `2026-…Z (in 1d)`."""
    if text is None:
        return missing
    return f"{text} ({relative(text, now)})"


def gib(mb: Any) -> str:
    return f"{mb / 1024:.1f}" if isinstance(mb, (int, float)) else "?"


def memory(used_mb: Any, total_mb: Any) -> str:
    """MiB figures as `12.3/80.0 GiB`."""
    return f"{gib(used_mb)}/{gib(total_mb)} GiB"


def _num(value: Any, unit: str) -> str:
    return f"{value:.0f}{unit}" if isinstance(value, (int, float)) else "-"


def _obj(value: Any) -> JsonObject:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> str:
    """Rows under headers, columns two spaces apart; columns in `right` align right."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    """`key  value` lines with the values aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in pairs)


# A leased GPU idle for longer than this shows its idle time in the LEASE column:
# a minute rules out the pauses between a job's steps and data loads.
IDLE_LEASE_SHOWN_AFTER_S = 60.0


def gpu_name(gpu: JsonObject) -> str:
    """A GPU as `node:index`, the form `gpuctl drain` takes."""
    return f"{_text(gpu.get('node'))}:{_text(gpu.get('index'))}"


def _health_cell(gpu: JsonObject) -> str:
    state = _text(gpu.get("health"))
    return f"{state},drained" if gpu.get("drained") else state


def _lease_cell(gpu: JsonObject) -> str:
    if not gpu.get("allocated"):
        return "(unleased use)" if gpu.get("in_use_without_lease") else "-"
    holder = _text(gpu.get("allocated_to"))
    idle = gpu.get("lease_idle_seconds")
    if isinstance(idle, (int, float)) and idle > IDLE_LEASE_SHOWN_AFTER_S:
        return f"{holder} (idle {span(idle)})"
    return holder


def _health_text(gpu: JsonObject, now: float) -> str:
    """`degraded: reason; reason`, and when an unhealthy GPU returns if nothing new happens."""
    text = _text(gpu.get("health"))
    reasons = "; ".join(str(r) for r in gpu.get("health_reasons") or [])
    if reasons:
        text += f": {reasons}"
    back = parse_time(gpu.get("healthy_again_at"))
    if back is not None and back > now:
        text += f" (healthy again {relative(gpu.get('healthy_again_at'), now)} if nothing new happens)"
    return text


def _status_notes(gpus: Sequence[JsonObject], now: float) -> list[str]:
    """One line per GPU that is not healthy, and one per drained GPU, saying why."""
    notes = []
    for gpu in gpus:
        if gpu.get("health") not in (None, "healthy"):
            notes.append(f"{gpu_name(gpu)} {_health_text(gpu, now)}")
        if gpu.get("drained"):
            reason = gpu.get("drain_reason")
            notes.append(f"{gpu_name(gpu)} drained: {reason}" if reason else f"{gpu_name(gpu)} drained")
    return notes


def largest_request_text(largest: Any) -> str | None:
    """A `largest_request` object as "5 GPU(s), 4 all-NVLink; a share of 79.6 GiB; MIG 1g.10gb:5,3g.40gb:1".

    None when there is none to show; the share and MIG parts only where the answer has them.
    """
    if not isinstance(largest, dict) or largest.get("gpus") is None:
        return None
    text = f"{largest['gpus']} GPU(s)"
    if largest.get("nvlink") is not None:
        text += f", {largest['nvlink']} all-NVLink"
    if isinstance(largest.get("share_mb"), int) and largest["share_mb"] > 0:
        text += f"; a share of {gib(largest['share_mb'])} GiB"
    if isinstance(largest.get("mig"), dict):
        text += f"; MIG {_mig_free_cell(largest['mig'])}"
    return text


def _mig_free_cell(mig: Any) -> str:
    """Free MIG instances by profile as "1g.10gb:5,3g.40gb:1", in the API's order (smallest profile first).

    Profiles with none free are left out: "0" when none is free, "-" without MIG.
    """
    if not isinstance(mig, dict):
        return "-"
    free = [f"{profile}:{count}" for profile, count in mig.items() if isinstance(count, int) and count > 0]
    return ",".join(free) if free else "0"


def render_status(payload: JsonObject, now: float, largest: JsonObject | None = None) -> str:
    """GET /gpu/status as a table of GPUs by node, a summary line, and why GPUs are out of service.

    `largest` (the cluster's `largest_request` from the summary) adds a last
    line: the largest request that fits now.
    """
    gpus = payload.get("gpus") or []
    if not gpus:
        return "no GPUs"
    rows: list[list[str]] = []
    for g in gpus:
        rows.append(
            [
                _text(g.get("node")),
                _text(g.get("index")),
                _text(g.get("name")),
                memory(g.get("memory_used"), g.get("memory_total")),
                _num(g.get("utilization"), "%"),
                _num(g.get("temperature"), "C"),
                _health_cell(g),
                # A GPU in MIG mode is leased by its slices, listed under it.
                "(MIG)" if isinstance(g.get("mig_instances"), list) and not g.get("allocated") else _lease_cell(g),
                _text(g.get("allocation_id")),
            ]
        )
        rows.extend(_slice_row(g, s) for s in g.get("mig_instances") or [] if isinstance(s, dict))
    headers = ["NODE", "IDX", "MODEL", "MEMORY", "UTIL", "TEMP", "HEALTH", "LEASE", "ALLOCATION"]
    nodes = len({g.get("node") for g in gpus})
    counts = [
        ("leased", sum(1 for g in gpus if _leased(g))),
        ("degraded", sum(1 for g in gpus if g.get("health") == "degraded")),
        ("unhealthy", sum(1 for g in gpus if g.get("health") == "unhealthy")),
        ("drained", sum(1 for g in gpus if g.get("drained"))),
        ("in use without a lease", sum(1 for g in gpus if g.get("in_use_without_lease"))),
    ]
    # "leased" is always shown; the others only when there is something to see.
    summary = f"{len(gpus)} GPU(s) on {nodes} node(s), " + ", ".join(
        f"{n} {what}" for what, n in counts if n or what == "leased"
    )
    notes = "".join(f"\n  {line}" for line in _status_notes(gpus, now))
    fits = largest_request_text(largest)
    if fits is not None:
        notes += f"\nlargest request now: {fits}"
    return table(headers, rows, right=frozenset({1, 3, 4, 5})) + "\n\n" + summary + notes


def _leased(gpu: JsonObject) -> bool:
    """Held by a lease, or for a GPU in MIG mode, any of its slices is."""
    return bool(gpu.get("allocated")) or any(_obj(i).get("allocated") for i in gpu.get("mig_instances") or [])


def _slice_row(gpu: JsonObject, instance: JsonObject) -> list[str]:
    """One MIG slice of `gpu` as a row under it: its unit index and profile, its GPU's health."""
    total, free = instance.get("memory_total"), instance.get("memory_free")
    used = total - free if isinstance(total, int) and isinstance(free, int) else None
    return [
        _text(gpu.get("node")),
        _text(instance.get("index")),
        f"  MIG {_text(instance.get('profile'))}",
        memory(used, total),
        "-",
        "-",
        _health_cell(gpu),
        _text(instance.get("allocated_to")) if instance.get("allocated") else "-",
        _text(instance.get("allocation_id")),
    ]


def render_status_summary(payload: JsonObject, now: float) -> str:
    """GET /gpu/status?summary=true as one line per node and a cluster total."""
    nodes = payload.get("nodes") or []
    total = payload.get("summary") or {}
    if not nodes:
        return "no GPUs"
    rows = []
    for n in nodes:
        largest = _obj(n.get("largest_request"))
        share = largest.get("share_mb")
        rows.append(
            [
                _text(n.get("node")),
                _text(n.get("gpus")),
                _text(n.get("allocated")),
                _text(n.get("unhealthy")),
                _text(n.get("drained")),
                _text(largest.get("gpus")),
                _text(largest.get("nvlink")),
                f"{gib(share)} GiB" if isinstance(share, int) and share > 0 else "-",
                _mig_free_cell(largest.get("mig")),
                "" if n.get("scheduled_here", True) else "another cluster's",
            ]
        )
    # FITS, NVLINK, SHARE and MIG: the largest request of each shape the node takes now.
    headers = ["NODE", "GPUS", "LEASED", "UNHEALTHY", "DRAINED", "FITS", "NVLINK", "SHARE", "MIG", ""]
    line = (
        f"{total.get('gpus', 0)} GPU(s) on {total.get('nodes', 0)} node(s), {total.get('allocated', 0)} leased, "
        f"{total.get('unhealthy', 0)} unhealthy, {total.get('drained', 0)} drained"
    )
    fits = largest_request_text(total.get("largest_request"))
    if fits is not None:
        line += f"\nlargest request now: {fits}"
    hint = "gpuctl status --node NODE for one node's GPUs, --all for every GPU"
    return table(headers, rows, right=frozenset({1, 2, 3, 4, 5, 6, 7})) + "\n\n" + line + "\n" + hint


def render_gpu(gpu: JsonObject, now: float) -> str:
    """One /gpu/status row (the answer to drain and undrain) as a key/value block."""
    drained = "no"
    if gpu.get("drained"):
        drained = f"yes: {gpu['drain_reason']}" if gpu.get("drain_reason") else "yes"
    lease = _lease_cell(gpu)
    if gpu.get("allocated"):
        lease += f", allocation {_text(gpu.get('allocation_id'))}"
        if gpu.get("drained"):
            lease += " (runs on until released; no new leases here)"
    return key_values(
        [
            ("gpu", gpu_name(gpu)),
            ("model", _text(gpu.get("name"))),
            ("health", _health_text(gpu, now)),
            ("drained", drained),
            ("lease", lease),
        ]
    )


def render_list(payload: JsonObject, now: float) -> str:
    """GET /gpu/list as an allocations table and a queue table."""
    allocations = payload.get("allocations") or []
    queue = payload.get("queue") or []
    parts = [f"ALLOCATIONS ({len(allocations)})"]
    # A gang is listed a row per node; the GANG column (only when a gang is live) ties them together.
    gangs = any(isinstance(a.get("gang"), dict) for a in allocations)
    if allocations:
        parts.append(
            table(
                ["ID", "SERVICE", "TYPE", "PRIO", "NODE", "GPUS", "ALLOCATED", "EXPIRES", *(["GANG"] if gangs else [])],
                [
                    [
                        _text(a.get("allocation_id")),
                        _text(a.get("service_name")),
                        _text(a.get("workload_type")),
                        _text(a.get("priority")),
                        _text(a.get("node")),
                        ",".join(str(i) for i in a.get("gpu_ids") or []),
                        relative(a.get("allocated_at"), now),
                        relative(a.get("expires_at"), now, missing="never"),
                        *([_gang_cell(a.get("gang"))] if gangs else []),
                    ]
                    for a in allocations
                ],
                right=frozenset({3}),
            )
        )
    parts.append(f"\nQUEUE ({len(queue)})")
    if queue:
        parts.append(
            table(
                ["POS", "REQUEST", "SERVICE", "QUEUE", "PRIO", "GPUS", "MEM/GPU", "SUBMITTED", "DEADLINE", "REASON"],
                [
                    [
                        _text(q.get("position")),
                        _text(q.get("request_id")),
                        _text(q.get("service_name")),
                        _text(q.get("queue_name")),
                        _text(q.get("priority")),
                        _gpus_cell(_obj(q.get("requirements"))),
                        f"{gib(_obj(q.get('requirements')).get('min_memory_mb'))} GiB",
                        relative(q.get("submitted_at"), now),
                        relative(q.get("queue_deadline"), now, missing="never"),
                        _reason_cell(q, now),
                    ]
                    for q in queue
                ],
                right=frozenset({0, 4, 5, 6}),
            )
        )
        details = [f"  {_text(q.get('request_id'))}: {q['reason_detail']}" for q in queue if q.get("reason_detail")]
        if details:
            parts.append("\nwhy:\n" + "\n".join(details))
    return "\n".join(parts)


def _gang_cell(gang: Any) -> str:
    """A gang member's place: `trainer-1a2b rank 0/2`; `-` for a single-node lease."""
    if not isinstance(gang, dict):
        return "-"
    return f"{_text(gang.get('gang_id'))} rank {_text(gang.get('rank'))}/{_text(gang.get('size'))}"


def _gpus_cell(req: JsonObject) -> str:
    """A request's GPUs: `4`, or `2x4` for a gang of 2 nodes with 4 each."""
    if req.get("nodes"):
        return f"{_text(req.get('nodes'))}x{_text(req.get('gpus_per_node'))}"
    return _text(req.get("gpu_count"))


def _reason_cell(queued: JsonObject, now: float) -> str:
    """Why a request waits, in a word: `priority`, `preempting (in 25s)`."""
    reason = _text(queued.get("reason"))
    if queued.get("preempting_deadline"):
        reason += f" ({relative(queued.get('preempting_deadline'), now)})"
    return reason


def _reason_text(queued: JsonObject, now: float) -> str:
    """Why a request waits, in words: `resources: no node has 4 free H100s`."""
    text = _reason_cell(queued, now)
    if queued.get("reason_detail"):
        text += f": {queued['reason_detail']}"
    return text


def _requirements(req: Any) -> str:
    if not isinstance(req, dict):
        return "-"
    count = f"{_text(req.get('gpu_count'))} GPU(s)"
    if req.get("nodes"):
        count = f"{_text(req.get('nodes'))} nodes x {_text(req.get('gpus_per_node'))} GPU(s)"
    text = (
        f"{count}, >= {gib(req.get('min_memory_mb'))} GiB each, "
        f"max util {_num(req.get('max_utilization'), '%')}"
    )
    if req.get("gpu_model"):
        text += f", model {req['gpu_model']}"
    if req.get("node"):
        text += f", node {req['node']}"
    if req.get("decided_by"):
        text += f" (decided by {req['decided_by']})"
    return text


def _allocation_pairs(alloc: JsonObject, now: float) -> list[tuple[str, str]]:
    gpus = alloc.get("gpus") or []
    models = sorted({str(g.get("name")) for g in gpus if g.get("name")})
    indices = ", ".join(str(i) for i in alloc.get("gpu_ids") or [])
    pairs = [
        ("allocation", _text(alloc.get("allocation_id"))),
        ("service", _text(alloc.get("service_name"))),
        ("request", _text(alloc.get("request_id"))),
        ("type", _text(alloc.get("workload_type"))),
        ("priority", _text(alloc.get("priority"))),
        ("node", _text(alloc.get("node"))),
        ("gpus", f"{indices}  ({len(gpus)} x {' / '.join(models) or '?'})"),
        ("cuda_visible_devices", _text(alloc.get("cuda_visible_devices"))),
        ("allocated_at", absolute(alloc.get("allocated_at"), now)),
        ("expires_at", absolute(alloc.get("expires_at"), now, missing="never")),
        ("requirements", _requirements(alloc.get("requirements"))),
    ]
    if alloc.get("workflow_id"):
        pairs.append(("workflow", str(alloc["workflow_id"])))
    wiring = _topology(alloc.get("topology"))
    if wiring is not None:
        pairs.append(("topology", wiring))
    pairs.extend(_gang_pairs(alloc))
    return pairs


def _gang_pairs(alloc: JsonObject) -> list[tuple[str, str]]:
    """A gang's nodes (rank: node, GPUs) and rendezvous; a member's gang; nothing for a single-node lease."""
    nodes = alloc.get("nodes")
    rendezvous = alloc.get("rendezvous")
    if isinstance(nodes, list) and isinstance(rendezvous, dict):
        pairs = [
            (
                f"rank {_text(n.get('rank'))}",
                f"{_text(n.get('node'))} GPUs {','.join(str(i) for i in n.get('gpu_ids') or [])}"
                f"  ({_text(n.get('allocation_id'))})",
            )
            for n in nodes
            if isinstance(n, dict)
        ]
        ports = rendezvous.get("port_range") or []
        span = f"{ports[0]}-{ports[1]}" if len(ports) == 2 else "?"
        pairs.append(
            (
                "rendezvous",
                f"{_text(rendezvous.get('address'))}:{_text(rendezvous.get('port'))} "
                f"(--nnodes {_text(rendezvous.get('nnodes'))}, ports {span})",
            )
        )
        return pairs
    if isinstance(alloc.get("gang"), dict):
        return [("gang", _gang_cell(alloc["gang"]))]
    return []


def _topology(topology: Any) -> str | None:
    """An allocation's `topology` as "NV12 (score 300), NUMA 0, CPUs 0-31"; None when unknown."""
    if not isinstance(topology, dict):
        return None
    links = topology.get("links")
    parts = [f"{links} (score {_text(topology.get('score'))})" if links else "one GPU"]
    parts.append(f"NUMA {_text(topology.get('numa_node'))}")
    parts.append(f"CPUs {_text(topology.get('cpu_list'))}")
    return ", ".join(parts)


def render_allocation(alloc: JsonObject, now: float) -> str:
    """One allocation object as a key/value block."""
    return key_values(_allocation_pairs(alloc, now))


def _queued_pairs(queued: JsonObject, now: float) -> list[tuple[str, str]]:
    return [
        ("request", _text(queued.get("request_id"))),
        ("service", _text(queued.get("service_name"))),
        ("position", _text(queued.get("position"))),
        ("queue", _text(queued.get("queue_name"))),
        ("priority", _text(queued.get("priority"))),
        ("requirements", _requirements(queued.get("requirements"))),
        ("submitted_at", absolute(queued.get("submitted_at"), now)),
        ("queue_deadline", absolute(queued.get("queue_deadline"), now, missing="never")),
        ("waiting_for", _reason_text(queued, now)),
    ]


def render_queued(queued: JsonObject, now: float) -> str:
    """A 202 from POST /gpu/allocate: what is waiting and how to follow it."""
    request_id = _text(queued.get("request_id"))
    return (
        f"queued: nothing is allocated yet\n{key_values(_queued_pairs(queued, now))}\n\n"
        f"follow it: gpuctl request {request_id}\n"
        f"cancel it: gpuctl release --request-id {request_id}"
    )


def render_request(record: JsonObject, now: float) -> str:
    """GET /gpu/requests/{id}: the request's status, then what it became."""
    pairs = [
        ("request", _text(record.get("request_id"))),
        ("service", _text(record.get("service_name"))),
        ("status", _text(record.get("status"))),
        ("submitted_at", absolute(record.get("submitted_at"), now)),
        ("updated_at", absolute(record.get("updated_at"), now)),
        ("allocation", _text(record.get("allocation_id"))),
        ("reason", _text(record.get("reason"))),
    ]
    text = key_values(pairs)
    if isinstance(record.get("allocation"), dict):
        text += "\n\n" + render_allocation(record["allocation"], now)
    if isinstance(record.get("queue"), dict):
        queued = record["queue"]
        text += "\n\n" + key_values(
            [
                ("position", _text(queued.get("position"))),
                ("queue", _text(queued.get("queue_name"))),
                ("requirements", _requirements(queued.get("requirements"))),
                ("queue_deadline", absolute(queued.get("queue_deadline"), now, missing="never")),
                ("waiting_for", _reason_text(queued, now)),
            ]
        )
    return text


def render_release(result: JsonObject, now: float) -> str:
    """POST /gpu/release: one line per allocation released or request cancelled."""
    lines = [f"released {a}" for a in result.get("released") or []]
    lines += [f"cancelled {r}" for r in result.get("cancelled") or []]
    return "\n".join(lines) or "nothing to release"


def render_analysis(analysis: JsonObject, now: float) -> str:
    """POST /gpu/workload: the figures it would be scheduled with, and how they were derived."""
    mb = analysis.get("min_memory_mb")
    pairs = [
        ("workload_type", _text(analysis.get("workload_type"))),
        ("gpus", _text(analysis.get("required_gpus"))),
        ("memory_per_gpu", f"{_text(mb)} MB ({gib(mb)} GiB)"),
        ("priority", _text(analysis.get("priority"))),
        ("max_utilization", _num(analysis.get("max_utilization"), "%")),
        ("decided_by", _text(analysis.get("decided_by"))),
    ]
    if analysis.get("advisor_fallback_reason"):
        pairs.append(("advisor_fallback", str(analysis["advisor_fallback_reason"])))
    estimate = _obj(analysis.get("estimate"))
    if estimate.get("formula"):
        pairs.append(("formula", str(estimate["formula"])))
    text = key_values(pairs)
    rules = estimate.get("rules") or []
    if rules:
        text += "\nrules:\n" + "\n".join(f"  - {r}" for r in rules)
    return text


def render_members(payload: JsonObject, now: float) -> str:
    """GET /cluster/members as a table."""
    members = payload.get("members") or []
    if not members:
        return "no members"
    rows = [
        [
            _text(m.get("name")),
            _text(m.get("status")),
            _text(m.get("role")),
            "*" if m.get("leader") else "",
            _text(_obj(m.get("addresses")).get("http")),
            _text(m.get("gpus")),
            _text(m.get("version")),
        ]
        for m in members
    ]
    return table(["NAME", "STATUS", "ROLE", "LEADER", "HTTP", "GPUS", "VERSION"], rows, right=frozenset({5}))


def render_servers(payload: JsonObject, now: float) -> str:
    """GET (or POST/DELETE) /cluster/servers as a table: the Raft voters, then servers waiting to be added."""
    servers = payload.get("servers") or []
    if not servers:
        return "no servers"
    rows = [
        [
            _text(s.get("name")),
            "yes" if s.get("voter") else "no",
            "yes" if s.get("alive") else f"no ({_text(s.get('status'))})",
            "*" if s.get("leader") else "",
            _text(s.get("address")),
        ]
        for s in servers
    ]
    text = table(["NAME", "VOTER", "ALIVE", "LEADER", "ADDRESS"], rows)
    voters = [s for s in servers if s.get("voter")]
    alive = sum(1 for s in voters if s.get("alive"))
    quorum = len(voters) // 2 + 1
    text += f"\n\n{len(voters)} voter(s), {alive} alive; quorum {quorum}"
    if voters and alive < quorum:
        text += " - NOT MET: no leader can be elected until enough voters return"
    return text


def render_leader(payload: JsonObject, now: float) -> str:
    """GET /cluster/leader as a key/value block."""
    leader = payload.get("leader")
    name = "none (no leader elected)" if leader is None else str(leader)
    if payload.get("is_self"):
        name += " (this agent)"
    return key_values(
        [("leader", name), ("address", _text(payload.get("address"))), ("term", _text(payload.get("term")))]
    )


def render_health(payload: JsonObject, now: float) -> str:
    """GET /healthz as a key/value block."""
    devices = _obj(payload.get("devices"))
    leases = _obj(payload.get("lease_table"))
    outbox = _obj(payload.get("outbox"))
    pairs = [
        ("status", _text(payload.get("status"))),
        ("node", _text(payload.get("node"))),
        ("role", _text(payload.get("role"))),
        ("leader", _text(payload.get("leader"))),
        ("version", _text(payload.get("version"))),
        ("started_at", absolute(payload.get("started_at"), now)),
    ]
    if devices:
        pairs.append(
            (
                "devices",
                f"{_text(devices.get('backend'))}, {_text(devices.get('gpus'))} GPU(s), "
                f"last sample {relative(devices.get('last_sample_at'), now, missing='never')}",
            )
        )
        if devices.get("degraded"):
            pairs.append(("degraded", str(devices["degraded"])))
    if leases:
        pairs.append(
            (
                "lease_table",
                f"{_text(leases.get('allocations'))} allocation(s), "
                f"{_text(leases.get('queue_depth'))} queued",
            )
        )
    if outbox:
        pending, gave_up = _text(outbox.get("pending")), _text(outbox.get("gave_up"))
        pairs.append(("outbox", f"{pending} pending, {gave_up} gave up"))
    return key_values(pairs)


def gpu_hours(seconds: Any) -> str:
    """GPU-seconds as GPU-hours with one decimal: `12.5`."""
    return f"{seconds / 3600:.1f}" if isinstance(seconds, (int, float)) else "-"


def render_usage(payload: JsonObject, now: float) -> str:
    """GET /usage as a table of GPU-hours per queue or service, busiest first, with the totals."""
    by = _text(payload.get("by"))
    rows = [r for r in payload.get("usage") or [] if isinstance(r, dict)]
    window = f"{_text(payload.get('since'))} .. {_text(payload.get('until'))}"
    if not rows:
        return f"no GPU usage in {window}"
    ordered = sorted(rows, key=lambda r: -r["allocated_gpu_seconds"] if isinstance(r.get("allocated_gpu_seconds"), (int, float)) else 0)
    cells = [
        [
            _text(r.get(by)),
            gpu_hours(r.get("allocated_gpu_seconds")),
            gpu_hours(r.get("utilized_gpu_seconds")),
            _num(r["utilization"] * 100, "%") if isinstance(r.get("utilization"), (int, float)) else "-",
        ]
        for r in ordered
    ]
    totals = _obj(payload.get("totals"))
    cells.append(["TOTAL", gpu_hours(totals.get("allocated_gpu_seconds")), gpu_hours(totals.get("utilized_gpu_seconds")), ""])
    text = table([by.upper(), "ALLOCATED GPU-H", "UTILIZED GPU-H", "UTIL"], cells, right=frozenset({1, 2, 3}))
    return f"{text}\n\n{window} (whole hours; kept {_text(payload.get('retention_days'))} days)"


def _number(value: Any) -> str:
    """A count or share: `3`, `2.5`; `-` when absent."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{value:g}"


def _guarantee_cell(queue: JsonObject) -> str:
    by_model = _obj(queue.get("guaranteed_by_model"))
    if by_model:
        return ",".join(f"{model}:{n}" for model, n in sorted(by_model.items()))
    return _number(queue.get("guaranteed_gpus"))


def _terms_cell(queue: JsonObject) -> str:
    """What sets the queue apart from the defaults, in short: `no-borrow,no-lend,idle<5%/30m`."""
    terms = []
    if queue.get("borrow") is False:
        terms.append("no-borrow")
    if queue.get("lend") is False:
        terms.append("no-lend")
    if isinstance(queue.get("max_priority"), int) and queue["max_priority"] < 10:
        terms.append(f"prio<={queue['max_priority']}")
    idle = _obj(queue.get("idle_reclaim"))
    if idle:
        terms.append(f"idle<{_number(idle.get('utilization_pct'))}%/{_number(idle.get('minutes'))}m")
    return ",".join(terms) or "-"


def render_queues(payload: JsonObject, now: float) -> str:
    """GET /queues as a table: each queue's terms and where it stands, children under their parent."""
    queues = [q for q in payload.get("queues") or [] if isinstance(q, dict)]
    if not queues:
        return "no queues"
    by_name = {str(q.get("name")): q for q in queues}
    ordered: list[tuple[str, JsonObject]] = []
    for q in queues:
        if q.get("parent") in by_name:
            continue  # shown under its parent
        ordered.append((str(q.get("name")), q))
        ordered += [(f"  {c}", by_name[c]) for c in q.get("children") or [] if c in by_name]
    rows = [
        [
            name,
            _guarantee_cell(q),
            _number(q.get("weight")),
            _number(q.get("max_gpus")) if q.get("max_gpus") is not None else "-",
            _number(q.get("in_use_gpus")),
            _number(q.get("borrowed_gpus")),
            _number(q.get("fair_share_gpus")),
            f"{_number(q.get('pending_requests'))} ({_number(q.get('pending_gpus'))} GPUs)",
            _number(q.get("preempting_leases")),
            _terms_cell(q),
        ]
        for name, q in ordered
    ]
    headers = ["QUEUE", "GUARANTEED", "WEIGHT", "MAX", "IN USE", "BORROWED", "FAIR SHARE", "PENDING", "PREEMPTING", "TERMS"]
    text = table(headers, rows, right=frozenset({2, 3, 4, 5, 6, 8}))
    if not any(q.get("declared") for q in queues):
        text += "\n\nno queue is configured: one default queue, strict priority ([queues.<name>] in the config)"
    return text
