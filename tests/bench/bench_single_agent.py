"""Single-agent benchmark: allocate→release throughput, latency and memory over HTTP.

Run it with `python -m tests.bench.bench_single_agent` (see docs/benchmarks.md);
it is not part of the test suite. In one run, on loopback only, it starts

- the yardstick: tests/bench/trivial_app.py (one `GET /ping`, Quart-trio on
  Hypercorn's trio worker, the agent's server set-up) in its own process, and
- a real agent (`python -m agent --simulate FLEET`, fsync on, state in a
  temporary dir) through tests/agent_process.py,

and measures four phases: the yardstick's request rate with `--clients`
connections and its latency with one; the agent's allocate→release pairs per
second and allocate latency with `--clients` connections, and its latency with
one. Then the agent's resident memory (VmRSS at the end, VmHWM as the peak),
and one table: each figure, its target and the ratio.

Theory of operation
-------------------
The load comes from separate worker processes (`--client-procs`, spawned once
and reused for every phase), so it shares the CPUs with the server but never
its interpreter. Each worker runs one epoll loop over its connections with a
hand-rolled HTTP/1.1 keep-alive client: prepared request bytes are written and
the response is read by Content-Length (`parse_response`, sans-io); a
`Connection: close` from the server (Hypercorn closes after
`keep_alive_max_requests`) reopens the connection for the next request. What
each client does is a generator script (`ping_script`, `pairs_script`) that
yields requests and is sent the answers. The client costs about 60-100 µs of CPU
per request, a small fraction of what the server spends, and the yardstick is
measured with exactly the same code, so the ratio compares servers, not clients.

Each phase's `--duration` is cut into `--rounds` slices and the four phases
take turns, slice by slice, with both servers running all along (the idle one
costs nothing). On a shared or virtual machine the CPU a process gets drifts
by tens of percent over a minute; interleaving lets the yardstick and the agent
see the same drift, so their ratio holds even when the absolute figures move.
Every slice has a warm-up (connections opened, caches warm) and then a
measured window; a request counts when its response arrives inside it.
Workers agree on the window through `time.monotonic()`, which is
CLOCK_MONOTONIC, shared by all processes on Linux. CPU time of the server
(/proc/PID/stat, every thread), of the load workers (process time) and of the
whole machine (/proc/stat) is taken over the same windows, so the report shows
who was busy and flags a run that something else disturbed.

Bounds: each slice ends by time; each request has a timeout
(`REQUEST_TIMEOUT_S`); the parent gives a phase a hard deadline and kills the
worker pool if it overruns. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generator, Sequence

import httpx

from tests.agent_process import AgentProcess, free_port

HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 10.0
# Time the parent allows workers to connect before the warm-up starts.
CONNECT_GRACE_S = 0.2
# A phase that has not returned this long after its window closed is killed.
PHASE_OVERRUN_S = 30.0
STARTUP_TIMEOUT_S = 20.0
FSYNC_PROBE_COUNT = 200
# Other processes' CPU (or steal), in % of one core, above which a phase is flagged.
DISTURBED_PCT = 10.0
GPU_MODEL = "H100-80GB"
# The largest simulated fleet (MAX_SIMULATED_GPUS in agent/devices/simulated.py; not
# imported, so that the load workers never import agent code).
MAX_SIMULATED_GPUS = 64

# Targets from the issue: the agent's request rate against the trivial app's,
# pairs per second, one-client allocate p50, resident memory.
TARGET_RATE_FRACTION = 0.60
TARGET_PAIRS_PER_S = 450.0
TARGET_P50_MS = 3.0
TARGET_RSS_MB = 80.0


# ---------------------------------------------------------------------- HTTP client (sans-io)


class HttpError(Exception):
    """The server answered something this client cannot parse."""


def prepare_request(method: str, path: str, port: int, body: Any = None) -> bytes:
    """The bytes of one HTTP/1.1 keep-alive request, with a JSON body when given."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
    if body is None:
        return (head + "\r\n").encode()
    payload = json.dumps(body, separators=(",", ":")).encode()
    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    close: bool  # the server will close the connection after this response


