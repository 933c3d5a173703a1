"""The HTTP API (Quart-trio): SPEC.md's endpoints, JSON errors, auth and metrics.

Error handling
--------------
Bodies are decoded once, by `coordinator.json_body.decode_json_body` (UTF-8 only,
nesting bounded, duplicate keys refused), and Hypercorn's own protocol errors get
the same JSON body (`agent/http_protocol_errors.py`).

Errors are converted once, here: a CoordinatorError becomes its status and
snake_case code, a StorageError becomes 503 with Retry-After, an HTTP-level
error (404 route, 405, 413) keeps its status with a JSON body, and anything
unexpected is logged and answered 500 `internal_error`. Every error body is
`{"error": {"code": ..., "message": ...}}`.

Bounds
------
Every route runs under `[http] request_timeout_s` (`_bounded`): whatever it
waits on — a stalled disk, a leader that cannot commit, a forward — it is
answered by then, with 503 and Retry-After: `outcome_unknown` when it is a
write that may have been proposed (here or at the leader), `timeout`
otherwise. A forward gets the same deadline and answers its own, more precise
error just before it (agent/leader_proxy.py). Cancelling a proposal's waiter
does not withdraw the proposal, which is why such a write's outcome is unknown.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from typing import Any, Awaitable, Callable

import trio
from quart import Response, g, has_request_context, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from coordinator.errors import CoordinatorError, InvalidRequest, NotFound, brief
from coordinator.json_body import decode_json_body
from coordinator.lease_table import LeaseTable
from coordinator.lease_usage import usage_window
from coordinator.model import Allocation
from coordinator.pending_reasons import PendingExplainer, why_pending
from coordinator.queue_views import queue_views
from coordinator.rate_limit import RateLimit, TokenBuckets
from coordinator.raft import NotLeader, ProposalRejected, RaftError
from coordinator.request_parsing import (
    parse_allocate_body,
    parse_drain_body,
    parse_release_body,
    parse_renew_body,
    parse_status_query,
    parse_usage_query,
    resolve_requirements,
    resolve_ttl,
    valid_id,
)
from coordinator.views import allocation_view, queued_view, record_view, usage_view

from agent.api_keys import ApiKey, extract_presented_key
from agent.audit import WRITE_ACTIONS, AuditTrail, ids_in
from agent.config_checks import is_node_name
from agent.context import AgentContext, holders_from_allocations
from agent import http_protocol_errors
from agent.leader_proxy import FORWARDED_BY, LEADER_WAIT_S, ForwardFailed, LeadHere
from agent.lease_service import LeaseReader, LeaseService, TableReader
from agent.openapi import openapi_document
from agent.raft_log import ProposalLost, ProposalUnknown, ReadUnconfirmed
from agent.status_page import HEADERS as STATUS_PAGE_HEADERS
from agent.status_page import status_page_html
from agent.storage import StorageError

log = logging.getLogger(__name__)

# How long a client's /gpu/status waits for the leader to say who holds what.
CLIENT_HOLDERS_WAIT_S = 1.5
# A forward or a read's ReadIndex wait ends this much before the request bound, so its
# own error (no_leader or outcome_unknown, which it knows best) is the answer, not the bound's.
ANSWER_MARGIN_S = 0.1
# How long an error answer may spend reading the rest of the request body (so the
# keep-alive connection stays usable) before it closes the connection instead.
DRAIN_TIMEOUT_S = 1.0

# Open without a key even when auth is on: probes, scrapes, the API's own description,
# and the status page (static HTML; the data it fetches needs a key like any call).
OPEN_PATHS = frozenset({"/", "/healthz", "/metrics", "/openapi.json"})
# Never rate limited: a probe or a scrape refused would page someone for nothing,
# and both are cheap (no lease table, no leader).
UNLIMITED_PATHS = frozenset({"/healthz", "/metrics"})
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    431: "request_header_fields_too_large",
    503: "unavailable",
}


def _with_default(raw: bytes, key: str, value: str) -> bytes:
    """`raw` (a JSON object) with `key` set when absent; anything else unchanged (the leader judges it)."""
    try:
        doc = decode_json_body(raw)
    except InvalidRequest:
        return raw
    if isinstance(doc, dict) and doc.get(key) is None:
        doc[key] = value
        return json.dumps(doc, separators=(",", ":")).encode()
    return raw


class ApiError(Exception):
    """An HTTP-edge refusal that is not a core error (auth, rate limit)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":"))
    if has_request_context():
        g.answer_doc = payload  # the audit line reads it here instead of parsing the body back
    return Response(body, status=status, headers=headers, content_type="application/json")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def create_app(ctx: AgentContext) -> QuartTrio:
    """Build the Quart-trio app serving `ctx`."""
    http_protocol_errors.install()  # Hypercorn's own 400/431/501 answers get JSON bodies too
    app = QuartTrio("gpu-orchestrator")
    app.config["MAX_CONTENT_LENGTH"] = ctx.config.http.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    metrics = ctx.metrics
    audit = ctx.audit = ctx.audit or AuditTrail(metrics.audit_writes)
    rate = ctx.config.auth
    limiter = TokenBuckets(RateLimit(rate.rate_per_s, rate.burst)) if rate.rate_limit else None

    # ------------------------------------------------------------------ plumbing

    @app.before_request
    async def _start() -> None:
        g.started = time.perf_counter()
        g.principal = None
        g.forwarded = False
        g.audit_service = None
        if ctx.keyring is None or request.path in OPEN_PATHS:
            limit()
            return
        presented = extract_presented_key(request.headers, ctx.config.auth.header_name)
        g.principal = None if presented is None else ctx.keyring.authenticate(presented)
        # Before the 401s: a client guessing keys is limited by its address.
        limit()
        if presented is None:
            raise ApiError(
                401,
                "unauthorized",
                f"an API key is required ({ctx.config.auth.header_name} header or Authorization: Bearer)",
            )
        if g.principal is None:
            raise ApiError(401, "unauthorized", "the API key is not valid")

    def limit() -> None:
        """Take a token for the caller (its key, else its address); raise 429 when its bucket is empty."""
        if limiter is None or request.path in UNLIMITED_PATHS:
            return
        principal: ApiKey | None = g.principal
        if principal is not None:
            who = f"key {principal.name!r}"
        elif ctx.keyring is None and FORWARDED_BY in request.headers:
            return  # auth off: counted at the agent the client called (docs/operations.md)
        else:
            who = f"address {request.remote_addr}"
        wait = limiter.take(who, time.monotonic())
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests from {who}: at most {limiter.limit.rate_per_s:g}/s "
                f"(bursts of {limiter.limit.burst}); retry after {retry_after} s",
                {"Retry-After": str(retry_after)},
            )

    @app.after_request
    async def _count(response: Response) -> Response:
        if response.status_code >= 400 and response.status_code != 413:
            # A refusal before the handler read the body (401, 405, ...) leaves it on
            # the wire; hypercorn would then misread it as the next request on this
            # keep-alive connection. Drain it (it is within the size limit) or close.
            drained = False
            # A client that stalls mid-body is not waited for; one whose body cannot be read
            # (a broken connection) is not drained either: both get Connection: close.
            with trio.move_on_after(DRAIN_TIMEOUT_S), contextlib.suppress(Exception):
                await request.get_data()
                drained = True
            if not drained:
                response.headers["Connection"] = "close"
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.http_requests.labels(request.method, rule, str(response.status_code)).inc()
        action = WRITE_ACTIONS.get((request.method, rule))
        if action is not None and not getattr(g, "forwarded", False):
            await record_write(action, response)
        started = getattr(g, "started", None)
        if started is not None:
            metrics.http_duration.labels(request.method, rule).observe(time.perf_counter() - started)
        return response

    @app.errorhandler(CoordinatorError)
    async def _core_error(exc: CoordinatorError) -> Response:
        headers = {"Retry-After": "5"} if exc.http_status == 503 else None
        return error_response(exc.http_status, exc.code, exc.message, headers)

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(StorageError)
    async def _storage_error(exc: StorageError) -> Response:
        return error_response(503, "storage_unavailable", str(exc), {"Retry-After": "5"})

    @app.errorhandler(RaftError)
    async def _raft_error(exc: RaftError) -> Response:
        if isinstance(exc, ReadUnconfirmed):
            return error_response(503, "no_leader", f"{exc}; retry", {"Retry-After": "1"})
        if isinstance(exc, ProposalUnknown):
            code = "outcome_unknown"
        elif isinstance(exc, ProposalLost):
            code = "proposal_lost"
        elif isinstance(exc, NotLeader):
            code = "not_leader"
        else:
            code = "no_leader"
        return error_response(503, code, f"{exc}; retry (with the same request_id)", {"Retry-After": "1"})

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = {}
        if status == 413:
            # The unread rest of the body is still on the wire: this connection cannot
            # carry another request, so tell the client not to reuse it.
            headers["Connection"] = "close"
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        message = {
            404: f"no route {brief(request.path)}",
            405: f"{brief(request.method)} is not allowed on {brief(request.path)}",
            413: f"request body larger than {ctx.config.http.max_body_bytes} bytes",
        }.get(status, exc.description or exc.name)
        return error_response(status, _HTTP_CODES.get(status, "http_error"), message, headers)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the agent's log")

    async def record_write(action: str, response: Response) -> None:
        """One audit line for an answered write (agent/audit.py); a forwarded one is the leader's to record."""

        def json_of(data: str | bytes) -> Any:
            # The same strict decoder as the handlers: a body nested too deep for
            # json.loads must not turn into a 500 here, after its 400 was answered.
            try:
                return decode_json_body(data.encode() if isinstance(data, str) else data) if data else None
            except CoordinatorError:
                return None

        # The documents the handler already decoded and encoded, when it did; parsing a body
        # again costs as much as the write itself. A 413's body was never read (it is over
        # the limit): the answer alone says enough.
        asked = getattr(g, "body_doc", None)
        if asked is None and response.status_code != 413:
            asked = json_of(await request.get_data(as_text=False))
        answered = getattr(g, "answer_doc", None)
        if answered is None:
            answered = json_of(await response.get_data(as_text=False))
        principal: ApiKey | None = getattr(g, "principal", None)
        service = getattr(g, "audit_service", None)
        if service is None:
            for doc in (asked, answered):
                if isinstance(doc, dict) and isinstance(doc.get("service_name"), str):
                    service = doc["service_name"]
                    break
        ids = ids_in(asked, answered)
        if request.view_args and isinstance(request.view_args.get("name"), str):
            ids.insert(0, request.view_args["name"])
        audit.record(
            action=action,
            status=response.status_code,
            key=principal.name if principal is not None else None,
            service=service,
            ids=ids,
            client=request.remote_addr,
            via=request.headers.get(FORWARDED_BY),
        )

    async def request_body() -> bytes:
        """The request's body; on a request taken over from forwarding, the body it was forwarded with."""
        override: bytes | None = getattr(g, "body", None)
        if override is not None:
            return override
        data = await request.get_data(as_text=False)
        return data.encode() if isinstance(data, str) else data

    async def body_json() -> Any:
        doc = g.body_doc = decode_json_body(await request_body())
        return doc

    def require_service(service_name: str) -> None:
        g.audit_service = service_name
        principal: ApiKey | None = g.principal
        if principal is not None and not principal.may_act_for(service_name):
            raise ApiError(
                403, "forbidden", f"API key {principal.name!r} may not act for service {service_name!r}"
            )

    def require_admin(action: str) -> None:
        principal: ApiKey | None = g.principal
        if principal is not None and not principal.admin:
            raise ApiError(403, "forbidden", f"only an admin API key may {action}")

    def allocation_service(table: LeaseTable, allocation_id: str) -> str:
        """The service of a live allocation, or of one already ended (a repeated release). Raises NotFound."""
        alloc = table.allocation(allocation_id) if valid_id(allocation_id) else None
        if alloc is not None:
            return alloc.request.service_name
        record = table.record_of_allocation(allocation_id) if valid_id(allocation_id) else None
        if record is None:
            raise NotFound(f"no live allocation {allocation_id}")
        return record.service_name

    def live_allocation(table: LeaseTable, allocation_id: str) -> Allocation:
        """The live lease `allocation_id` names (a gang's id: its first member). Raises NotFound."""
        unit = table.lease_unit(allocation_id) if valid_id(allocation_id) else ()
        if not unit:
            raise NotFound(f"no live allocation {brief(allocation_id)}")
        return unit[0]

    def lease_view(table: LeaseTable, allocation_id: str) -> dict[str, Any]:
        """The API object of a live lease: a gang's id gives the whole gang, a member's id that member."""
        gang = table.gang(allocation_id) if valid_id(allocation_id) else None
        if gang is not None:
            return allocation_view(gang[0], gang)
        return allocation_view(live_allocation(table, allocation_id), shares=table.shares, mps=mps_hints())

    def mps_hints() -> dict[str, str]:
        """The configured CUDA MPS directories a share's holder should set ({} without MPS configured).

        coordinator.views adds the share's memory limit to them.
        """
        agent = ctx.config.agent
        hints = {"CUDA_MPS_PIPE_DIRECTORY": agent.mps_pipe_directory, "CUDA_MPS_LOG_DIRECTORY": agent.mps_log_directory}
        return {name: value for name, value in hints.items() if value}

    # ------------------------------------------------------------------ leader routing

    Handler = Callable[..., Awaitable[Response]]

    async def forward() -> Response:
        """Relay the request to the leader. Raises LeadHere when this agent leads by now."""
        cluster = ctx.cluster
        via = request.headers.get(FORWARDED_BY)
        if via:
            return error_response(
                503,
                "no_leader",
                f"this agent ({ctx.node}) is not the leader and the request was already forwarded by {via}; "
                "retry shortly",
                {"Retry-After": "1"},
            )
        raw = await request_body()
        stamp = request.method == "POST" and request.path == "/gpu/allocate"
        if request.path in ("/gpu/drain", "/gpu/undrain"):
            raw = _with_default(raw, "node", ctx.node)  # the default is this agent, not the leader
        g.write_started = request.method != "GET"  # from here on it may reach a leader
        try:
            answer = await cluster.proxy.forward(
                request.method,
                request.path,
                request.query_string,
                dict(request.headers.items()),
                raw,
                stamp,
                deadline=g.deadline - ANSWER_MARGIN_S,
                look_until=g.started + LEADER_WAIT_S,
            )
        except ForwardFailed as error:
            return error_response(503, error.code, str(error), {"Retry-After": "1"})
        g.forwarded = True  # the leader answered it, and audits it
        return Response(answer.content, status=answer.status, headers=answer.headers)

    async def served_while_leading(service: LeaseService, handler: Handler, kwargs: dict[str, Any]) -> Response:
        """`handler(service)`, given up on once this agent has stopped leading and LEADER_WAIT_S has passed.

        A leader that is cut off keeps its proposals waiting: nothing answers them
        until it hears from a new leader, which may be after the partition heals.
        Once it has stepped down and a call has waited as long as one finding no
        leader may, it answers 503 (`outcome_unknown` for a write: the entry may
        still be committed) instead of holding the caller to the request bound.
        """
        answer: Response | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                nonlocal answer, failure
                try:
                    answer = await handler(service, **kwargs)
                except Exception as error:  # noqa: BLE001 - re-raised below, outside the nursery's group
                    failure = error
                nursery.cancel_scope.cancel()

            async def give_up_when_deposed() -> None:
                await ctx.leadership.wait_deposed(service)
                await trio.sleep_until(g.started + LEADER_WAIT_S + ANSWER_MARGIN_S)
                nursery.cancel_scope.cancel()

            nursery.start_soon(serve)
            nursery.start_soon(give_up_when_deposed)
        if failure is not None:
            raise failure
        if answer is not None:
            return answer
        if g.write_started:
            return error_response(
                503,
                "outcome_unknown",
                f"this agent ({ctx.node}) stopped leading while the write was proposed, and no leader has "
                "answered for it since: it may still be applied; retry with the same request_id (or allocation_id)",
                {"Retry-After": "1"},
            )
        return error_response(
            503, "not_leader", f"this agent ({ctx.node}) stopped leading while serving the read; retry", {"Retry-After": "1"}
        )

    def on_leader(*, read: bool = False) -> Callable[[Handler], Handler]:
        """Answer with the ready leader's lease service here, else forward to the leader.

        The handler gets the service as its first argument (a read gets a
        `LeaseReader`). During an election, or a lone agent's first moments, a
        request waits (at most LEADER_WAIT_S) for the outcome. `?stale=true` on a
        read is answered from this server's replica, leader or not.
        """

        def decorate(handler: Handler) -> Handler:
            @functools.wraps(handler)
            async def routed(**kwargs: Any) -> Response:
                replica = ctx.replication.log
                if read and replica is not None and request.args.get("stale", "").lower() in ("true", "1"):
                    response = await handler(TableReader(replica.table), **kwargs)
                    response.headers["X-Stale-Index"] = str(replica.applied_index)
                    age = max(0.0, time.time() - ctx.last_applied_at)
                    response.headers["X-Stale-Age-Seconds"] = f"{age:.3f}"
                    return response
                # Leadership can move either way while one request is served (this
                # agent loses it mid-proposal, or wins it while forwarding); a few
                # hand-overs are followed, not an endless ping-pong.
                for _ in range(3):
                    service = ctx.leadership.service
                    if service is None and ctx.leadership.election_pending:
                        # This voter's election (or its first entry) is under way: wait for it, bounded.
                        patience = g.started + LEADER_WAIT_S - trio.current_time()
                        service = await ctx.leadership.wait_for_service(max(0.0, patience))
                        if service is None and ctx.leadership.election_pending:
                            return error_response(
                                503,
                                "no_leader",
                                f"no leader was elected within {LEADER_WAIT_S:g} s (no quorum?); nothing was proposed",
                                {"Retry-After": "1"},
                            )
                    if service is not None:
                        try:
                            if read:
                                # ReadIndex: a deposed leader that has not noticed yet cannot
                                # confirm a majority, so it never answers from a stale table.
                                with trio.move_on_at(g.deadline - ANSWER_MARGIN_S) as waited:
                                    await service.log.read_barrier()
                                if waited.cancelled_caught:
                                    raise ReadUnconfirmed("no majority confirmed this leader within the request bound")
                            g.write_started = not read
                            return await served_while_leading(service, handler, kwargs)
                        except (NotLeader, ProposalLost):
                            pass  # nothing of it was applied here: the new leader takes it
                    try:
                        return await forward()
                    except LeadHere as here:
                        g.body = here.body  # with the request_id the forwarding stamped
                return error_response(
                    503, "not_leader", "leadership kept moving while the request was handled; retry", {"Retry-After": "1"}
                )

            return routed

        return decorate

    # ------------------------------------------------------------------ routes

    @app.get("/")
    async def status_page() -> Response:
        return Response(
            status_page_html(ctx.node), content_type="text/html; charset=utf-8", headers=STATUS_PAGE_HEADERS
        )

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response(ctx.health())

    @app.post("/gpu/allocate")
    @on_leader(read=False)
    async def allocate(service: LeaseService) -> Response:
        body = parse_allocate_body(await body_json())
        require_service(body.service_name)
        principal: ApiKey | None = g.principal
        outcome = await service.allocate(body, key_queue=None if principal is None else principal.queue)
        if outcome.allocation is not None:
            return json_response(
                allocation_view(outcome.allocation, outcome.gang, shares=service.table.shares, mps=mps_hints())
            )
        assert outcome.queued is not None and outcome.position is not None
        pending = why_pending(service.table, ctx.inventory.inventory(), outcome.queued.request.request_id)
        return json_response(queued_view(outcome.queued, outcome.position, pending), 202)

    @app.post("/gpu/release")
    @on_leader(read=False)
    async def release(service: LeaseService) -> Response:
        body = parse_release_body(await body_json())
        if body.allocation_id is not None:
            require_service(allocation_service(service.table, body.allocation_id))
            outcome = await service.release_allocation(body.allocation_id)
        elif body.service_name is not None:
            require_service(body.service_name)
            outcome = await service.release_service(body.service_name)
        else:
            assert body.request_id is not None
            record = service.table.record(body.request_id)
            if record is None:
                raise NotFound(f"no request {body.request_id}")
            require_service(record.service_name)
            outcome = await service.release_request(body.request_id)
        answer: dict[str, Any] = {
            "status": "released",
            "released": list(outcome.released),
            "cancelled": list(outcome.cancelled),
        }
        if outcome.repeated:
            answer["repeated"] = True
        return json_response(answer)

    @app.post("/gpu/renew")
    @on_leader(read=False)
    async def renew(service: LeaseService) -> Response:
        body = parse_renew_body(await body_json())
        require_service(live_allocation(service.table, body.allocation_id).request.service_name)
        await service.renew(body.allocation_id, body.ttl_seconds)
        return json_response(lease_view(service.table, body.allocation_id))

    @app.get("/gpu/status")
    async def gpu_status() -> Response:
        query = parse_status_query(request.args)
        holders = None
        if ctx.table is None and FORWARDED_BY not in request.headers and not query.summary:
            # No replica here (a client, or a server before its log runs): the leader says
            # who holds what (without it, the rows show only the gossiped "allocated" flags).
            allocations = None
            # Bounded: without a quorum the status must still answer at once (from gossip).
            with trio.move_on_after(CLIENT_HOLDERS_WAIT_S):
                allocations = await ctx.cluster.proxy.leader_allocations(dict(request.headers.items()))
            try:
                holders = None if allocations is None else holders_from_allocations(allocations)
            except (KeyError, TypeError, ValueError):
                log.warning("the leader's /gpu/list did not list allocations as expected; showing gossip only")
        if query.summary:
            return json_response(ctx.gpu_summary())
        rows = ctx.gpu_rows(holders, node=query.node, after=query.after, limit=query.limit)
        doc: dict[str, Any] = {"gpus": rows}
        if query.limit is not None:
            # Where the next page starts; null on the last one.
            doc["next_after"] = f"{rows[-1]['node']}/{rows[-1]['index']}" if len(rows) == query.limit else None
        return json_response(doc)

    @app.get("/gpu/list")
    @on_leader(read=True)
    async def gpu_list(reader: LeaseReader) -> Response:
        query = parse_status_query(request.args)
        table = reader.table
        if query.summary:
            return json_response(
                {"summary": {"allocations": len(table.allocations()), "queue": table.queue_length(), **_gpu_totals()}}
            )
        allocations = table.allocations() if query.node is None else table.allocations_on(query.node)
        queue = table.queue()
        # One explainer for the listing: it works out each shape of request once, not each request.
        explainer = PendingExplainer(table, ctx.inventory.inventory())
        doc: dict[str, Any] = {
            "gpus": ctx.gpu_rows(node=query.node, after=query.after, limit=query.limit),
            "allocations": [allocation_view(a, shares=table.shares, mps=mps_hints()) for a in allocations[: query.limit]],
            "queue": [
                queued_view(q, i, explainer.explain(q.request.request_id))
                for i, q in enumerate(queue[: query.limit], start=1)
            ],
        }
        if query.limit is not None:
            # A cap on each list, for a glance at a big cluster: the totals say what was left out.
            doc["totals"] = {"allocations": len(allocations), "queue": len(queue)}
        return json_response(doc)

    def _gpu_totals() -> dict[str, int]:
        summary = ctx.gpu_summary()["summary"]
        return {"gpus": summary["gpus"], "nodes": summary["nodes"]}

    @app.post("/gpu/workload")
    async def workload() -> Response:
        body = parse_allocate_body(await body_json(), require_service=False)
        # The TTL is not part of the analysis, but the same body must get the same verdict as on allocate.
        resolve_ttl(body.ttl_seconds, default_ttl_s=ctx.config.scheduler.default_ttl_s, max_ttl_s=ctx.config.scheduler.max_ttl_s)
        analysis = await ctx.analysis.analyze(body)
        estimate = analysis.estimate
        # What an allocate of this body would ask for (a MIG request: one slice).
        wanted = resolve_requirements(body, estimate)
        return json_response(
            {
                "workload_type": body.workload_type,
                "required_gpus": wanted.gpu_count,
                "min_memory_mb": wanted.min_memory_mb,
                "priority": body.priority if body.priority is not None else estimate.priority,
                "max_utilization": wanted.max_utilization,
                "decided_by": "request" if body.fully_specified else analysis.decided_by,
                "advisor_fallback_reason": analysis.fallback_reason,
                "estimate": estimate.estimate,
            }
        )

    @app.post("/gpu/drain")
    @on_leader(read=False)
    async def drain(service: LeaseService) -> Response:
        body = parse_drain_body(await body_json(), default_node=ctx.node, draining=True)
        require_admin("drain GPUs")
        await service.set_drain(body.node, body.index, True, body.reason)
        return json_response(ctx.gpu_row(body.node, body.index))

    @app.post("/gpu/undrain")
    @on_leader(read=False)
    async def undrain(service: LeaseService) -> Response:
        body = parse_drain_body(await body_json(), default_node=ctx.node, draining=False)
        require_admin("undrain GPUs")
        await service.set_drain(body.node, body.index, False)
        return json_response(ctx.gpu_row(body.node, body.index))

    @app.get("/gpu/allocations/<allocation_id>")
    @on_leader(read=True)
    async def get_allocation(reader: LeaseReader, allocation_id: str) -> Response:
        return json_response(lease_view(reader.table, allocation_id))

    @app.get("/gpu/requests/<request_id>")
    @on_leader(read=True)
    async def get_request(reader: LeaseReader, request_id: str) -> Response:
        table = reader.table
        record = table.record(request_id) if valid_id(request_id) else None
        if record is None:
            raise NotFound(f"no request {brief(request_id)}")
        unit = table.lease_unit(record.allocation_id) if record.allocation_id else ()
        alloc = unit[0] if unit else None
        gang = unit if unit and unit[0].gang is not None else ()
        queued = table.queued(request_id)
        position = reader.queue_position(request_id)
        queued_json = None
        if queued is not None and position:
            queued_json = queued_view(queued, position, why_pending(table, ctx.inventory.inventory(), request_id))
        return json_response(record_view(record, alloc, queued_json, gang))

    @app.get("/usage")
    @on_leader(read=True)
    async def usage(reader: LeaseReader) -> Response:
        # Hourly buckets from the replicated table, plus live leases up to now: reads
        # only the hours asked for (LeaseTable.usage), like /gpu/list reads the table.
        now = time.time()
        query = parse_usage_query(request.args, now)
        table = reader.table
        first, last = usage_window(query.since, query.until)
        rows = table.usage(query.since, query.until, query.by, now)
        return json_response(usage_view(query.by, first, last, rows, table.usage_retention_s))

    @app.get("/queues")
    @on_leader(read=True)
    async def queues(reader: LeaseReader) -> Response:
        # The leader's table: the policy in force (its configuration's, agent/queue_policy_sync.py).
        return json_response({"queues": queue_views(reader.table, ctx.inventory.inventory())})

    @app.get("/cluster/members")
    async def members() -> Response:
        return json_response({"members": ctx.members()})

    @app.get("/cluster/leader")
    async def leader() -> Response:
        # A peer looking the leader up (X-Forwarded-By) gets this agent's own view, never a relay.
        asked = FORWARDED_BY not in request.headers
        return json_response(await ctx.cluster.proxy.leader_info(dict(request.headers.items()), ask=asked))

    # ------------------------------------------------------------------ Raft servers

    def servers_view() -> Response:
        return json_response(ctx.servers())

    def server_name_body(doc: Any) -> str:
        if not isinstance(doc, dict):
            raise InvalidRequest('the body must be a JSON object {"name": "<node>"}')
        unknown = sorted(set(doc) - {"name"})
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}", code="unknown_field")
        name = doc.get("name")
        if not isinstance(name, str) or not is_node_name(name):
            raise InvalidRequest("name must be a node name: 1-128 letters, digits, '.', '_' or '-'", code="invalid_name")
        return name

    async def change_voters(*, add: str | None = None, remove: str | None = None) -> Response:
        """Apply one membership change on the leader; the error mapping of POST/DELETE /cluster/servers."""
        try:
            await ctx.replication.change_voters(add=add, remove=remove)
        except ProposalRejected as error:
            # A change still in flight, or the leader's first entry of its term not yet
            # committed: nothing was proposed. Try again once the first one is applied.
            raise ApiError(409, "membership_change_in_progress", f"{error}; retry shortly") from None
        return servers_view()

    @app.get("/cluster/servers")
    @on_leader(read=True)
    async def servers(reader: LeaseReader) -> Response:
        return servers_view()

    @app.post("/cluster/servers")
    @on_leader(read=False)
    async def add_server(service: LeaseService) -> Response:
        require_admin("add Raft servers")
        name = server_name_body(await body_json())
        voters = ctx.voters()
        if name in voters:
            raise ApiError(409, "already_voter", f"{name} is already a voter (voters: {', '.join(voters)})")
        problem = ctx.server_problem(name)
        if problem == "unknown":
            raise NotFound(f"gossip knows no member named {name}; start it with [cluster] server = true and join")
        if problem == "not_a_server":
            raise InvalidRequest(f"{name} is not a server ([cluster] server = false): clients never vote", code="not_a_server")
        if problem == "not_alive":
            raise InvalidRequest(
                f"{name} is not alive in gossip: add a server only while it runs, so it can catch up",
                code="server_not_alive",
            )
        return await change_voters(add=name)

    @app.delete("/cluster/servers/<name>")
    @on_leader(read=False)
    async def remove_server(service: LeaseService, name: str) -> Response:
        require_admin("remove Raft servers")
        voters = ctx.voters()
        if name not in voters:
            raise NotFound(f"{brief(name)} is not a voter (voters: {', '.join(voters)})")
        if len(voters) == 1:
            raise ApiError(409, "last_voter", f"{name} is the last voter: a cluster cannot remove its only server")
        return await change_voters(remove=name)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(
            openapi_document(
                auth_header=ctx.config.auth.header_name if ctx.keyring is not None else None,
                max_ttl_s=ctx.config.scheduler.max_ttl_s,
            )
        )

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(
            metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8"
        )

    # Every route (registered above) answers within the bound.
    for endpoint, view in list(app.view_functions.items()):
        app.view_functions[endpoint] = _bounded(view, ctx.config.http.request_timeout_s)
    return app


def _bounded(view: Callable[..., Any], bound_s: float) -> Callable[..., Awaitable[Any]]:
    """`view`, answered with a 503 once it has run `bound_s` seconds (see "Bounds")."""

    @functools.wraps(view)
    async def bounded(**kwargs: Any) -> Any:
        g.started = trio.current_time()
        g.deadline = g.started + bound_s
        with trio.move_on_at(g.deadline):
            return await view(**kwargs)
        if getattr(g, "write_started", False):
            return error_response(
                503,
                "outcome_unknown",
                f"not answered within {bound_s:g}s ([http] request_timeout_s) and the write may have been "
                "applied: retry with the same request_id (or allocation_id)",
                {"Retry-After": "1"},
            )
        return error_response(
            503,
            "timeout",
            f"not answered within {bound_s:g}s ([http] request_timeout_s); retry",
            {"Retry-After": "1"},
        )

    return bounded
