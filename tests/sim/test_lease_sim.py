"""The lease layer in whole Raft clusters on a seeded, hostile world (tests/sim/lease_cluster.py).

Each chaos run puts real LeaseTables behind real Raft cores, a lease service
(Admission) on every ready leader, and clients that allocate, renew, release and
retry through any server, while the world partitions, cuts, loses, duplicates,
reorders, crashes, restarts and slows disks. LeaseCluster checks the lease
invariants after every event; settle() checks the end state. A failure names its
seed and the command that reruns exactly that run. `LEASE_SIM_SEEDS=2000` runs
more seeds per test; `LEASE_SIM_SEED=<n>` runs just seed n.

The scenario tests below pin single behaviours on one seed each.
"""

from __future__ import annotations

import os
import random
from typing import Callable

import pytest

from coordinator.commands import Allocate
from coordinator.raft import Role
from coordinator.raft_config import local
from tests.sim.lease_cluster import Call, LeaseCluster, LeaseViolation, workload
from tests.sim.raft_cluster import SafetyViolation, random_fault

HERE = "tests/sim/test_lease_sim.py"
SEEDS = int(os.environ.get("LEASE_SIM_SEEDS", "20"))
ONE_SEED = os.environ.get("LEASE_SIM_SEED")
CONFIG = local()


def seeds(offset: int) -> list[int]:
    if ONE_SEED is not None:
        return [int(ONE_SEED)]
    return list(range(offset, offset + SEEDS))


def run_seeds(test: str, offset: int, body: Callable[[int], LeaseCluster], only: list[int] | None = None) -> None:
    """Run every seed; report the first failure in full, with how many failed of how many."""
    failed: list[tuple[int, AssertionError]] = []
    ran = seeds(offset) if only is None else only
    for seed in ran:
        try:
            body(seed)
        except AssertionError as exc:
            failed.append((seed, exc))
    if failed:
        seed, exc = failed[0]
        raise AssertionError(
            f"seed {seed} failed: {exc}\nreproduce: LEASE_SIM_SEED={seed} python -m pytest -q {HERE} -k {test}\n"
            f"{len(failed)} of {len(ran)} seeds failed: {[s for s, _ in failed][:50]}"
        ) from exc


def chaos(seed: int, n: int, *, horizon: float = 120.0, ready_gate: bool = True) -> LeaseCluster:
    """One random run: the lease workload plus a random fault schedule, then settle()."""
    rng = random.Random(seed)
    cluster = LeaseCluster(
        seed,
        n,
        CONFIG,
        hosts=rng.choice([2, 3, 4]),
        gpus_per_host=rng.choice([2, 4]),
        loss=rng.choice([0.0, 0.02, 0.1, 0.25]),
        duplicate=rng.choice([0.0, 0.05, 0.2]),
        delay=(0.02, rng.choice([0.3, 1.0, 3.0])),
        ready_gate=ready_gate,
    )
    for node in cluster.raft.nodes.values():
        if rng.random() < 0.3:
            node.slow_disk = rng.uniform(0.2, 3.0)
    workload(cluster, rng, horizon)

    def fault() -> None:
        if cluster.now >= horizon:
            return
        random_fault(cluster.raft, rng)
        cluster.later(rng.uniform(3.0, 25.0), fault)

    cluster.later(rng.uniform(10.0, 30.0), fault)
    try:
        cluster.run_until(horizon)
        cluster.settle()
    except AssertionError as exc:
        trace = "\n  ".join(cluster.raft.trace)
        raise AssertionError(f"{exc}\nlast events:\n  {trace}") from exc
    return cluster


def test_lease_chaos_three_servers() -> None:
    """Under loss, duplication, reordering, partitions, crashes, slow disks and leader changes
    (3 voters): no GPU under two leases, one allocation per request id, no acknowledged lease
    lost, only documented answers; the healed cluster serves again."""
    run_seeds("lease_chaos_three", 0, lambda seed: chaos(seed, 3))


def test_lease_chaos_five_servers() -> None:
    """The same properties with 5 voters (two can fail at once)."""
    run_seeds("lease_chaos_five", 100_000, lambda seed: chaos(seed, 5))
