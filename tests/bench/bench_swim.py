"""SWIM benchmark: our `lan` profile against memberlist's DefaultLANConfig, same simulation.

Run it with `python -m tests.bench.bench_swim` (see docs/membership.md); it is
not part of the test suite. Everything runs in the seeded discrete-event
simulation of tests/sim/swim_network.py (0.5-3 ms one-way delay), so the
numbers are protocol time, not Python time, and a seed reproduces a row.

Per profile, cluster size N and seed, one *main run*:

1. A settled cluster of N members; every member carries `META_BYTES` of
   metadata (a compact GPU state) and changes it every `--meta-interval`
   seconds at a random phase. The shell's periodic TCP push-pull runs
   (push_pull_interval · push_pull_scale(N)).
2. Bandwidth: UDP bytes sent per member per second over a `MEASURE_S` window
   (after `WARMUP_S`), with the metadata churn running. TCP push-pull bytes are
   reported separately.
3. Detection: one member crashes; time until *every* live member has declared it
   dead.
4. Join: a new member joins through one seed (UDP JOIN + one push-pull, as the
   shell does); time until every member has a "join" event for it.

Then, at min(N, `FP_NODES`) members, two *false-positive runs* for each profile
with and without Lifeguard (`without_lifeguard()`): `FP_S` seconds at 10% loss
on every link, and `FP_S` seconds with one member paused for 5 s. Counted: dead
verdicts about members that never crashed (the paused member excluded; "false
deaths") and distinct suspicions of them, i.e. (member, incarnation) pairs ever
suspected by anyone ("false suspicions").
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from coordinator.swim import MemberEvent
from coordinator.swim_config import SwimConfig, lan, memberlist_lan
from tests.sim.swim_network import SwimNetwork

META_BYTES = 160
WARMUP_S = 5.0
MEASURE_S = 30.0
DETECT_CAP_S = 150.0
JOIN_CAP_S = 30.0
FP_NODES = 100
FP_S = 120.0
PROFILES = {"lan": lan, "memberlist": memberlist_lan}


@dataclass
class MainResult:
    detect_s: float
    join_s: float
    udp_bps: float
    tcp_bps: float


def meta_for(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(META_BYTES))


def main_run(cfg: SwimConfig, n: int, seed: int, meta_interval: float) -> MainResult:
    net = SwimNetwork(cfg, seed, meta=lambda name: b"\0" * META_BYTES, periodic_push_pull=True)
    names = net.bootstrap(n)
    rng = random.Random(seed)

    def churn(name: str) -> None:
        node = net.nodes[name]
        if node.state == "up":
            node.core.set_meta(meta_for(rng), net.now)
            net._after(node)
        net.call_at(net.now + meta_interval, lambda: churn(name))

    def first_churn(name: str) -> Callable[[], None]:
        return lambda: churn(name)

    if meta_interval > 0:
        for name in names:
            net.call_at(rng.uniform(0, meta_interval), first_churn(name))
    net.run_until(WARMUP_S)
    udp0, tcp0 = net.bytes, net.tcp_bytes
    net.run_until(WARMUP_S + MEASURE_S)
    udp_bps = (net.bytes - udp0) / MEASURE_S / n
    tcp_bps = (net.tcp_bytes - tcp0) / MEASURE_S / n

    victim = names[n // 2]
    crash_at = net.now
    net.crash(victim)
    knowers: set[str] = set()

    def on_death(obs: str, ev: MemberEvent) -> None:
        if ev.member.name == victim and ev.kind == "dead":
            knowers.add(obs)

    net.listeners.append(on_death)
    live = set(names) - {victim}
    while not live <= knowers and net.now < crash_at + DETECT_CAP_S:
        net.run_until(net.now + 0.25)
    detect = net.now - crash_at if live <= knowers else float("inf")
    if live <= knowers:  # refine to the exact moment of the last verdict
        detect = max(t for (t, o, k, m, _) in net.trace if m == victim and k == "dead") - crash_at

    joiner = net.add_node("joiner").name
    heard: dict[str, float] = {}

    def on_join(obs: str, ev: MemberEvent) -> None:
        if ev.member.name == joiner and ev.kind == "join":
            heard.setdefault(obs, ev.at)

    net.listeners.append(on_join)
    join_at = net.now
    net.join(joiner, [names[0]])
    while not live <= set(heard) and net.now < join_at + JOIN_CAP_S:
        net.run_until(net.now + 0.1)
    join = max(heard[x] for x in live) - join_at if live <= set(heard) else float("inf")
    return MainResult(detect, join, udp_bps, tcp_bps)


def false_positive_run(
    cfg: SwimConfig, n: int, seed: int, *, loss: float, pause: bool, seconds: float = FP_S
) -> tuple[int, int]:
    net = SwimNetwork(cfg, seed, loss=loss)
    names = net.bootstrap(n)
    spared: set[str] = set()
    if pause:
        sleeper = names[n // 3]
        spared.add(sleeper)
        net.call_at(10.0, lambda: net.pause(sleeper, 5.0))
    net.run_until(seconds)
    deaths = sum(1 for (_, _, k, m, _) in net.trace if k == "dead" and m not in spared)
    # Distinct accusations (member, incarnation), not the N observers each one reaches.
    suspicions = len({(m, inc) for (_, _, k, m, inc) in net.trace if k == "suspect" and m not in spared})
    return deaths, suspicions


def fmt(values: list[float], unit: str = "s") -> str:
    finite = [v for v in values if v != float("inf")]
    if not finite:
        return "never"
    med = statistics.median(finite)
    miss = len(values) - len(finite)
    return f"{med:.2f} {unit}" + (f" ({miss} never)" if miss else "") + f" [{min(finite):.2f}–{max(finite):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="5,1000", help="comma-separated cluster sizes")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per (profile, size)")
    ap.add_argument("--profiles", default="lan,memberlist", help="comma-separated: lan, memberlist")
    ap.add_argument("--meta-interval", type=float, default=60.0, help="seconds between a member's metadata changes (0 = none)")
    ap.add_argument("--no-fp", action="store_true", help="skip the false-positive runs")
    ap.add_argument("--fp-only", action="store_true", help="only the false-positive runs")
    ap.add_argument("--fp-nodes", type=int, default=FP_NODES, help="cluster size of the false-positive runs")
    ap.add_argument("--fp-seconds", type=float, default=FP_S, help="simulated seconds per false-positive run")
    args = ap.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]
    profiles = args.profiles.split(",")
    started = time.time()
    rows: list[str] = [
        "| profile | N | crash → all know dead (median [min–max]) | join → all N know | UDP B/s per member | TCP push-pull B/s per member |",
        "|---|---|---|---|---|---|",
    ]
    for prof in [] if args.fp_only else profiles:
        cfg = PROFILES[prof]()
        for n in sizes:
            results = [main_run(cfg, n, seed, args.meta_interval) for seed in range(1, args.seeds + 1)]
            rows.append(
                f"| {prof} | {n} | {fmt([r.detect_s for r in results])} | {fmt([r.join_s for r in results])} "
                f"| {statistics.median(r.udp_bps for r in results):,.0f} | {statistics.median(r.tcp_bps for r in results):,.0f} |"
            )
            print(rows[-1], flush=True)
    fp_rows = [
        "",
        f"False positives over {args.fp_seconds:.0f} s, N = {args.fp_nodes}, summed over seeds "
        "(false deaths / distinct false suspicions):",
        "",
        "| profile | Lifeguard | N | 10% loss | one member paused 5 s |",
        "|---|---|---|---|---|",
    ]
    if not args.no_fp:
        for prof in profiles:
            for lifeguard in (True, False):
                cfg = PROFILES[prof]()
                if not lifeguard:
                    cfg = cfg.without_lifeguard()
                n = args.fp_nodes
                seeds = range(1, args.seeds + 1)
                loss = [false_positive_run(cfg, n, s, loss=0.10, pause=False, seconds=args.fp_seconds) for s in seeds]
                paused = [false_positive_run(cfg, n, s, loss=0.0, pause=True, seconds=args.fp_seconds) for s in seeds]
                fp_rows.append(
                    f"| {prof} | {'on' if lifeguard else 'off'} | {n} "
                    f"| {sum(d for d, _ in loss)} / {sum(s for _, s in loss)} "
                    f"| {sum(d for d, _ in paused)} / {sum(s for _, s in paused)} |"
                )
                print(fp_rows[-1], flush=True)
    print()
    print("\n".join(rows + (fp_rows if not args.no_fp else [])))
    print()
    print(
        f"seeds 1..{args.seeds}, metadata {META_BYTES} B changed every {args.meta_interval:g} s per member; "
        f"python {platform.python_version()} on {platform.machine()}, {time.time() - started:.0f} s wall"
    )


if __name__ == "__main__":
    main()
