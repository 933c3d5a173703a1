"""Queue-depth benchmark: does a lone agent answer as fast with 1,000 requests queued as with none?

Run it with `python -m tests.bench.bench_queue_depth` (see docs/benchmarks.md,
"Scale"); it is not part of the test suite. Figures are reported, never
asserted: the exit status is 1 only when a request got an unexpected answer.

What runs: a real lone agent (`python -m agent --simulate 64xH100-80GB`, fsync
on, `[scheduler] max_queue = 2000`, started as bench_single_agent starts it)
and, in this process, one keep-alive HTTP/1.1 client (bench_single_agent's
sans-io request and response code over a blocking socket): one request at a
time, so each latency is the agent's answer to one client.

Every GPU is held first (64 one-GPU leases of service `holder`). Then, in
`--rounds` rounds, each round measures at depth 0 and then at depth
`--depth` (a backlog of requests of service `backlog` at priority 1, queued
between the two and cancelled after, by one release of the service), so drift
of a shared machine hits both depths alike. At each depth, `--iterations` times:

1. `allocate queue=false` → 409 no_capacity (timed);
2. `allocate queue=true` at priority 5 → 202 queued (timed): it ranks ahead
   of the backlog, so it is the one the next release serves;
3. `release` of one held lease → 200 (timed); the scheduler places step 2's
   request on the freed GPU, which the client looks up (untimed) and holds,
   so every GPU stays held and the queue keeps its depth.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.agent_process import AgentProcess
from tests.bench.bench_single_agent import (
    HOST,
    REQUEST_TIMEOUT_S,
    fsync_probe_ms,
    machine_info,
    parse_response,
    percentile,
    prepare_request,
)

GPUS = 64
TARGET_P50_MS = 3.0
PLACEMENT_TIMEOUT_S = 10.0


class Client:
    """One keep-alive connection; `call` sends a request and returns (status, body, seconds)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=REQUEST_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = sock, bytearray()
        return sock

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
        data = prepare_request(method, path, self.port, body)
        sock = self.sock or self._connect()
        started = time.perf_counter()
        sock.sendall(data)
        while True:
            response = parse_response(self.buf)
            if response is not None:
                break
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{method} {path}: connection closed mid-response")
            self.buf += chunk
        elapsed = time.perf_counter() - started
        if response.close:  # Hypercorn closes after keep_alive_max_requests
            sock.close()
            self.sock = None
        return response.status, json.loads(response.body) if response.body else None, elapsed

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def allocate(service: str, *, queue: bool, priority: int, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "service_name": service,
        "gpu_count": 1,
        "min_memory_mb": 1024,
        "priority": priority,
        "queue": queue,
        "max_utilization": 100,  # see bench_single_agent.allocate_body
    }
    if request_id is not None:
        body["request_id"] = request_id
    return body