def parse_response(buf: bytearray) -> Response | None:
    """Take one complete response off the front of `buf`; None while it is incomplete.

    Only what Hypercorn sends is understood: a Content-Length body, no chunking.
    Raises HttpError otherwise.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise HttpError(f"bad status line {lines[0]!r}") from exc
    length, close = None, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            try:
                length = int(value)
            except ValueError as exc:
                raise HttpError(f"bad Content-Length {value!r}") from exc
        elif name == "connection":
            close = "close" in value.lower()
    if length is None:
        raise HttpError("response without Content-Length")
    total = end + 4 + length
    if len(buf) < total:
        return None
    body = bytes(buf[end + 4 : total])
    del buf[:total]
    return Response(status, body, close)


# ---------------------------------------------------------------------- client scripts
#
# What one client does is a generator: it yields (name, request bytes) and is
# sent back (status, body) -- status 0 when the request failed -- and it
# returns when it is done. The event loop below does all I/O, timing and
# counting, so a script reads as the sequence of calls it makes.

Script = Generator[tuple[str, bytes], tuple[int, bytes], None]


def allocate_body(service: str) -> dict[str, Any]:
    """One GPU, now or never (409 no_capacity rather than a queue).

    `max_utilization: 100` switches off the scheduler's "busy but unleased GPU"
    check. A simulated GPU ramps its utilisation up while leased and relaxes it
    over seconds after release (agent/devices/simulated.py), so under
    back-to-back leases of a few milliseconds the fleet drifts towards looking
    busy and allocates start to fail with 409 after some seconds of load:
    the figure would measure the simulator's physics, not the request path.
    """
    return {
        "service_name": service,
        "gpu_count": 1,
        "min_memory_mb": 1024,
        "priority": 5,
        "queue": False,
        "max_utilization": 100,
    }


def ping_script(port: int, deadline: float) -> Script:
    """GET /ping, over and over, until `deadline`."""
    ping = prepare_request("GET", "/ping", port)
    while time.monotonic() < deadline:
        yield "ping", ping


def pairs_script(port: int, service: str, deadline: float) -> Script:
    """Allocate one GPU and release it, until `deadline`; a pair once begun is finished."""
    allocate = prepare_request("POST", "/gpu/allocate", port, allocate_body(service))
    while time.monotonic() < deadline:
        status, body = yield "allocate", allocate
        if status == 200:
            aid = json.loads(body)["allocation_id"]
            yield "release", prepare_request("POST", "/gpu/release", port, {"allocation_id": aid})


# ---------------------------------------------------------------------- load workers


@dataclass(frozen=True)
class LoadSpec:
    """What one worker process does in one phase."""

    port: int
    kind: str  # "ping" (ping_script) or "pairs" (pairs_script)
    connections: int
    first_client: int  # clients are named bench-<first_client + i>
    start_at: float  # time.monotonic() at which the warm-up starts
    warmup_s: float
    duration_s: float
    host: str = HOST  # the server's address (another 127.0.0.x for a cluster)


@dataclass
class LoadResult:
    """What one worker (or, merged, one phase) saw inside the measured window."""

    requests: int = 0
    pairs: int = 0
    no_capacity: int = 0
    errors: int = 0
    connections_opened: int = 0
    cpu_s: float = 0.0
    first_error: str = ""
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)

    def merge(self, other: LoadResult) -> None:
        self.requests += other.requests
        self.pairs += other.pairs
        self.no_capacity += other.no_capacity
        self.errors += other.errors
        self.connections_opened += other.connections_opened
        self.cpu_s += other.cpu_s
        self.first_error = self.first_error or other.first_error
        for name, values in other.latencies_ms.items():
            self.latencies_ms.setdefault(name, []).extend(values)

    def note_error(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message

    def account(self, name: str, status: int, body: bytes, latency_s: float, in_window: bool) -> None:
        """Count one answer: every unexpected one as an error, the window's in the figures."""
        expected = status == 200 or (status == 409 and name == "allocate")
        if not expected:
            self.note_error(f"{name} answered {status}: {body[:200]!r}")
        if not in_window:
            return
        self.requests += 1
        self.latencies_ms.setdefault(name, []).append(latency_s * 1000.0)
        self.pairs += status == 200 and name == "release"
        self.no_capacity += status == 409 and name == "allocate"


