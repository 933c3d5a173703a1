"""Whole Raft clusters in one process on a seeded, hostile world (tests/sim/raft_cluster.py).

The chaos tests run many short seeded runs; the checker in RaftCluster asserts
Raft's safety properties after every event, and `settle()` asserts that every
acknowledged proposal survived. A failure names its seed and the one command
that reruns exactly that run. `RAFT_SIM_SEEDS=5000` runs more seeds per test;
`RAFT_SIM_SEED=<n>` runs just seed n.

The scenario tests below pin single behaviours (leader isolation, a rejoining
node, snapshot catch-up, leadership transfer) on one seed each.
"""

from __future__ import annotations

import os
import random
from collections import deque
from typing import Callable

import pytest

from coordinator.raft import RaftCore, Role
from coordinator.raft_config import RaftConfig, local
from tests.sim.raft_cluster import RaftCluster, SafetyViolation, random_fault

HERE = "tests/sim/test_raft_sim.py"
SEEDS = int(os.environ.get("RAFT_SIM_SEEDS", "100"))
ONE_SEED = os.environ.get("RAFT_SIM_SEED")
CONFIG = local()


def seeds(offset: int) -> list[int]:
    if ONE_SEED is not None:
        return [int(ONE_SEED)]
    return list(range(offset, offset + SEEDS))


def run_seeds(test: str, offset: int, body: Callable[[int], RaftCluster], only: list[int] | None = None) -> None:
    for seed in seeds(offset) if only is None else only:
        try:
            body(seed)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed} failed: {exc}\nreproduce: RAFT_SIM_SEED={seed} python -m pytest -q {HERE} -k {test}") from exc


def chaos(seed: int, n: int, *, membership: bool = False, horizon: float = 120.0) -> RaftCluster:
    """One random run: client traffic plus a random fault schedule, then settle()."""
    rng = random.Random(seed)
    cluster = RaftCluster(
        seed,
        n,
        CONFIG,
        loss=rng.choice([0.0, 0.02, 0.1, 0.25]),
        duplicate=rng.choice([0.0, 0.05, 0.2]),
        delay=(0.02, rng.choice([0.3, 1.0, 3.0])),  # a 3-tick spread reorders heavily
    )
    for node in cluster.nodes.values():
        if rng.random() < 0.3:
            node.slow_disk = rng.uniform(0.2, 3.0)
    counter = iter(range(1_000_000))

    def client() -> None:
        if cluster.now >= horizon:
            return  # settle() takes over
        cluster.propose(b"k%d=%d/%d" % (rng.randrange(8), seed, next(counter)))
        if rng.random() < 0.1:
            cluster.read(b"read-%d" % next(counter))
        if cluster.now < horizon:
            cluster.at(cluster.now + rng.uniform(0.2, 1.5), client)

    def fault() -> None:
        if cluster.now >= horizon:
            return
        random_fault(cluster, rng)
        if cluster.now < horizon:
            cluster.at(cluster.now + rng.uniform(3.0, 25.0), fault)

    plan: deque[tuple[str, str]] = deque()
    if membership:
        plan.extend([("remove", ""), ("add", "x0"), ("remove", ""), ("add", "x1")])
    target: list[str] = []

    def reconfigure() -> None:
        if not plan:
            return
        op, new = plan[0]
        voters = cluster.committed_voters()
        if op == "remove":
            if not target:
                target.append(rng.choice(voters))
            if target[0] not in voters:
                cluster.retire(target.pop())
                plan.popleft()
            else:
                victim = target[0]
                cluster.change(lambda core, _: core.remove_voter(victim))
        else:
            if new not in cluster.nodes:
                cluster.add_blank_node(new)
            if new in voters:
                plan.popleft()
            else:
                cluster.change(lambda core, _: core.add_voter(new))
        cluster.at(cluster.now + 3.0, reconfigure)

    cluster.at(1.0, client)
    cluster.at(rng.uniform(10.0, 30.0), fault)
    if membership:
        cluster.at(20.0, reconfigure)
    try:
        cluster.run_until(horizon)
        cluster.settle()
    except AssertionError as exc:
        trace = "\n  ".join(cluster.trace)
        raise AssertionError(f"{exc}\nlast events:\n  {trace}") from exc
    if membership and plan:
        # Reconfiguration may stall under faults, but settle() heals the world; it must finish.
        cluster.at(cluster.now, reconfigure)
        cluster.run_until(cluster.now + 100.0)
        assert not plan, f"membership plan stuck at {plan[0]} with voters {cluster.committed_voters()}"
        cluster.settle()
    return cluster


def test_chaos_three_servers() -> None:
    """§5.2–5.4 under loss, duplication, reordering, partitions, crashes and slow disks
    (3 voters): election safety, leader append-only, log matching, leader completeness,
    state-machine safety after every event; no acknowledged proposal lost; progress after healing."""
    run_seeds("chaos_three", 0, lambda seed: chaos(seed, 3))


