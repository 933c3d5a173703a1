"""`gpuctl`: the operator CLI against any agent's HTTP API.

Every command is one or two HTTP requests to one agent (any agent: each one
answers for the cluster or forwards to the leader). The answer is printed as an
aligned table or a key/value block, or with `--json` as the API's JSON verbatim,
indented. This module parses the arguments, talks HTTP and dispatches commands;
turning the API's JSON into text is `agent.gpuctl_render`, pure functions of
the JSON and `now`.

Exit status (also in `gpuctl --help` and docs/gpuctl.md), for scripts:

    0  ok
    1  the API answered an error (`error: <code>: <message>` on stderr)
    2  usage error (bad flags or arguments, unreadable --api-key-file)
    3  the agent is unreachable (connection refused, timed out)
    4  `allocate` was queued rather than allocated, so
       `gpuctl allocate ... && run-job` only runs the job on GPUs it holds
    5  authentication or authorisation refused (HTTP 401 or 403)

Error handling: `AgentClient` turns every transport failure and non-2xx answer
into a `CtlError` carrying its exit status; `main` is the one place that prints
it and returns the status.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from agent.cluster_keyring import main as keyring_main
from agent.gpuctl_render import (
    JsonObject,
    render_allocation,
    render_analysis,
    render_gpu,
    render_health,
    render_leader,
    render_list,
    render_members,
    render_queued,
    render_queues,
    render_release,
    render_request,
    render_servers,
    render_status,
    render_status_summary,
    render_usage,
)

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_QUEUED = 4
EXIT_AUTH = 5

DEFAULT_ADDRESS = "http://127.0.0.1:8086"
DEFAULT_PORT = 8086
DEFAULT_TIMEOUT_S = 10.0
ADDRESS_ENV = "GPU_AGENT_ADDR"
API_KEY_ENV = "GPU_AGENT_API_KEY"
CACERT_ENV = "GPU_AGENT_CACERT"

EXIT_STATUS_HELP = """\
exit status:
  0  ok
  1  the API answered an error (printed as "error: <code>: <message>" on stderr)
  2  usage error
  3  agent unreachable (connection refused or timed out)
  4  allocate was queued, not allocated (so `gpuctl allocate ... && run-job` is safe)
  5  authentication refused (HTTP 401 or 403)