class _Client:
    """One connection and the script driving it."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.name = ""
        self.request = b""
        self.sent_at = 0.0


def run_load(spec: LoadSpec) -> LoadResult:
    """Worker-process entry point: run one phase's clients, return the window's figures.

    One epoll loop serves every connection of the worker (blocking sockets, read
    only when readable; requests are a few hundred bytes, so a send never blocks).
    """
    window_start = spec.start_at + spec.warmup_s
    window_end = window_start + spec.duration_s
    result = LoadResult()
    selector = selectors.DefaultSelector()
    clients = [
        _Client(
            ping_script(spec.port, window_end)
            if spec.kind == "ping"
            else pairs_script(spec.port, f"bench-{spec.first_client + i}", window_end)
        )
        for i in range(spec.connections)
    ]

    def connect(client: _Client) -> bool:
        try:
            sock = socket.create_connection((spec.host, spec.port), timeout=REQUEST_TIMEOUT_S)
        except OSError as exc:
            result.note_error(f"connect: {exc}")
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sock, client.buf = sock, bytearray()
        selector.register(sock, selectors.EVENT_READ, client)
        result.connections_opened += 1
        return True

    def disconnect(client: _Client) -> None:
        if client.sock is not None:
            selector.unregister(client.sock)
            client.sock.close()
            client.sock = None

    def send_next(client: _Client, reply: tuple[int, bytes] | None) -> None:
        """Ask the script for its next request and send it; finish the client when it is done."""
        try:
            client.name, client.request = client.script.send(reply)  # type: ignore[arg-type]
        except StopIteration:
            disconnect(client)
            active.discard(client)
            return
        # A kept-alive connection the server has just dropped gets one fresh try.
        for _ in range(2):
            if client.sock is None and not connect(client):
                break
            assert client.sock is not None
            client.sent_at = time.monotonic()
            try:
                client.sock.sendall(client.request)
                return
            except OSError as exc:
                result.note_error(f"{client.name}: send: {exc}")
                disconnect(client)
        active.discard(client)  # the server is gone: this client stops

    def answered(client: _Client, status: int, body: bytes) -> None:
        if status:
            now = time.monotonic()
            result.account(client.name, status, body, now - client.sent_at, window_start <= now < window_end)
        send_next(client, (status, body))

    def failed(client: _Client, message: str) -> None:
        result.note_error(message)
        disconnect(client)
        answered(client, 0, b"")

    time.sleep(max(0.0, spec.start_at - time.monotonic()))
    active: set[_Client] = set(clients)
    for client in clients:
        send_next(client, None)
    cpu_at_start: float | None = None
    while active:
        now = time.monotonic()
        if cpu_at_start is None and now >= window_start:
            cpu_at_start = time.process_time()
        if now >= window_end and not result.cpu_s and cpu_at_start is not None:
            result.cpu_s = time.process_time() - cpu_at_start
        boundary = window_start if cpu_at_start is None else window_end
        timeout = min(0.5, boundary - now) if boundary > now else 0.5
        for key, _ in selector.select(timeout):
            client = key.data
            assert client.sock is not None
            try:
                data = client.sock.recv(65536)
            except OSError as exc:
                failed(client, f"{client.name}: {exc}")
                continue
            if not data:
                failed(client, f"{client.name}: connection closed mid-response")
                continue
            client.buf += data
            try:
                response = parse_response(client.buf)
            except HttpError as exc:
                failed(client, f"{client.name}: {exc}")
                continue
            if response is not None:
                if response.close:
                    disconnect(client)
                answered(client, response.status, response.body)
        now = time.monotonic()
        for client in [c for c in active if c.sock is not None and now - c.sent_at > REQUEST_TIMEOUT_S]:
            failed(client, f"{client.name}: no answer within {REQUEST_TIMEOUT_S}s")
    if not result.cpu_s and cpu_at_start is not None:
        result.cpu_s = time.process_time() - cpu_at_start
    selector.close()
    return result


# ---------------------------------------------------------------------- phases


@dataclass
class PhaseResult:
    """A phase's merged load figures plus the server's CPU time over the window."""

    name: str
    clients: int
    duration_s: float
    load: LoadResult
    server_cpu_s: float
    # Busy CPU time of everything else on the machine, and time the hypervisor
    # took: both mean the figures of this phase are low by that much.
    other_cpu_s: float
    steal_cpu_s: float

    @property
    def request_rate(self) -> float:
        return self.load.requests / self.duration_s

    @property
    def requests_per_cpu_s(self) -> float:
        return self.load.requests / self.server_cpu_s if self.server_cpu_s else math.nan

    @property
    def pair_rate(self) -> float:
        return self.load.pairs / self.duration_s

    def latency(self, name: str, pct: float) -> float:
        return percentile(self.load.latencies_ms.get(name, []), pct)

    def extend(self, more: PhaseResult) -> None:
        """Add a later slice of the same phase."""
        self.duration_s += more.duration_s
        self.load.merge(more.load)
        self.server_cpu_s += more.server_cpu_s
        self.other_cpu_s += more.other_cpu_s
        self.steal_cpu_s += more.steal_cpu_s

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clients": self.clients,
            "duration_s": self.duration_s,
            "requests": self.load.requests,
            "requests_per_s": round(self.request_rate, 1),
            "errors": self.load.errors,
            "first_error": self.load.first_error or None,
            "connections_opened": self.load.connections_opened,
            "server_cpu_pct": round(100 * self.server_cpu_s / self.duration_s, 1),
            "client_cpu_pct": round(100 * self.load.cpu_s / self.duration_s, 1),
            "other_cpu_pct": round(100 * self.other_cpu_s / self.duration_s, 1),
            "steal_cpu_pct": round(100 * self.steal_cpu_s / self.duration_s, 1),
        }
        if self.load.pairs or self.load.no_capacity:
            out["pairs"] = self.load.pairs
            out["pairs_per_s"] = round(self.pair_rate, 1)
            out["no_capacity_409"] = self.load.no_capacity
        for name, values in sorted(self.load.latencies_ms.items()):
            out[f"{name}_latency_ms"] = {
                "p50": round(percentile(values, 50), 3),
                "p99": round(percentile(values, 99), 3),
                "max": round(max(values), 3),
                "n": len(values),
            }
        return out


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


class LoadRunner:
    """The worker pool, and the slices of load it runs against one server at a time."""

    def __init__(self, procs: int, warmup_s: float) -> None:
        self.procs = procs
        self.warmup_s = warmup_s
        self._pool = multiprocessing.get_context("spawn").Pool(procs)

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def run(
        self,
        name: str,
        *,
        port: int,
        server_pid: int,
        kind: str,
        clients: int,
        duration_s: float,
        host: str = HOST,
    ) -> PhaseResult:
        """Warm up, then measure `duration_s` of `clients` connections running `kind` scripts."""
        procs = min(self.procs, clients)
        start_at = time.monotonic() + CONNECT_GRACE_S
        specs = [
            LoadSpec(
                port=port,
                kind=kind,
                connections=len(range(p, clients, procs)),
                first_client=sum(len(range(q, clients, procs)) for q in range(p)),
                start_at=start_at,
                warmup_s=self.warmup_s,
                duration_s=duration_s,
                host=host,
            )
            for p in range(procs)
        ]
        pending = self._pool.map_async(run_load, specs)
        window_start = start_at + self.warmup_s
        time.sleep(max(0.0, window_start - time.monotonic()))
        cpu_before, machine_before = process_cpu_s(server_pid), machine_cpu_s()
        time.sleep(max(0.0, window_start + duration_s - time.monotonic()))
        server_cpu = process_cpu_s(server_pid) - cpu_before
        machine = {k: v - machine_before[k] for k, v in machine_cpu_s().items()}
        try:
            results = pending.get(timeout=PHASE_OVERRUN_S)
        except multiprocessing.TimeoutError:
            self.close()
            raise RuntimeError(f"phase {name!r} overran its window by {PHASE_OVERRUN_S}s") from None
        merged = LoadResult()
        for r in results:
            merged.merge(r)
        return PhaseResult(
            name,
            clients,
            duration_s,
            merged,
            server_cpu,
            other_cpu_s=max(0.0, machine["busy"] - server_cpu - merged.cpu_s),
            steal_cpu_s=machine["steal"],
        )


# ---------------------------------------------------------------------- processes and machine


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid`, all threads, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> dict[str, float]:
    """CPU seconds of all CPUs since boot from /proc/stat: busy (steal excluded) and steal."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return {"busy": (user + nice + system + irq + softirq) / tick, "steal": steal / tick}


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak resident) of `pid`, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def machine_info(data_dir: Path) -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "state_fs": filesystem_of(data_dir),
        "code": code_version(),
    }


