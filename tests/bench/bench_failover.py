"""Cluster benchmark: leader failover time, follower latency and replicated throughput.

Run it with `python -m tests.bench.bench_failover` (see docs/benchmarks.md); it
is not part of the test suite. On loopback only, it starts three Raft servers
(real `python -m agent` processes, fsync on, the default LAN Raft timings:
100 ms heartbeat, 1-2 s election timeout) on 127.0.0.2..4, and then

1. failover, `--repeats` times: find the leader, `kill -9` it, and time until
   the first allocation through a surviving server succeeds (polled every
   `POLL_S`); release it, restart the killed server and wait until it follows
   the new leader again;
2. allocate latency through a follower with one client (each allocate
   forwarded to the leader, then committed by a majority), and on the leader
   itself (the Raft round without the forwarding hop), and on a single agent
   (neither: the yardstick of this machine);
3. allocate→release pairs per second through the leader with `--clients`
   connections (each pair is two committed log entries), against a single
   agent (`bootstrap_expect = 1`, no Raft) measured in the same run with the
   same load client (tests/bench/bench_single_agent.py).

It prints one table: each figure, its target and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.bench.bench_single_agent import LoadRunner, allocate_body, machine_info, percentile

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
NAMES = ["bench-s0", "bench-s1", "bench-s2"]
POLL_S = 0.01
FAILOVER_DEADLINE_S = 20.0
REJOIN_DEADLINE_S = 30.0

TARGET_FAILOVER_MEDIAN_S = 1.5
TARGET_FOLLOWER_P50_MS = 5.0
TARGET_FOLLOWER_P99_MS = 25.0


def leader_of(agent: AgentProcess) -> str | None:
    try:
        name = httpx.get(agent.url + "/cluster/leader", timeout=1.0).json()["leader"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return None if name is None else str(name)


def wait(check: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(interval)


class Cluster:
    def __init__(self, root: Path, fleet: str) -> None:
        # The default (lan) gossip and Raft timings: what the targets are about.
        self.agents = cluster_agents(root, HOSTS, NAMES, servers=3, simulate=fleet, profile=None)

    def start(self) -> None:
        start_together(self.agents)

    def kill(self) -> None:
        for agent in self.agents:
            agent.kill()

    def by_name(self, name: str) -> AgentProcess:
        return next(a for a in self.agents if a.node_name == name)

    def agreed_leader(self, agents: list[AgentProcess] | None = None) -> str:
        def agreed() -> str | None:
            names = {leader_of(a) for a in (agents or self.agents)}
            return names.pop() if len(names) == 1 and None not in names else None

        return str(wait(agreed, REJOIN_DEADLINE_S, "an agreed leader"))


def try_allocate(agent: AgentProcess, service: str) -> str | None:
    try:
        resp = httpx.post(agent.url + "/gpu/allocate", json=allocate_body(service), timeout=3.0)
    except httpx.HTTPError:
        return None
    return str(resp.json()["allocation_id"]) if resp.status_code == 200 else None


def release(agent: AgentProcess, allocation_id: str) -> None:
    httpx.post(agent.url + "/gpu/release", json={"allocation_id": allocation_id}, timeout=10.0)


def measure_failover(cluster: Cluster, repeats: int) -> list[float]:
    times: list[float] = []
    for n in range(repeats):
        leader = cluster.agreed_leader()
        victim = cluster.by_name(leader)
        survivor = next(a for a in cluster.agents if a is not victim)
        victim.kill()
        started = time.monotonic()
        while True:
            aid = try_allocate(survivor, f"failover-{n}")
            if aid is not None:
                break
            if time.monotonic() - started > FAILOVER_DEADLINE_S:
                raise RuntimeError(f"no allocation within {FAILOVER_DEADLINE_S} s of killing {leader}")
            time.sleep(POLL_S)
        elapsed = time.monotonic() - started
        times.append(elapsed)
        print(f"  failover {n + 1}/{repeats}: {leader} killed, first allocation after {elapsed:.3f} s", file=sys.stderr)
        release(survivor, aid)
        victim.start()
        # Rejoined: every server, the restarted one too, names the same leader.
        cluster.agreed_leader()
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"command": "python -m tests.bench.bench_failover " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        root = Path(tmp)
        report["machine"] = machine_info(root)
        cluster = Cluster(root / "cluster", args.fleet)
        single = AgentProcess(data_dir=root / "single", host="127.0.0.1", node_name="bench-single", simulate=args.single_fleet)
        runner = LoadRunner(args.client_procs, warmup_s=args.warmup)
        try:
            cluster.start()
            single.start()
            print("failover ...", file=sys.stderr)
            failovers = measure_failover(cluster, args.repeats)
            leader = cluster.by_name(cluster.agreed_leader())
            follower = next(a for a in cluster.agents if a is not leader)
            assert leader.proc is not None and follower.proc is not None and single.proc is not None
            print("follower latency, 1 client ...", file=sys.stderr)
            one = runner.run(
                "follower-1", host=follower.host, port=follower.port, server_pid=follower.proc.pid,
                kind="pairs", clients=1, duration_s=args.duration,
            )
            print("leader latency, 1 client ...", file=sys.stderr)
            direct = runner.run(
                "leader-1", host=leader.host, port=leader.port, server_pid=leader.proc.pid,
                kind="pairs", clients=1, duration_s=args.duration,
            )
            print(f"leader pairs/s, {args.clients} clients ...", file=sys.stderr)
            many = runner.run(
                "leader-n", host=leader.host, port=leader.port, server_pid=leader.proc.pid,
                kind="pairs", clients=args.clients, duration_s=args.duration,
            )
            print("single agent latency, 1 client ...", file=sys.stderr)
            alone_one = runner.run(
                "single-1", host=single.host, port=single.port, server_pid=single.proc.pid,
                kind="pairs", clients=1, duration_s=args.duration,
            )
            print(f"single agent pairs/s, {args.clients} clients ...", file=sys.stderr)
            alone = runner.run(
                "single-n", host=single.host, port=single.port, server_pid=single.proc.pid,
                kind="pairs", clients=args.clients, duration_s=args.duration,
            )
        finally:
            runner.close()
            cluster.kill()
            single.kill()
    report["failover_s"] = [round(t, 3) for t in failovers]
    report["phases"] = {p.name: p.summary() for p in (one, direct, many, alone_one, alone)}
    report["figures"] = {
        "failover_median_s": percentile(failovers, 50),
        "failover_p90_s": percentile(failovers, 90),
        "failover_max_s": max(failovers),
        "follower_p50_ms": one.latency("allocate", 50),
        "follower_p99_ms": one.latency("allocate", 99),
        "leader_p50_ms": direct.latency("allocate", 50),
        "leader_p99_ms": direct.latency("allocate", 99),
        "single_p50_ms": alone_one.latency("allocate", 50),
        "leader_pairs_per_s": many.pair_rate,
        "single_pairs_per_s": alone.pair_rate,
        "errors": sum(p.load.errors for p in (one, direct, many, alone_one, alone)),
    }
    return report


def render(report: dict[str, Any]) -> str:
    f = report["figures"]
    rows = [
        ("failover, median (s)", f["failover_median_s"], f"<= {TARGET_FAILOVER_MEDIAN_S}", f["failover_median_s"] / TARGET_FAILOVER_MEDIAN_S),
        ("failover, p90 (s)", f["failover_p90_s"], "", None),
        ("failover, max (s)", f["failover_max_s"], "", None),
        ("allocate via follower, 1 client, p50 (ms)", f["follower_p50_ms"], f"<= {TARGET_FOLLOWER_P50_MS}", f["follower_p50_ms"] / TARGET_FOLLOWER_P50_MS),
        ("allocate via follower, 1 client, p99 (ms)", f["follower_p99_ms"], f"<= {TARGET_FOLLOWER_P99_MS}", f["follower_p99_ms"] / TARGET_FOLLOWER_P99_MS),
        ("allocate on the leader, 1 client, p50 (ms)", f["leader_p50_ms"], "", None),
        ("allocate on the leader, 1 client, p99 (ms)", f["leader_p99_ms"], "", None),
        ("allocate, single agent, 1 client, p50 (ms)", f["single_p50_ms"], "", None),
        ("pairs/s via leader, 3 servers", f["leader_pairs_per_s"], "vs single agent", f["leader_pairs_per_s"] / f["single_pairs_per_s"]),
        ("pairs/s, single agent (no Raft)", f["single_pairs_per_s"], "", None),
    ]
    lines = [f"| {'figure':<44} | {'measured':>9} | {'target':<16} | {'ratio':>6} |", f"|{'-' * 46}|{'-' * 11}|{'-' * 18}|{'-' * 8}|"]
    for name, value, target, ratio in rows:
        ratio_text = "" if ratio is None else f"{ratio:.2f}"
        lines.append(f"| {name:<44} | {value:>9.3f} | {target:<16} | {ratio_text:>6} |")
    m = report["machine"]
    lines.append("")
    lines.append(f"failovers (s): {', '.join(str(t) for t in report['failover_s'])}; load errors: {f['errors']}")
    lines.append(f"machine: {m['nproc']} CPUs, {m['cpu_model']}, Python {m['python']}, kernel {m['kernel']}, state on {m['state_fs']}, code {m['code']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=10, help="failovers to time (default 10)")
    parser.add_argument("--clients", type=int, default=32, help="connections for the throughput phases (default 32)")
    parser.add_argument("--client-procs", type=int, default=4, help="load worker processes (default 4)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per load phase (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per load phase (default 1)")
    parser.add_argument("--fleet", default="16xH100-80GB", help="simulated GPUs per server (default 16xH100-80GB)")
    parser.add_argument("--single-fleet", default="48xH100-80GB", help="simulated GPUs of the single agent")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON too")
    args = parser.parse_args(argv)
    report = run(args)
    print(render(report))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
