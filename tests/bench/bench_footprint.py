"""Footprint benchmark: what one idle agent costs its host, and what a scrape costs.

Run it with `python -m tests.bench.bench_footprint` (see docs/benchmarks-footprint.md);
it is not part of the test suite. In one run, on loopback only, it starts a real
agent (`python -m agent --simulate GPUS`, the default 1 s sampling interval,
state in a temporary dir) through tests/agent_process.py and measures two phases:

1. Idle. After `SETTLE_S` it allocates `LEASED_GPUS` GPUs (so lease-dependent
   series, usage tracking and the simulator's busy dynamics all run), waits
   `POST_ALLOCATE_S`, and then touches nothing for `--duration` seconds. The
   agent's CPU time over that window is what its background tasks cost (the
   sampler, the scheduler tick, housekeeping), in % of one core. Its resident
   memory is read at the end (VmRSS) together with the peak so far (VmHWM).
2. Scrapes. `--scrapes` sequential `GET /metrics` over one keep-alive
   connection, then as many `GET /healthz` over another: the floor of the web
   stack (routing, before/after hooks, Hypercorn), so what the scrape itself
   adds shows as the difference. Latency percentiles, the agent's CPU time per
   request, and the scrape's size in bytes and series.

Theory of operation
-------------------
CPU is read from /proc/PID/stat (utime + stime, which already sum every thread
of the process) at the edges of each window, so the benchmark itself adds
nothing to the agent's account; reading /proc costs the agent nothing. The
kernel counts in clock ticks (usually 10 ms), so a 60 s window resolves the
agent's CPU to about 0.02 % of a core. Memory comes from /proc/PID/status
(VmRSS, VmHWM, and RssAnon/RssFile to tell heap from mapped code).

The HTTP client is a few lines over a blocking socket with TCP_NODELAY: it
writes prepared request bytes and reads the response by Content-Length
(`parse_response`, sans-io); a `Connection: close` from the server (Hypercorn
closes after `keep_alive_max_requests`) reopens the connection and is counted.
A latency is from just before the write to the last byte of the body. A few
warm-up requests of each kind go first (`WARMUP_REQUESTS`), so the series the
requests themselves create (the HTTP counters of /metrics and /healthz) exist
before the first measured scrape and every measured scrape has the same size;
the first scrape's latency is reported on its own.

Everything the agent's CPU cannot show - other processes taking the CPUs while
a latency was measured - shows in the machine's busy time (/proc/stat, all
CPUs, excluding the agent and this process) over the same windows.

Bounds: every request has a timeout (`REQUEST_TIMEOUT_S`); the agent is
stopped (SIGTERM, then SIGKILL) however the run ends. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import httpx

from tests.agent_process import AgentProcess
from tests.bench.bench_single_agent import HttpError, Response, parse_response, prepare_request

HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 10.0
SETTLE_S = 3.0
# After the allocation's response, before the idle window opens: the log entry's
# follow-up work (outbox rows, lease push to the simulator) is done by then.
POST_ALLOCATE_S = 1.0
LEASED_GPUS = 4
WARMUP_REQUESTS = 5

# Targets from the issue.
TARGET_CPU_PCT = 1.0
TARGET_RSS_MIB = 80.0
TARGET_SCRAPE_P99_MS = 10.0
# dcgm-exporter, as reported (the anchors): CPU in % of one core, RSS in MiB.
DCGM_CPU_PCT = (15.0, 20.0)
DCGM_RSS_MIB = (71.0, 155.0)


# ---------------------------------------------------------------------- HTTP client


def prepare_get(path: str, port: int) -> bytes:
    return prepare_request("GET", path, port)


class KeepAliveClient:
    """One HTTP/1.1 connection, reopened only when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reconnects = 0
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=REQUEST_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf.clear()
        return sock

    def get(self, request: bytes) -> tuple[Response, float]:
        """Send one prepared request; returns the response and its latency in seconds."""
        if self._sock is None:
            self._sock = self._connect()
        sock = self._sock
        started = time.perf_counter()
        sock.sendall(request)
        while True:
            response = parse_response(self._buf)
            if response is not None:
                break
            chunk = sock.recv(262144)
            if not chunk:
                raise HttpError("connection closed mid-response")
            self._buf += chunk
        elapsed = time.perf_counter() - started
        if response.close:
            self.close()
            self.reconnects += 1
        return response, elapsed

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------- /proc readings


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid`, all threads, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """Busy CPU seconds of all CPUs since boot (user, nice, system, irq, softirq, steal)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def loop_wakeups(pid: int) -> int:
    """Voluntary context switches of `pid`'s main thread (the trio loop): each is one sleep and wake."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise RuntimeError(f"no voluntary_ctxt_switches in /proc/{pid}/status")


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (peak resident), RssAnon, RssFile, RssShmem of `pid` in MiB, and Threads."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = float(value)
    return out


@dataclass(frozen=True, slots=True)
class Window:
    """CPU over one stretch of wall time: the agent's, this process's and the machine's."""

    wall_s: float
    agent_cpu_s: float
    bench_cpu_s: float
    machine_busy_s: float

    @property
    def agent_pct(self) -> float:
        return 100.0 * self.agent_cpu_s / self.wall_s

    @property
    def others_pct(self) -> float:
        """Everything else busy on the machine, in % of one core (can exceed 100)."""
        return 100.0 * max(0.0, self.machine_busy_s - self.agent_cpu_s - self.bench_cpu_s) / self.wall_s


class WindowMeter:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        return (time.monotonic(), process_cpu_s(self.pid), time.process_time(), machine_busy_s())

    def stop(self) -> Window:
        end = self._read()
        d = [b - a for a, b in zip(self._start, end)]
        return Window(wall_s=d[0], agent_cpu_s=d[1], bench_cpu_s=d[2], machine_busy_s=d[3])


# ---------------------------------------------------------------------- phases


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100.0 * len(ordered)) - 1)]


def count_series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def sum_of(text: str, metric: str) -> float:
    """Sum of the samples of `metric` (exact name, any labels) in an exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric) and line[len(metric)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def allocate(agent: AgentProcess, count: int) -> list[int]:
    """Allocate `count` GPUs now (no queueing); returns their indices. Raises RuntimeError."""
    body = {"service_name": "footprint-bench", "workload_type": "generic", "gpu_count": count, "queue": False}
    r = httpx.post(f"{agent.url}/gpu/allocate", json=body, timeout=REQUEST_TIMEOUT_S)
    if r.status_code != 200 or len(r.json().get("gpu_ids", [])) != count:
        raise RuntimeError(f"allocate {count} GPUs: {r.status_code} {r.text[:300]}")
    return list(r.json()["gpu_ids"])


@dataclass
class RequestStats:
    path: str
    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    agent_cpu_ms_per_request: float
    bytes: int
    reconnects: int
    others_pct: float  # the rest of the machine's CPU use meanwhile, % of one core


def measure_requests(agent: AgentProcess, path: str, count: int) -> tuple[RequestStats, bytes]:
    """`count` sequential GETs of `path` over one keep-alive connection, after a warm-up.

    Returns the figures and the last body. Raises HttpError on a non-200 answer.
    """
    assert agent.proc is not None
    client = KeepAliveClient(agent.port)
    request = prepare_get(path, agent.port)
    try:
        for _ in range(WARMUP_REQUESTS):
            client.get(request)
        client.reconnects = 0
        latencies: list[float] = []
        body = b""
        meter = WindowMeter(agent.proc.pid)
        for _ in range(count):
            response, elapsed = client.get(request)
            if response.status != 200:
                raise HttpError(f"GET {path}: {response.status} {response.body[:200]!r}")
            latencies.append(elapsed * 1000.0)
            body = response.body
        window = meter.stop()
    finally:
        client.close()
    stats = RequestStats(
        path=path,
        requests=count,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies),
        mean_ms=sum(latencies) / len(latencies),
        agent_cpu_ms_per_request=1000.0 * window.agent_cpu_s / count,
        bytes=len(body),
        reconnects=client.reconnects,
        others_pct=window.others_pct,
    )
    return stats, body


def machine_info() -> dict[str, Any]:
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
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run(duration_s: float, gpus: str, scrapes: int) -> dict[str, Any]:
    """One whole run: start the agent, the idle phase, the scrape phase. Returns the report."""
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        agent = AgentProcess(Path(tmp) / "agent", simulate=gpus)
        agent.start()
        try:
            assert agent.proc is not None
            pid = agent.proc.pid
            time.sleep(SETTLE_S)
            leased = allocate(agent, LEASED_GPUS)
            time.sleep(POST_ALLOCATE_S)

            meter, wakeups = WindowMeter(pid), loop_wakeups(pid)
            time.sleep(duration_s)
            idle = meter.stop()
            wakeups = loop_wakeups(pid) - wakeups
            idle_memory = memory_mib(pid)

            # The first scrape ever, cold, on a fresh connection (set up outside the timing).
            client = KeepAliveClient(agent.port)
            try:
                client.get(prepare_get("/healthz", agent.port))
                first, first_s = client.get(prepare_get("/metrics", agent.port))
                if first.status != 200:
                    raise HttpError(f"GET /metrics: {first.status} {first.body[:200]!r}")
            finally:
                client.close()
            metrics, metrics_body = measure_requests(agent, "/metrics", scrapes)
            healthz, _ = measure_requests(agent, "/healthz", scrapes)
            end_memory = memory_mib(pid)
        finally:
            exit_status = agent.stop()
    text = metrics_body.decode()
    return {
        "machine": machine_info(),
        "config": {"gpus": gpus, "duration_s": duration_s, "scrapes": scrapes, "leased_gpus": leased},
        "idle": {
            "wall_s": idle.wall_s,
            "agent_cpu_s": idle.agent_cpu_s,
            "agent_cpu_pct": idle.agent_pct,
            "others_pct": idle.others_pct,
            "loop_wakeups_per_s": wakeups / idle.wall_s,
            "memory_mib": idle_memory,
        },
        "first_scrape_ms": first_s * 1000.0,
        "metrics": asdict(metrics),
        "healthz": asdict(healthz),
        "scrape": {
            "series": count_series(text),
            "allocated_gpus_seen": sum_of(text, "gpu_orchestrator_gpu_allocated"),
            "mean_util_leased_pct": _mean_util(text, set(leased)),
        },
        "end_memory_mib": end_memory,
        "agent_exit_status": exit_status,
    }


def _mean_util(text: str, indices: set[int]) -> float:
    """Mean DCGM_FI_DEV_GPU_UTIL of the given GPUs: shows the lease drove the simulator."""
    values = []
    for line in text.splitlines():
        if line.startswith("DCGM_FI_DEV_GPU_UTIL{"):
            labels = line[line.index("{") + 1 : line.index("}")]
            gpu = next(p for p in labels.split(",") if p.startswith("gpu="))
            if int(gpu.split("=")[1].strip('"')) in indices:
                values.append(float(line.rsplit(" ", 1)[1]))
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------- report


def _verdict(value: float, target: float) -> str:
    return f"{value / target:.2f} {'ok' if value <= target else 'MISSED'}"


def render(report: dict[str, Any]) -> str:
    m, idle, met, hz = report["machine"], report["idle"], report["metrics"], report["healthz"]
    mem, end_mem = idle["memory_mib"], report["end_memory_mib"]
    cpu = idle["agent_cpu_pct"]
    rows: list[tuple[str, str, str, str]] = [
        ("agent CPU, idle (% of one core)", f"{cpu:.3f} %", f"<= {TARGET_CPU_PCT:g} %", _verdict(cpu, TARGET_CPU_PCT)),
        ("agent RSS at end of idle (VmRSS)", f"{mem['VmRSS']:.1f} MiB", f"<= {TARGET_RSS_MIB:g} MiB",
         _verdict(mem["VmRSS"], TARGET_RSS_MIB)),
        ("  of which anon / file-backed", f"{mem['RssAnon']:.1f} / {mem['RssFile']:.1f} MiB", "", ""),
        ("agent RSS after scrapes (VmRSS)", f"{end_mem['VmRSS']:.1f} MiB", f"<= {TARGET_RSS_MIB:g} MiB",
         _verdict(end_mem["VmRSS"], TARGET_RSS_MIB)),
        ("agent peak RSS, whole run (VmHWM)", f"{end_mem['VmHWM']:.1f} MiB", f"<= {TARGET_RSS_MIB:g} MiB",
         _verdict(end_mem["VmHWM"], TARGET_RSS_MIB)),
        ("/metrics p50", f"{met['p50_ms']:.2f} ms", "", ""),
        ("/metrics p99", f"{met['p99_ms']:.2f} ms", f"<= {TARGET_SCRAPE_P99_MS:g} ms",
         _verdict(met["p99_ms"], TARGET_SCRAPE_P99_MS)),
        ("/metrics max", f"{met['max_ms']:.2f} ms", "", ""),
        ("/metrics first scrape (cold)", f"{report['first_scrape_ms']:.2f} ms", "", ""),
        ("/metrics agent CPU per scrape", f"{met['agent_cpu_ms_per_request']:.2f} ms", "", ""),
        ("/metrics response size", f"{met['bytes']} B", "", ""),
        ("/metrics series", f"{report['scrape']['series']}", "", ""),
        ("/healthz p50 (web-stack floor)", f"{hz['p50_ms']:.2f} ms", "", f"/metrics p50 = {met['p50_ms'] / hz['p50_ms']:.1f}x"),
        ("/healthz p99", f"{hz['p99_ms']:.2f} ms", "", f"/metrics p99 = {met['p99_ms'] / hz['p99_ms']:.1f}x"),
        ("/healthz max", f"{hz['max_ms']:.2f} ms", "", ""),
        ("/healthz agent CPU per request", f"{hz['agent_cpu_ms_per_request']:.2f} ms", "", ""),
        ("anchor: dcgm-exporter CPU", f"{DCGM_CPU_PCT[0]:g}-{DCGM_CPU_PCT[1]:g} %", "",
         f"agent = 1/{DCGM_CPU_PCT[0] / cpu:.0f}-1/{DCGM_CPU_PCT[1] / cpu:.0f}" if cpu > 0 else ""),
        ("anchor: dcgm-exporter RSS", f"{DCGM_RSS_MIB[0]:g}-{DCGM_RSS_MIB[1]:g} MiB", "",
         f"agent = {mem['VmRSS'] / DCGM_RSS_MIB[0]:.2f}-{mem['VmRSS'] / DCGM_RSS_MIB[1]:.2f}x"),
    ]
    header = ("figure", "value", "target", "ratio / verdict")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, Linux {m['kernel']}, {m['date']}",
        f"agent: --simulate {report['config']['gpus']}, 1 s sampling, GPUs {report['config']['leased_gpus']} leased "
        f"(mean util {report['scrape']['mean_util_leased_pct']:.0f} % at the scrapes, "
        f"{report['scrape']['allocated_gpus_seen']:g} shown allocated), {mem['Threads']:g} threads",
        f"idle window {idle['wall_s']:.1f} s: agent {idle['agent_cpu_s']:.2f} CPU-s; "
        f"{idle['loop_wakeups_per_s']:.1f} event-loop wakeups/s; rest of machine {idle['others_pct']:.0f} % of a core",
        f"scrapes: {met['requests']} x /metrics then {hz['requests']} x /healthz, one keep-alive connection each "
        f"(reconnects {met['reconnects']}/{hz['reconnects']}); rest of machine "
        f"{met['others_pct']:.0f} % / {hz['others_pct']:.0f} % of a core meanwhile",
        "",
        line(header),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *(line(r) for r in rows),
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_footprint", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="idle window in seconds (default 60)")
    parser.add_argument("--gpus", default="8xH100-80GB", help="simulated fleet (default 8xH100-80GB)")
    parser.add_argument("--scrapes", type=int, default=300, help="GET /metrics (and /healthz) requests (default 300)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.scrapes < 1:
        parser.error("--duration must be > 0 and --scrapes >= 1")
    report = run(args.duration, args.gpus, args.scrapes)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