def code_version() -> str:
    """The checkout's commit, marked `+changes` when agent/ or coordinator/ differ from it."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "agent", "coordinator"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" +changes" if changed else "")


def fsync_probe_ms(directory: Path, count: int = FSYNC_PROBE_COUNT) -> dict[str, float]:
    """p50/p99 of `count` small append+fsync calls on a file in `directory`, in ms.

    The agent's one-client latency is mostly an fsync; this shows what the disk gave
    at the time, since other processes' writes share the journal and slow it.
    """
    path = directory / "fsync-probe"
    times = []
    with open(path, "ab") as f:
        for _ in range(count):
            f.write(b"x" * 128)
            f.flush()
            started = time.perf_counter()
            os.fsync(f.fileno())
            times.append((time.perf_counter() - started) * 1000.0)
    path.unlink()
    return {"p50": percentile(times, 50), "p99": percentile(times, 99)}


def filesystem_of(path: Path) -> str:
    """"device type" of the mount holding `path` (where the agent's fsyncs land)."""
    best, found = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, fstype = line.split()[:3]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, found = mount, f"{device} ({fstype}) at {mount}"
    return found


class TrivialApp:
    """tests/bench/trivial_app.py in its own process."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port(HOST)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.trivial_app", "--bind", HOST, "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trivial app exited with {self.proc.returncode}; see {log_path}")
            try:
                if httpx.get(f"http://{HOST}:{self.port}/ping", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"trivial app did not answer within {STARTUP_TIMEOUT_S}s; see {log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Figure:
    label: str
    value: float
    unit: str
    target: float | None = None
    at_least: bool = True  # the target is a floor (≥) rather than a ceiling (≤)
    target_text: str = ""

    @property
    def ratio(self) -> float | None:
        """value ÷ target; ≥ 1 meets a floor, ≤ 1 meets a ceiling."""
        return None if self.target is None else self.value / self.target

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.at_least else self.value <= self.target


# The measured phases: (name, server, many: --clients connections rather than one).
PHASES = (
    ("trivial_concurrent", "trivial", True),
    ("agent_concurrent", "agent", True),
    ("trivial_single", "trivial", False),
    ("agent_single", "agent", False),
)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Start both servers, run every phase in `--rounds` interleaved slices, stop them."""
    fleet = args.gpus or f"{min(args.clients, MAX_SIMULATED_GPUS)}x{GPU_MODEL}"
    slice_s = args.duration / args.rounds
    phases: dict[str, PhaseResult] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        tmp_path = Path(tmp)
        runner = LoadRunner(args.client_procs, args.warmup)
        trivial = agent = None
        try:
            fsync_before = fsync_probe_ms(tmp_path)
            trivial = TrivialApp(tmp_path / "trivial.log")
            agent = AgentProcess(tmp_path / "agent", simulate=fleet).start()
            assert agent.proc is not None
            servers = {
                "trivial": (trivial.port, trivial.proc.pid, "ping"),
                "agent": (agent.port, agent.proc.pid, "pairs"),
            }
            for round_no in range(1, args.rounds + 1):
                log_progress(f"round {round_no}/{args.rounds}: {len(PHASES)} phases of {slice_s:g} s")
                for name, server, many in PHASES:
                    port, pid, kind = servers[server]
                    clients = args.clients if many else 1
                    part = runner.run(
                        name, port=port, server_pid=pid, kind=kind, clients=clients, duration_s=slice_s
                    )
                    if name in phases:
                        phases[name].extend(part)
                    else:
                        phases[name] = part
            trivial_mem = memory_mib(trivial.proc.pid)
            agent_mem = memory_mib(agent.proc.pid)
            machine = machine_info(agent.data_dir)
            machine["fsync_ms_before"] = fsync_before
            machine["fsync_ms_after"] = fsync_probe_ms(tmp_path)
        finally:
            runner.close()
            if agent is not None:
                agent.stop()
            if trivial is not None:
                trivial.stop()

    ceiling = phases["trivial_concurrent"].request_rate
    agent_rate = phases["agent_concurrent"].request_rate
    # Requests per second of server CPU: blind to CPU that other processes took.
    ceiling_per_cpu = phases["trivial_concurrent"].requests_per_cpu_s
    agent_rate_per_cpu = phases["agent_concurrent"].requests_per_cpu_s
    single, concurrent = phases["agent_single"], phases["agent_concurrent"]
    figures = [
        Figure("trivial /ping rate, %d clients" % args.clients, ceiling, "req/s"),
        Figure("trivial /ping p50, 1 client", phases["trivial_single"].latency("ping", 50), "ms"),
        Figure("trivial /ping p99, 1 client", phases["trivial_single"].latency("ping", 99), "ms"),
        Figure("agent request rate, %d clients" % args.clients, agent_rate, "req/s"),
        Figure(
            "agent rate / trivial rate",
            100 * agent_rate / ceiling,
            "%",
            100 * TARGET_RATE_FRACTION,
            target_text=f">= {100 * TARGET_RATE_FRACTION:.0f} %",
        ),
        Figure(
            "  the same, per server CPU-second",
            100 * agent_rate_per_cpu / ceiling_per_cpu,
            "%",
        ),
        Figure(
            "allocate->release pairs/s, %d clients" % args.clients,
            concurrent.pair_rate,
            "pairs/s",
            TARGET_PAIRS_PER_S,
            target_text=f">= {TARGET_PAIRS_PER_S:.0f}",
        ),
        Figure(
            "allocate p50, 1 client",
            single.latency("allocate", 50),
            "ms",
            TARGET_P50_MS,
            at_least=False,
            target_text=f"<= {TARGET_P50_MS:g} ms",
        ),
        Figure("allocate p99, 1 client", single.latency("allocate", 99), "ms"),
        Figure("release p50, 1 client", single.latency("release", 50), "ms"),
        Figure("allocate p50, %d clients" % args.clients, concurrent.latency("allocate", 50), "ms"),
        Figure("allocate p99, %d clients" % args.clients, concurrent.latency("allocate", 99), "ms"),
        Figure(
            "agent RSS at end (VmRSS)",
            agent_mem["VmRSS"],
            "MiB",
            TARGET_RSS_MB,
            at_least=False,
            target_text=f"<= {TARGET_RSS_MB:g} MiB",
        ),
        Figure("agent peak RSS (VmHWM)", agent_mem["VmHWM"], "MiB"),
        Figure("trivial app RSS (VmRSS)", trivial_mem["VmRSS"], "MiB"),
    ]
    return {
        "machine": machine,
        "settings": {
            "fleet": fleet,
            "clients": args.clients,
            "client_procs": args.client_procs,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "fsync": "on (SQLite WAL, synchronous=FULL)",
        },
        "figures": figures,
        "phases": {name: p.summary() for name, p in phases.items()},
    }


def log_progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, Linux {m['kernel']}",
        f"code: {m['code']}",
        f"state dir on {m['state_fs']}; fsync {s['fsync']}",
        "fsync probe (128 B append + fsync, p50/p99): "
        f"{m['fsync_ms_before']['p50']:.2f}/{m['fsync_ms_before']['p99']:.2f} ms before the run, "
        f"{m['fsync_ms_after']['p50']:.2f}/{m['fsync_ms_after']['p99']:.2f} ms after",
        f"fleet {s['fleet']}; {s['clients']} clients over {s['client_procs']} load processes; "
        f"{s['duration_s']:g} s measured per phase, in {s['rounds']} interleaved slices "
        f"each after {s['warmup_s']:g} s warm-up",
        "",
        f"{'figure':<38} {'value':>12} {'target':>14} {'ratio':>7}  ",
        "-" * 78,
    ]
    for f in report["figures"]:
        value = f"{f.value:,.1f} {f.unit}" if f.unit != "ms" else f"{f.value:.2f} ms"
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}"
        verdict = "" if f.met is None else ("ok" if f.met else "MISSED")
        lines.append(f"{f.label:<38} {value:>12} {f.target_text:>14} {ratio:>7}  {verdict}")
    lines.append(
        "(agent request rate: every answer, 2 per pair plus any 409; ratio: value / target)"
    )
    lines += [
        "",
        "phase                 req/s   pairs/s    409s  errors  conns   server    load   other   steal",
    ]
    for name, p in report["phases"].items():
        lines.append(
            f"{name:<19} {p['requests_per_s']:>7,.0f} {p.get('pairs_per_s', 0):>9,.1f} "
            f"{p.get('no_capacity_409', 0):>7} {p['errors']:>7} {p['connections_opened']:>6} "
            f"{p['server_cpu_pct']:>7.0f}% {p['client_cpu_pct']:>6.0f}% {p['other_cpu_pct']:>6.0f}% "
            f"{p['steal_cpu_pct']:>6.0f}%"
        )
        if p["first_error"]:
            lines.append(f"    first error: {p['first_error']}")
    disturbed = [
        f"{name} ({p['other_cpu_pct'] + p['steal_cpu_pct']:.0f}%)"
        for name, p in report["phases"].items()
        if p["other_cpu_pct"] + p["steal_cpu_pct"] > DISTURBED_PCT
    ]
    if disturbed:
        lines.append(
            "WARNING: other processes or the hypervisor took CPU during " + ", ".join(disturbed)
            + "; those figures are low. Rerun on a quiet machine."
        )
    lines.append(
        "(CPU: % of one core over the measured window. server: every thread of the server process;"
        " load: the load processes; other: the rest of the machine; steal: taken by the hypervisor."
        " Other or steal above a few % means the run was disturbed.)"
    )
    return "\n".join(lines)


