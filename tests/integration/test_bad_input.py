"""The bad-input sweep, as a table: every input gets its documented 4xx JSON answer, never a 5xx.

Each row is one finding of the sweep (schemathesis 4.32 plus hand-made inputs) sent to a
real agent: the status, the error code, a JSON error body (also for what Hypercorn
answers before the app runs), a message that never quotes more than 64 characters of
the caller's input, and, at the end, no traceback in the agent's log.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.agent_process import AgentProcess

pytestmark = pytest.mark.integration

HOST = "127.0.0.73"
LONG_ID = "a" * 5000
ALLOC = "{alloc}"  # replaced by the id of a live allocation


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def utf16(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode("utf-16")


# (id, method, path, body: a JSON-able value, or bytes sent as they are; status, code)
CASES: list[tuple[str, str, str, Any, int, str]] = [
    ("deep-array-allocate", "POST", "/gpu/allocate", deep(1000).encode(), 400, "invalid_json"),
    ("deep-array-workload", "POST", "/gpu/workload", deep(1000).encode(), 400, "invalid_json"),
    ("deep-in-workload-data", "POST", "/gpu/allocate",
     b'{"service_name":"s","workload_data":{"x":' + deep(1000).encode() + b"}}", 400, "invalid_json"),
    ("unclosed-deep-array", "POST", "/gpu/workload", b"[" * 100_000, 400, "invalid_json"),
    ("utf16-body", "POST", "/gpu/allocate", utf16({"service_name": "s", "gpu_count": 1}), 400, "invalid_json"),
    ("latin1-body", "POST", "/gpu/allocate", b'{"service_name":"caf\xe9"}', 400, "invalid_json"),
    ("duplicate-keys", "POST", "/gpu/allocate", b'{"service_name":"s","gpu_count":1,"gpu_count":2}', 400,
     "invalid_json"),
    ("nan", "POST", "/gpu/allocate", b'{"service_name":"s","max_utilization":NaN}', 400, "invalid_json"),
    ("huge-integer", "POST", "/gpu/allocate", b'{"service_name":"s","gpu_count":' + b"9" * 5000 + b"}", 400,
     "invalid_json"),
    ("webhook-unclosed-ipv6", "POST", "/gpu/allocate", {"service_name": "s", "webhook_url": "http://[::1"}, 400,
     "invalid_request"),
    ("webhook-control-char", "POST", "/gpu/allocate", {"service_name": "s", "webhook_url": "http://h/\x01"}, 400,
     "invalid_request"),
    ("webhook-space", "POST", "/gpu/allocate", {"service_name": "s", "webhook_url": "http://h /x"}, 400,
     "invalid_request"),
    ("model-name-too-big", "POST", "/gpu/workload",
     {"workload_type": "inference", "workload_data": {"model_name": "llama-999999999999b"}}, 400, "invalid_request"),
    ("estimate-over-64-gpus", "POST", "/gpu/workload",
     {"workload_type": "training", "workload_data": {"params_b": 10000}}, 400, "unsatisfiable"),
    ("both-gpu-counts", "POST", "/gpu/allocate", {"service_name": "s", "gpu_count": 1, "required_gpus": 1}, 400,
     "invalid_request"),
    ("release-nothing", "POST", "/gpu/release", {}, 400, "invalid_request"),
    ("drain-empty-node", "POST", "/gpu/drain", {"index": 0, "node": ""}, 400, "invalid_request"),
    ("renew-above-max-ttl", "POST", "/gpu/renew", {"allocation_id": ALLOC, "ttl_seconds": 31 * 86400}, 400,
     "invalid_request"),
    ("workload-above-max-ttl", "POST", "/gpu/workload", {"ttl_seconds": 31 * 86400}, 400, "invalid_request"),
    ("long-id-allocation", "GET", f"/gpu/allocations/{LONG_ID}", None, 404, "not_found"),
    ("long-id-request", "GET", f"/gpu/requests/{LONG_ID}", None, 404, "not_found"),
    ("long-id-server", "DELETE", f"/cluster/servers/{LONG_ID}", None, 404, "not_found"),
    ("long-unknown-route", "GET", f"/{LONG_ID}", None, 404, "not_found"),
    # What the docs promise, and the schema allows, is accepted:
    ("integral-float-batch-size", "POST", "/gpu/workload",
     {"workload_type": "training", "workload_data": {"batch_size": 128.0}}, 200, ""),
    ("renew-ttl-null", "POST", "/gpu/renew", {"allocation_id": ALLOC, "ttl_seconds": None}, 200, ""),
    ("undrain-node-null", "POST", "/gpu/undrain", {"index": 0, "node": None}, 200, ""),
    ("release-one-of-three-others-null", "POST", "/gpu/release",
     {"service_name": "nobody", "allocation_id": None, "request_id": None}, 200, ""),
]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = AgentProcess(data_dir=tmp_path_factory.mktemp("bad-input"), host=HOST, simulate="2xH100-80GB")
    process.start()
    yield process
    process.kill()


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, timeout=10.0) as http:
        yield http
        http.post("/gpu/release", json={"service_name": "bad-input"})


def _error(response: httpx.Response) -> dict[str, str]:
    assert response.headers["content-type"].startswith("application/json"), response.content[:200]
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    return dict(error)


@pytest.mark.parametrize("method, path, body, status, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_its_documented_answer(
    client: httpx.Client, method: str, path: str, body: Any, status: int, code: str
) -> None:
    if ALLOC in json.dumps(body if not isinstance(body, bytes) else None):
        alloc = client.post("/gpu/allocate", json={"service_name": "bad-input", "gpu_count": 1}).json()
        body = {**body, "allocation_id": alloc["allocation_id"]}
    if isinstance(body, bytes):
        response = client.request(method, path, content=body)
    else:
        response = client.request(method, path, json=body)
    assert response.status_code == status, response.text[:300]
    if status >= 400:
        error = _error(response)
        assert error["code"] == code
        assert "a" * 65 not in error["message"] and "x" * 65 not in error["message"]
        assert len(error["message"]) < 400


def _raw(agent: AgentProcess, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; the status, headers and body of the answer (the server closes the connection)."""
    with socket.create_connection((agent.host, agent.port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    "data, status, code",
    [
        # More than one read (64 KiB) of request line and headers: h11's 16 KiB limit applies.
        (b"GET /gpu/allocations/" + b"x" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431,
         "request_header_fields_too_large"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 100_000 + b"\r\n\r\n", 431,
         "request_header_fields_too_large"),
        (b"NOT A REQUEST\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n", 400, "bad_request"),
    ],
    ids=["url-100kb", "header-100kb", "garbage-request-line", "bad-header-name"],
)
def test_what_hypercorn_refuses_is_json_too(agent: AgentProcess, data: bytes, status: int, code: str) -> None:
    """Hypercorn answers these before the app runs; the body is still the API's JSON error."""
    got, headers, body = _raw(agent, data)
    assert got == status
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body)["error"]["code"] == code


def test_zz_no_traceback_in_the_log(agent: AgentProcess, client: httpx.Client) -> None:
    """None of the above reached the 500 handler: the agent logged no traceback and still answers."""
    assert client.get("/healthz").status_code == 200
    log = agent.log()
    assert "Traceback" not in log and "RecursionError" not in log and "internal_error" not in log
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics

