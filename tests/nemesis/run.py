"""Run the nemesis: five agents, a workload, faults on a seeded schedule, then the checker's table.

    python -m tests.nemesis.run --seed 7            # short: one fault of each kind (~2 min)
    python -m tests.nemesis.run --long --seed 7     # long: ten of each kind (~10 min)

Needs root and nftables (the cuts are nft rules). Exits 0 when the history is safe and
the cluster recovered from every fault within the generous bound; otherwise 1, after
printing the seed, the command that replays the schedule, and where the agents' logs
and the history (JSON) were kept. The schedule (kinds, targets, durations) follows from
the seed; the timing of a real cluster does not, so a replay runs the same faults, not
the same interleaving.

Everything it starts is stopped, and its nftables table deleted, on every way out:
`finally`, `atexit`, and SIGTERM turned into an exit.
"""

from __future__ import annotations

import argparse
import atexit
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import httpx

from tests.nemesis.checker import Verdict, check
from tests.nemesis.cluster import CLIENTS, SERVERS, NemesisCluster, NotRecovered
from tests.nftables import Firewall, nft_unavailable
from tests.nemesis.faults import KINDS, Nemesis, schedule
from tests.nemesis.history import Call, FinalState, History
from tests.nemesis.report import report
from tests.nemesis.workload import Workload

CONVERGE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RunConfig:
    seed: int
    rounds: int  # faults of each kind
    hold_s: tuple[float, float]
    workers: int = 4
    settle_timeout_s: float = 90.0  # the only liveness assertion: recovery at all
    long: bool = False
    kinds: tuple[str, ...] = KINDS  # the fault kinds to inject (--kinds)

    @staticmethod
    def short(seed: int) -> RunConfig:
        return RunConfig(seed=seed, rounds=1, hold_s=(2.0, 3.0))

    @staticmethod
    def long_run(seed: int) -> RunConfig:
        return RunConfig(seed=seed, rounds=10, hold_s=(1.5, 3.5), long=True)

    @property
    def replay(self) -> str:
        only = "" if self.kinds == KINDS else f"--kinds {','.join(self.kinds)} "
        return f"python -m tests.nemesis.run {'--long ' if self.long else ''}{only}--seed {self.seed}"


@dataclass
class Outcome:
    history: History
    verdict: Verdict
    failure: str | None  # why the run stopped early (no recovery), else None
    table: str

    @property
    def ok(self) -> bool:
        return self.failure is None and self.verdict.safe


def run(config: RunConfig, root: Path, say: Callable[[str], None] = print) -> Outcome:
    """One nemesis run in `root` (agents' data dirs and logs); always cleans up processes and rules."""
    rng = random.Random(config.seed)
    history = History(seed=config.seed)
    lock = threading.Lock()

    def record(call: Call) -> None:
        with lock:
            history.calls.append(call)

    cluster = NemesisCluster(root)
    firewall = Firewall()

    def cleanup() -> None:
        firewall.delete()
        cluster.close()

    atexit.register(cleanup)
    workload = Workload({n: node.url for n, node in cluster.nodes.items()}, cluster.admin_key, config.seed, record,
                        workers=config.workers)
    nemesis = Nemesis(cluster, firewall, rng, config.hold_s, history.faults, config.settle_timeout_s)
    failure = None
    started = time.monotonic()
    try:
        firewall.create()
        cluster.start()
        cluster.wait_leader(config.settle_timeout_s)
        say(f"nemesis seed {config.seed}: cluster up in {time.monotonic() - started:.1f}s, leader {cluster.leader()}")
        workload.start()
        time.sleep(2.0)
        for i, kind in enumerate(schedule(rng, config.rounds, config.kinds), 1):
            fault = nemesis.run(kind)
            say(f"  [{time.monotonic() - started:6.1f}s] {i:>3} {kind:<15} {fault.note:<28} "
                f"settled {fault.settled - fault.heal:5.2f}s after heal")
            time.sleep(rng.uniform(0.5, 1.5))
        time.sleep(2.0)
        workload.stop()
        history.final = read_final(cluster, history)
    except NotRecovered as exc:
        failure = str(exc)
    finally:
        workload.stop()
        cleanup()
        atexit.unregister(cleanup)
    verdict = check(history)
    table = report(history, verdict)
    if failure:
        table += f"\n\nDID NOT RECOVER: {failure}"
    return Outcome(history, verdict, failure, table)


def read_final(cluster: NemesisCluster, history: History) -> FinalState:
    """Wait until every server has applied the leader's commit index, then read every node's allocations."""
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    while True:
        leader = cluster.leader()
        raft = {s: ((cluster.health(s) or {}).get("raft") or {}) for s in SERVERS}
        if leader is not None:
            commit = raft[leader].get("commit_index")
            if commit is not None and all(r.get("applied_index") == commit for r in raft.values()):
                break
        if time.monotonic() > deadline:
            raise NotRecovered(f"servers did not converge within {CONVERGE_TIMEOUT_S:g}s: {raft}")
        time.sleep(0.2)
    allocations: dict[str, list[dict[str, Any]]] = {}
    for name, node in cluster.nodes.items():
        path = "/gpu/list?stale=true" if name in SERVERS else "/gpu/list"
        try:
            resp = cluster.http.get(node.url + path, timeout=10.0)
        except httpx.HTTPError:
            continue
        if resp.status_code == 200:
            allocations[name] = resp.json()["allocations"]
    asked = sorted({c.request_id for c in history.calls if c.status == 503 and c.code == "no_leader"})
    requests: dict[str, dict[str, Any]] = {}
    for request_id in asked:
        try:
            resp = cluster.http.get(f"{cluster.nodes[leader].url}/gpu/requests/{request_id}?stale=true", timeout=5.0)
        except httpx.HTTPError:
            continue
        if resp.status_code == 200:
            requests[request_id] = resp.json()
    return FinalState(servers=SERVERS, clients=CLIENTS, allocations=allocations, requests=requests, end=time.time())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nemesis.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="ten faults of each kind instead of one")
    parser.add_argument("--seed", type=int, default=None, help="the schedule's seed (default: a random one, printed)")
    parser.add_argument("--dir", type=Path, default=None, help="where the agents' data and logs go (default: a temp dir)")
    parser.add_argument("--kinds", default=None,
                        help=f"comma-separated fault kinds to inject (default: all of {', '.join(KINDS)})")
    parser.add_argument("--keep", action="store_true", help="keep the directory even when the run passes")
    args = parser.parse_args(argv)
    why = nft_unavailable()
    if why:
        print(f"cannot run the nemesis: {why}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    config = RunConfig.long_run(seed) if args.long else RunConfig.short(seed)
    if args.kinds:
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            parser.error(f"unknown fault kind(s) {unknown}; known: {', '.join(KINDS)}")
        config = replace(config, kinds=kinds)
    root = args.dir or Path(tempfile.mkdtemp(prefix=f"nemesis-{seed}-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` cleans up
    started = time.monotonic()
    outcome = run(config, root)
    print()
    print(outcome.table)
    print(f"\nwall time {time.monotonic() - started:.0f}s")
    (root / "history.json").write_text(outcome.history.dump())
    if not outcome.ok:
        print(f"\nFAILED (seed {seed}); replay: {config.replay}\nlogs and history.json kept in {root}")
        return 1
    if not args.keep and args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