def as_json(report: dict[str, Any]) -> str:
    out = dict(report)
    out["figures"] = [
        {**asdict(f), "ratio": f.ratio, "met": f.met} for f in report["figures"]
    ]
    return json.dumps(out, indent=2, default=float)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_single_agent",
        description="Single-agent HTTP benchmark against a trivial Quart-trio yardstick (docs/benchmarks.md).",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase (default 10)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="slices each phase is split into, the phases interleaved, so that background load "
        "hits the yardstick and the agent alike (default 10)",
    )
    parser.add_argument(
        "--warmup", type=float, default=0.3, help="warm-up seconds before each slice (default 0.3)"
    )
    parser.add_argument("--clients", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument(
        "--gpus",
        default="",
        help="simulated fleet (default: one H100-80GB per client, at most 64, so no allocate is refused; "
        "e.g. 8xH100-80GB makes the surplus clients get 409 no_capacity)",
    )
    parser.add_argument(
        "--client-procs", type=int, default=2, help="load-generator processes (default 2)"
    )
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or min(args.clients, args.client_procs, args.rounds) < 1:
        print("duration > 0, warmup >= 0, and clients, client-procs, rounds >= 1 are required", file=sys.stderr)
        return 2
    report = run_benchmark(args)
    print(render(report))
    if args.json:
        print(as_json(report))
    # Targets missed are results; failed requests make the run itself invalid.
    return 1 if any(p["errors"] for p in report["phases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