environment:
  GPU_AGENT_ADDR     default --address (else http://127.0.0.1:8086)
  GPU_AGENT_API_KEY  default API key (--api-key and --api-key-file win)
  GPU_AGENT_CACERT   default --cacert (a PEM CA bundle for https:// agents)
"""

# ---------------------------------------------------------------------- errors


class CtlError(Exception):
    """A command that cannot succeed; `exit_code` is what gpuctl exits with."""

    exit_code = EXIT_API_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CtlError):
    """Options that argparse accepted but that still make no sense (exit 2)."""

    exit_code = EXIT_USAGE


class Unreachable(CtlError):
    """No HTTP answer from the agent: refused, unresolvable, timed out (exit 3)."""

    exit_code = EXIT_UNREACHABLE


class ApiRefusal(CtlError):
    """The API answered with an error status; its message is `<code>: <message>`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code = status, code
        self.exit_code = EXIT_AUTH if status in (401, 403) else EXIT_API_ERROR


# ---------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Settings:
    """Where and how to reach the agent, resolved from flags, environment and defaults."""

    address: str
    api_key: str | None
    timeout_s: float
    # PEM CA bundle that verifies an https:// agent; None = the system trust store.
    cacert: Path | None = None


def normalize_address(raw: str) -> str:
    """Return `raw` as a base URL without a trailing slash.

    `host:port` and `host` are accepted without a scheme (http:// is assumed,
    and port 8086 when none is given). Raises UsageError for anything that is
    not an http(s) URL with a host.
    """
    text = raw.strip()
    if not text:
        raise UsageError("--address is empty")
    bare = "://" not in text
    try:
        url = httpx.URL(f"http://{text}" if bare else text)
    except httpx.InvalidURL as exc:
        raise UsageError(f"--address {raw!r} is not a valid address: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError(f"--address {raw!r} must be host:port or an http(s):// URL")
    if bare and url.port is None:
        url = url.copy_with(port=DEFAULT_PORT)
    return str(url).rstrip("/")


class AgentClient:
    """A thin synchronous client: JSON in, JSON out, every failure a CtlError."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        headers = {"Accept": "application/json", "User-Agent": f"gpuctl/{_version()}"}
        if settings.api_key is not None:
            # X-API-Key is the default header; Bearer is accepted by every agent
            # whatever its [auth] header_name, so the key works either way.
            headers["X-API-Key"] = settings.api_key
            headers["Authorization"] = f"Bearer {settings.api_key}"
        verify: ssl.SSLContext | bool = True
        if settings.cacert is not None:
            try:
                verify = ssl.create_default_context(cafile=str(settings.cacert))
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"cannot load --cacert {settings.cacert}: {exc}") from None
        self._http = httpx.Client(
            base_url=settings.address, headers=headers, timeout=settings.timeout_s, verify=verify
        )

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    def get(self, path: str) -> tuple[int, Any]:
        """GET `path`; returns (status, decoded JSON). Raises CtlError."""
        return self._send("GET", path, None)

    def post(self, path: str, body: JsonObject) -> tuple[int, Any]:
        """POST `body` as JSON to `path`; returns (status, decoded JSON). Raises CtlError."""
        return self._send("POST", path, body)

    def delete(self, path: str) -> tuple[int, Any]:
        """DELETE `path`; returns (status, decoded JSON). Raises CtlError."""
        return self._send("DELETE", path, None)

    def _send(self, method: str, path: str, body: JsonObject | None) -> tuple[int, Any]:
        where = self.settings.address
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise Unreachable(
                f"the agent at {where} did not answer within {self.settings.timeout_s:g} s"
            ) from None
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach the agent at {where}: {exc}") from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.is_success:
            if payload is None:
                raise CtlError(f"the agent at {where} answered {method} {path} with something not JSON")
            return response.status_code, payload
        raise self._refusal(response, payload)

    def _refusal(self, response: httpx.Response, payload: Any) -> ApiRefusal:
        status = response.status_code
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            code, message = error["code"], str(error.get("message", ""))
        else:
            # Not the API's error shape: a proxy or something else on that port.
            first_line = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
            code, message = f"http_{status}", first_line or response.reason_phrase
        retry_after = response.headers.get("Retry-After")
        if retry_after:
            message += f" (retry after {retry_after} s)"
        if status == 401 and self.settings.api_key is None:
            message += f" (give --api-key, --api-key-file or ${API_KEY_ENV})"
        return ApiRefusal(status, code, message)


def _path(*segments: str) -> str:
    return "/" + "/".join(quote(s, safe="") for s in segments)


def _version() -> str:
    try:
        return importlib.metadata.version("gpu-orchestrator")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# ---------------------------------------------------------------------- commands


Renderer = Callable[[JsonObject, float], str]


@dataclass(frozen=True)
class Result:
    """A command's answer: the API's JSON, how to render it, and the exit status."""

    payload: Any
    render: Renderer
    exit_code: int = EXIT_OK


Command = Callable[[AgentClient, argparse.Namespace], Result]


def _getter(path: Callable[[argparse.Namespace], str], render: Renderer) -> Command:
    """A command that GETs one path and renders the answer."""

    def command(client: AgentClient, args: argparse.Namespace) -> Result:
        _, payload = client.get(path(args))
        return Result(payload, render)

    return command


# Past this many nodes `gpuctl status` shows counts per node first (8 GPUs a node: 400 rows).
STATUS_DETAIL_MAX_NODES = 50


def cmd_status(client: AgentClient, args: argparse.Namespace) -> Result:
    """GPUs by node; on a big cluster counts per node first, and one node's GPUs with --node."""
    if args.node is not None:
        _, payload = client.get(f"/gpu/status?node={quote(args.node, safe='')}")
        return Result(payload, render_status)
    largest: JsonObject | None = None
    if args.summary or not args.all:
        _, summary = client.get("/gpu/status?summary=true")
        totals = summary.get("summary", {}) if isinstance(summary, dict) else {}
        if args.summary or totals.get("nodes", 0) > STATUS_DETAIL_MAX_NODES:
            return Result(summary, render_status_summary)
        largest = totals.get("largest_request")
    _, payload = client.get("/gpu/status")
    return Result(payload, lambda doc, now: render_status(doc, now, largest))


def allocate_body(args: argparse.Namespace) -> JsonObject:
    """The POST /gpu/allocate (or /gpu/workload) body the flags describe; unset flags are left out."""
    body: JsonObject = {}
    if args.service is not None:
        body["service_name"] = args.service
    if args.type is not None:
        body["workload_type"] = args.type
    data: JsonObject = dict(args.data_json or {})
    data.update(dict(args.data or []))
    if data:
        body["workload_data"] = data
    optional = {
        "priority": args.priority,
        "gpu_count": args.gpus,
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "min_memory_mb": args.memory_mb,
        "max_utilization": args.max_utilization,
        "ttl_seconds": args.ttl,
        "request_id": args.request_id,
        "webhook_url": args.webhook_url,
        "mig_profile": args.mig_profile,
        "gpu_memory_mb": args.share_mb,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if args.share_mb is not None:
        body["sharing"] = "shared"
    if args.no_queue:
        body["queue"] = False
    if args.not_preemptible:
        body["preemptible"] = False
    constraints = {k: v for k, v in (("gpu_model", args.gpu_model), ("node", args.node)) if v is not None}
    if constraints:
        body["constraints"] = constraints
    return body


def cmd_allocate(client: AgentClient, args: argparse.Namespace) -> Result:
    status, payload = client.post("/gpu/allocate", allocate_body(args))
    if status == 202:
        return Result(payload, render_queued, EXIT_QUEUED)
    return Result(payload, render_allocation)


def cmd_analyze(client: AgentClient, args: argparse.Namespace) -> Result:
    _, payload = client.post("/gpu/workload", allocate_body(args))
    return Result(payload, render_analysis)


def cmd_release(client: AgentClient, args: argparse.Namespace) -> Result:
    if args.allocation_id is not None:
        body = {"allocation_id": args.allocation_id}
    elif args.service is not None:
        body = {"service_name": args.service}
    else:
        body = {"request_id": args.request_id}
    _, payload = client.post("/gpu/release", body)
    return Result(payload, render_release)


def cmd_renew(client: AgentClient, args: argparse.Namespace) -> Result:
    body: JsonObject = {"allocation_id": args.allocation_id}
    if args.ttl is not None:
        body["ttl_seconds"] = args.ttl
    _, payload = client.post("/gpu/renew", body)
    return Result(payload, render_allocation)


def usage_path(args: argparse.Namespace) -> str:
    """GET /usage with the flags given (the agent parses and checks the times)."""
    query = {name: getattr(args, name) for name in ("since", "until", "by") if getattr(args, name)}
    return "/usage?" + urlencode(query)


def _gpu_body(target: tuple[str | None, int]) -> JsonObject:
    node, index = target
    # No node: the agent answering drains its own GPU.
    return {"index": index} if node is None else {"node": node, "index": index}


def cmd_drain(client: AgentClient, args: argparse.Namespace) -> Result:
    body = _gpu_body(args.gpu)
    if args.reason is not None:
        body["reason"] = args.reason
    _, payload = client.post("/gpu/drain", body)
    return Result(payload, render_gpu)


def cmd_undrain(client: AgentClient, args: argparse.Namespace) -> Result:
    _, payload = client.post("/gpu/undrain", _gpu_body(args.gpu))
    return Result(payload, render_gpu)


def cmd_servers_add(client: AgentClient, args: argparse.Namespace) -> Result:
    _, payload = client.post("/cluster/servers", {"name": args.name})
    return Result(payload, render_servers)


def cmd_servers_remove(client: AgentClient, args: argparse.Namespace) -> Result:
    _, payload = client.delete(_path("cluster", "servers", args.name))
    return Result(payload, render_servers)


# ---------------------------------------------------------------------- arguments


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """argparse type: seconds as a number, or with a unit: 90, 90s, 30m, 12h, 7d."""
    unit = _DURATION_UNITS.get(text[-1:].lower())
    number = text[:-1] if unit is not None else text
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 3600, 90s, 30m, 12h, 7d)") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"a duration must be finite and >= 0, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def gpu_target(text: str) -> tuple[str | None, int]:
    """argparse type for a GPU: `NODE:INDEX`, or a bare `INDEX` on the agent answering.

    Node names may themselves contain ':', so the index is what follows the last one.
    """
    node, sep, raw = text.rpartition(":")
    if sep and not node:
        raise argparse.ArgumentTypeError(f"no node before ':' in {text!r} (NODE:INDEX or INDEX)")
    if not raw.isdigit():
        raise argparse.ArgumentTypeError(f"not a GPU: {text!r} (NODE:INDEX or INDEX, e.g. gpu-host-1:3 or 3)")
    return (node if sep else None), int(raw)


def data_item(text: str) -> tuple[str, Any]:
    """argparse type for --data KEY=VALUE: VALUE is JSON when it parses as JSON, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def data_object(text: str) -> JsonObject:
    """argparse type for --data-json: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"model_name\": \"llama-3-70b\"}'")
    return value


def _add_command(
    subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str, handler: Command, summary: str
) -> argparse.ArgumentParser:
    """A (sub)command with its summary, the exit statuses and the global options."""
    sub = subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(sub)
    sub.set_defaults(handler=handler)
    return sub


def _global_options(parser: argparse.ArgumentParser) -> None:
    # Defaults are SUPPRESSed so that these options work before or after the
    # command (`gpuctl --json status` and `gpuctl status --json`) without the
    # subcommand's unset copy overwriting the one given first.
    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--address",
        default=argparse.SUPPRESS,
        help=f"the agent: host:port or URL (default ${ADDRESS_ENV} or {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help=f"API key sent as X-API-Key (default ${API_KEY_ENV}); prefer --api-key-file or the environment, "
        "as arguments are visible in ps",
    )
    group.add_argument(
        "--api-key-file", default=argparse.SUPPRESS, metavar="PATH", help="read the API key from PATH"
    )
    group.add_argument(
        "--cacert",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"PEM CA bundle to verify an https:// agent with (default ${CACERT_ENV}, else the system's)",
    )
    group.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON answer, indented"
    )
    group.add_argument(
        "--timeout",
        type=positive_seconds,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help=f"HTTP timeout (default {DEFAULT_TIMEOUT_S:g})",
    )