class Bench:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.held: list[str] = []
        self.samples: dict[tuple[int, str], list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.issued = 0

    def expect(self, status: int, want: int, what: str, body: Any) -> bool:
        if status != want:
            self.errors.append(f"{what}: {status} {json.dumps(body)[:200]}")
            return False
        return True

    def hold_every_gpu(self) -> None:
        for n in range(GPUS):
            status, body, _ = self.client.call("POST", "/gpu/allocate", allocate("holder", queue=False, priority=5))
            if self.expect(status, 200, "fill", body):
                self.held.append(body["allocation_id"])

    def fill_backlog(self, depth: int) -> None:
        for _ in range(depth):
            status, body, _ = self.client.call("POST", "/gpu/allocate", allocate("backlog", queue=True, priority=1))
            self.expect(status, 202, "backlog", body)

    def drop_backlog(self) -> None:
        status, body, _ = self.client.call("POST", "/gpu/release", {"service_name": "backlog"})
        self.expect(status, 200, "cancel backlog", body)

    def measure(self, depth: int, iterations: int) -> None:
        call = self.client.call
        for _ in range(iterations):
            status, body, s = call("POST", "/gpu/allocate", allocate("probe", queue=False, priority=5))
            if self.expect(status, 409, "allocate queue=false", body):
                self.samples[(depth, "allocate 409 (queue=false)")].append(s * 1000)
            self.issued += 1
            rid = f"probe-{self.issued:06d}"
            status, body, s = call("POST", "/gpu/allocate", allocate("holder", queue=True, priority=5, request_id=rid))
            if self.expect(status, 202, "allocate queue=true", body):
                self.samples[(depth, "allocate 202 (queued)")].append(s * 1000)
            status, body, s = call("POST", "/gpu/release", {"allocation_id": self.held.pop(0)})
            if self.expect(status, 200, "release", body):
                self.samples[(depth, "release")].append(s * 1000)
            self.hold_placed(rid)

    def hold_placed(self, request_id: str) -> None:
        """Wait (untimed) until the scheduler placed `request_id`, and hold what it got."""
        deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
        while time.monotonic() < deadline:
            status, body, _ = self.client.call("GET", f"/gpu/requests/{request_id}")
            if status == 200 and body.get("status") == "allocated" and body.get("allocation_id"):
                self.held.append(body["allocation_id"])
                return
            time.sleep(0.002)
        self.errors.append(f"{request_id} was not placed within {PLACEMENT_TIMEOUT_S} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_queue_depth", description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=1000, help="queued requests in the deep phase (default 1,000)")
    parser.add_argument("--iterations", type=int, default=200, help="409/202/release triples per depth per round (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring both depths (default 3)")
    args = parser.parse_args(argv)
    depths = (0, args.depth)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-queue-") as tmp:
        tmp_path = Path(tmp)
        config = tmp_path / "agent.toml"
        config.write_text(f"[scheduler]\nmax_queue = {max(1000, 2 * args.depth)}\n")
        load_before = os.getloadavg()
        fsync_before = fsync_probe_ms(tmp_path)
        agent = AgentProcess(
            tmp_path / "agent", simulate=f"{GPUS}xH100-80GB", env={"CONFIG_PATH": str(config)}
        ).start()
        client = Client(agent.port)
        bench = Bench(client)
        try:
            bench.hold_every_gpu()
            for round_no in range(1, args.rounds + 1):
                print(f"... round {round_no}/{args.rounds}", file=sys.stderr, flush=True)
                bench.measure(0, args.iterations)
                bench.fill_backlog(args.depth)
                bench.measure(args.depth, args.iterations)
                bench.drop_backlog()
            info = machine_info(agent.data_dir)
        finally:
            client.close()
            agent.stop()
        load_after = os.getloadavg()
        fsync_after = fsync_probe_ms(tmp_path)

    print(f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, Linux {info['kernel']}")
    print(f"code: {info['code']}; state dir on {info['state_fs']}; fsync on")
    print(
        f"load average (1/5/15 min): {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} before, "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after; fsync probe p50/p99: "
        f"{fsync_before['p50']:.2f}/{fsync_before['p99']:.2f} ms before, {fsync_after['p50']:.2f}/{fsync_after['p99']:.2f} ms after"
    )
    print(
        f"lone agent, {GPUS} simulated H100s all held; one client; {args.rounds} rounds x {args.iterations} "
        f"iterations per depth"
    )
    print()
    names = ("allocate 409 (queue=false)", "allocate 202 (queued)", "release")
    head = f"{'figure':<28} " + " ".join(f"{f'{d:,} queued p50 / p99':>24}" for d in depths) + f" {'p50 ratio':>10}"
    print(head)
    print("-" * len(head))
    for name in names:
        cells = [
            f"{percentile(bench.samples[(d, name)], 50):.2f} / {percentile(bench.samples[(d, name)], 99):.2f} ms"
            for d in depths
        ]
        ratio = percentile(bench.samples[(depths[1], name)], 50) / percentile(bench.samples[(depths[0], name)], 50)
        print(f"{name:<28} " + " ".join(f"{c:>24}" for c in cells) + f" {ratio:>10.2f}")
    for name in names[:2]:
        p50 = percentile(bench.samples[(depths[1], name)], 50)
        verdict = "held" if p50 <= TARGET_P50_MS else "MISSED"
        print(f"target: {name} p50 <= {TARGET_P50_MS:g} ms with {args.depth:,} queued: {verdict} ({p50:.2f} ms)")
    for error in bench.errors[:5]:
        print(f"error: {error}")
    if bench.errors:
        print(f"{len(bench.errors)} unexpected answers")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