def test_chaos_five_servers() -> None:
    """The same properties with 5 voters (two can fail at once)."""
    run_seeds("chaos_five", 100_000, lambda seed: chaos(seed, 5))


def test_chaos_with_membership_changes() -> None:
    """Thesis §4.1: single-server changes (remove a voter, add a blank server, twice) under
    the same chaos keep every safety property, and each change completes once healed."""
    run_seeds("membership", 200_000, lambda seed: chaos(seed, 3 + (seed % 2) * 2, membership=True))


# --- scenarios -------------------------------------------------------------------------------


def _stable(seed: int = 1, n: int = 3, config: RaftConfig = CONFIG) -> RaftCluster:
    cluster = RaftCluster(seed, n, config)
    cluster.run_until(40.0)
    assert cluster.leader() is not None, "no leader on a healthy network"
    return cluster


def test_isolated_leader_steps_down_and_majority_elects() -> None:
    """Check-quorum (thesis §6.2): a leader cut off from the majority steps down within
    election_ticks (+ one round); the majority elects a new leader of a higher term."""
    cluster = _stable()
    old = cluster.leader()
    assert old is not None and old.core is not None
    term = old.core.term
    cluster.partition({old.id}, set(cluster.nodes) - {old.id})
    cluster.run_until(cluster.now + 2 * CONFIG.election_ticks + 2)
    assert old.core.role is not Role.LEADER
    new = cluster.leader()
    assert new is not None and new.id != old.id and new.core is not None and new.core.term > term
    cluster.heal()
    cluster.run_until(cluster.now + 20)
    assert old.core.lead == new.id  # it rejoins as a follower
    cluster.settle()


@pytest.mark.parametrize("pre_vote", [True, False])
def test_rejoining_node_does_not_disrupt_with_pre_vote(pre_vote: bool) -> None:
    """Pre-vote (thesis §9.6): a follower partitioned away for many election timeouts does
    not raise its term, so on rejoining it does not depose the leader. Without pre-vote it
    does (its term ran ahead) - the contrast shows the test can fail."""
    cluster = _stable(config=CONFIG.replace(pre_vote=pre_vote))
    leader = cluster.leader()
    assert leader is not None and leader.core is not None
    term = leader.core.term
    loner = next(v for v in cluster.nodes if v != leader.id)
    cluster.partition({loner}, set(cluster.nodes) - {loner})
    cluster.run_until(cluster.now + 10 * CONFIG.election_ticks)
    cluster.heal()
    cluster.run_until(cluster.now + 3 * CONFIG.election_ticks)
    undisturbed = cluster.leader() is leader and leader.core.term == term
    assert undisturbed == pre_vote


def test_restarted_follower_catches_up_by_snapshot() -> None:
    """§7: a follower that was down while the leader compacted its log gets InstallSnapshot
    and ends with the same state machine."""
    cluster = _stable()
    leader = cluster.leader()
    assert leader is not None
    follower = next(v for v in cluster.nodes if v != leader.id)
    cluster.crash(follower)
    for i in range(80):
        cluster.propose(b"k=%d" % i)
        cluster.run_until(cluster.now + 0.5)
    cluster.restart(follower)
    before = cluster.stats["snapshots_installed"]
    cluster.settle()
    assert cluster.stats["snapshots_installed"] > before
    assert cluster.nodes[follower].machine.state() == leader.machine.state()


def test_leadership_transfer_hands_over_without_losing_writes() -> None:
    """Thesis §3.10: transfer_leadership makes the target leader within an election timeout
    (TimeoutNow overrides the followers' lease); nothing acknowledged is lost."""
    cluster = _stable()
    leader = cluster.leader()
    assert leader is not None
    for i in range(10):
        cluster.propose(b"k=%d" % i)
    cluster.run_until(cluster.now + 3)
    target = next(v for v in cluster.nodes if v != leader.id)

    def transfer(core: RaftCore, _: object) -> None:
        core.transfer_leadership(target)

    assert cluster.change(transfer)
    cluster.run_until(cluster.now + CONFIG.election_ticks)
    new = cluster.leader()
    assert new is not None and new.id == target
    cluster.settle()


def test_a_failing_run_is_reported_with_its_seed() -> None:
    """The harness itself: a violation names the seed and the one command that reruns it."""

    def broken(seed: int) -> RaftCluster:
        raise SafetyViolation("injected")

    with pytest.raises(AssertionError, match=r"seed 7 failed: injected\nreproduce: RAFT_SIM_SEED=7 python -m pytest -q \S+ -k demo"):
        run_seeds("demo", 0, broken, only=[7])


def test_a_seed_reproduces_its_run() -> None:
    """Determinism: the same seed gives the same run (events, acknowledgements, elections)."""
    a, b = chaos(5, 3), chaos(5, 3)
    assert (a.stats, a.acked, a.leaders, list(a.trace)) == (b.stats, b.acked, b.leaders, list(b.trace))