def _request_options(parser: argparse.ArgumentParser, *, service_required: bool) -> None:
    parser.add_argument("--service", required=service_required, help="service the GPUs are for")
    parser.add_argument(
        "--type",
        help="workload type: training, inference, embedding, ocr, graph_processing or generic (default)",
    )
    parser.add_argument("--gpus", type=int, help="number of GPUs (default: from the workload analyzer)")
    parser.add_argument("--nodes", type=int, help="a gang over this many nodes, all or none (with --gpus-per-node)")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        help="a gang's GPUs on each node: with --nodes, or alone to split the total (--gpus or the analyzer's) "
        "over the fewest nodes",
    )
    parser.add_argument("--memory-mb", type=int, help="minimum memory per GPU, MB")
    parser.add_argument(
        "--mig-profile", help='one MIG slice of this profile ("1g.10gb"), or "auto": the smallest with --memory-mb'
    )
    parser.add_argument(
        "--share-mb", type=int, help="a share of one GPU with this memory budget, MB, packed beside other shares"
    )
    parser.add_argument("--priority", type=int, help="1-10, higher is served first")
    parser.add_argument("--max-utilization", type=float, help="only GPUs at or below this utilisation, %%")
    parser.add_argument("--ttl", type=duration, help="lease: seconds or 30m, 12h, 7d; 0 = never expires")
    parser.add_argument("--no-queue", action="store_true", help="fail (exit 1) instead of queueing")
    parser.add_argument(
        "--not-preemptible",
        action="store_true",
        help="never preempt the lease (only within the queue's guarantee)",
    )
    parser.add_argument("--request-id", help="idempotency key; also names the request while it is queued")
    parser.add_argument("--webhook-url", help="URL told what becomes of a queued request")
    parser.add_argument("--gpu-model", help="constraint: GPU model name")
    parser.add_argument("--node", help="constraint: node name")
    parser.add_argument(
        "--data",
        type=data_item,
        action="append",
        metavar="KEY=VALUE",
        help="workload_data entry, repeatable; VALUE is JSON if it parses (128, true, \"7\"), else a string",
    )
    parser.add_argument(
        "--data-json", type=data_object, metavar="JSON", help="workload_data as a JSON object (--data wins)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The gpuctl argument parser; each command's namespace carries its `handler`."""
    parser = argparse.ArgumentParser(
        prog="gpuctl",
        description="Operate a gpu-orchestrator cluster through any agent's HTTP API.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gpuctl {_version()}")
    _global_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Command, summary: str) -> argparse.ArgumentParser:
        return _add_command(commands, name, handler, summary)

    status = add(
        "status",
        cmd_status,
        "GPUs by node: memory, utilisation, temperature, health, drains, lease holder "
        f"(counts per node first past {STATUS_DETAIL_MAX_NODES} nodes)",
    )
    status.add_argument("--node", help="only this node's GPUs")
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--summary", action="store_true", help="counts per node, whatever the cluster's size")
    shown.add_argument("--all", action="store_true", help="every GPU, whatever the cluster's size")
    add("list", _getter(lambda a: "/gpu/list", render_list), "live allocations and the wait queue, with why each request waits")
    add(
        "queues",
        _getter(lambda a: "/queues", render_queues),
        "each queue's guarantee, weight and cap, and its GPUs in use, fair share, waiting requests and preemptions",
    )
    _request_options(
        add("allocate", cmd_allocate, "allocate GPUs (exit 4 when the request was queued instead)"),
        service_required=True,
    )
    release = add("release", cmd_release, "release an allocation or all of a service's, or cancel a request")
    which = release.add_mutually_exclusive_group(required=True)
    which.add_argument("allocation_id", nargs="?", help="the allocation to release")
    which.add_argument("--service", help="release every allocation of this service")
    which.add_argument("--request-id", help="cancel this queued request")
    renew = add("renew", cmd_renew, "extend a lease")
    renew.add_argument("allocation_id")
    renew.add_argument("--ttl", type=duration, help="new lease length from now (default: the agent's TTL)")
    show = add(
        "show",
        _getter(lambda a: _path("gpu", "allocations", a.allocation_id), render_allocation),
        "one live allocation",
    )
    show.add_argument("allocation_id")
    request = add(
        "request",
        _getter(lambda a: _path("gpu", "requests", a.request_id), render_request),
        "where a request id stands: queued, allocated, released, expired, cancelled or lost",
    )
    request.add_argument("request_id")
    _request_options(
        add("analyze", cmd_analyze, "what a workload would need, without allocating (POST /gpu/workload)"),
        service_required=False,
    )
    drain = add(
        "drain", cmd_drain, "take a GPU out of scheduling; its leases run on (admin key when auth is on)"
    )
    drain.add_argument(
        "gpu", type=gpu_target, metavar="NODE:INDEX|INDEX", help="the GPU; INDEX alone: this agent's"
    )
    drain.add_argument("--reason", help="why, shown in gpuctl status")
    undrain = add("undrain", cmd_undrain, "return a drained GPU to scheduling (admin key when auth is on)")
    undrain.add_argument(
        "gpu", type=gpu_target, metavar="NODE:INDEX|INDEX", help="the GPU; INDEX alone: this agent's"
    )
    add("members", _getter(lambda a: "/cluster/members", render_members), "cluster members")
    servers = add(
        "servers",
        _getter(lambda a: "/cluster/servers", render_servers),
        "the Raft servers: voters, and servers waiting to be added (add / remove change them, one at a time)",
    )
    server_actions = servers.add_subparsers(dest="servers_action", metavar="ACTION")
    for action, handler, summary in (
        ("add", cmd_servers_add, "make a running server (alive in gossip, not yet a voter) a voter; admin key"),
        ("remove", cmd_servers_remove, "remove a voter, alive or dead (the leader too: it steps down); admin key"),
    ):
        sub = _add_command(server_actions, action, handler, summary)
        sub.add_argument("name", help="the server's node name ([agent] node_name)")
    usage = add(
        "usage",
        _getter(usage_path, render_usage),
        "GPU-hours allocated and utilized per service or queue (GET /usage)",
    )
    usage.add_argument("--since", help="RFC 3339, Unix seconds or a duration back from now (7d); default 24h before --until")
    usage.add_argument("--until", help="same forms; default now")
    usage.add_argument("--by", choices=["service", "queue"], default="service", help="group by (default service)")
    add("leader", _getter(lambda a: "/cluster/leader", render_leader), "the current leader")
    add("health", _getter(lambda a: "/healthz", render_health), "this agent's health (GET /healthz)")
    # Listed for --help; main() hands everything after "keyring" to the key-file tool,
    # which works on a local file and talks to no agent.
    commands.add_parser(
        "keyring",
        help="the cluster key file: generate | list PATH | install PATH KEY | use PATH KEY | remove PATH KEY",
        add_help=False,
    ).add_argument("keyring_args", nargs=argparse.REMAINDER)
    return parser


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Flags > environment > defaults. Raises UsageError for a bad address or key file."""
    address = getattr(args, "address", None) or environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    key: str | None = getattr(args, "api_key", None)
    key_file: str | None = getattr(args, "api_key_file", None)
    if key is not None and key_file is not None:
        raise UsageError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --api-key-file {key_file}: {exc}") from None
        if not key:
            raise UsageError(f"--api-key-file {key_file} is empty")
    if key is None:
        key = environ.get(API_KEY_ENV) or None
    cacert = getattr(args, "cacert", None) or environ.get(CACERT_ENV) or None
    return Settings(
        address=normalize_address(address),
        api_key=key or None,
        timeout_s=getattr(args, "timeout", DEFAULT_TIMEOUT_S),
        cacert=None if cacert is None else Path(cacert),
    )


def main(argv: list[str] | None = None) -> int:
    """Run gpuctl with `argv` (default sys.argv[1:]); returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keyring"]:
        return keyring_main(argv[1:], prog="gpuctl keyring")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        settings = resolve_settings(args, os.environ)
        with AgentClient(settings) as client:
            result: Result = args.handler(client, args)
    except CtlError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    if getattr(args, "json", False):
        print(json.dumps(result.payload, indent=2, ensure_ascii=False))
    else:
        print(result.render(result.payload, time.time()))
    return int(result.exit_code)


if __name__ == "__main__":
    sys.exit(main())
