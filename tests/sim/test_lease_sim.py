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
from dataclasses import replace
from typing import Callable

import pytest

from coordinator.commands import Allocate
from coordinator.model import MIG_ANY, Requirements
from coordinator.queues import QueuePolicy, QueueSpec
from coordinator.raft import Role
from coordinator.raft_config import local
from tests.sim import lease_cluster
from tests.sim.lease_cluster import Answer, Call, LeaseCluster, LeaseViolation
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
        seed, first = failed[0]
        raise AssertionError(
            f"seed {seed} failed: {first}\nreproduce: LEASE_SIM_SEED={seed} python -m pytest -q {HERE} -k {test}\n"
            f"{len(failed)} of {len(ran)} seeds failed: {[s for s, _ in failed][:50]}"
        ) from first


def chaos(
    seed: int,
    n: int,
    *,
    horizon: float = 120.0,
    ready_gate: bool = True,
    queues: QueuePolicy | None = None,
    gangs: float = 0.0,
    mig: bool = False,
    shares: float = 0.0,
) -> LeaseCluster:
    """One random run: the lease workload plus a random fault schedule, then settle().

    With `mig`, one or two hosts have their GPUs in MIG mode and a third of the
    allocates ask for a slice (a named profile, "auto" with some memory, or a
    profile no GPU has).
    """
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
        queue_policy=queues,
        mig_hosts=rng.choice([1, 2]) if mig else 0,
    )
    for node in cluster.raft.nodes.values():
        if rng.random() < 0.3:
            node.slow_disk = rng.uniform(0.2, 3.0)
    workload(cluster, rng, horizon, gangs, shares)

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


def workload(
    cluster: LeaseCluster, rng: random.Random, horizon: float, gangs: float = 0.0, shares: float = 0.0
) -> None:
    """Random clients until `horizon`: allocates (some queue=false, some too big to ever fit,
    a few reusing another service's request id; a `gangs` share of them gangs over several
    hosts, a few over more hosts than there are), and follow-ups: renew and release what was
    granted, poll or cancel what was queued, retry with a used id. Plus operators draining
    GPUs and marking hosts lost."""
    services = ["train", "infer", "batch"]
    per_host = max(sum(1 for v in cluster.views if v.node == cluster.views[0].node), 1)
    hosts = len({v.node for v in cluster.views})
    has_mig = any(v.mig_profile is not None for v in cluster.views)

    def allocate() -> None:
        if cluster.now >= horizon:
            return
        nodes = 1
        if rng.random() < gangs:
            nodes = rng.choice([2, 2, hosts, hosts + 1])
            gpus = rng.choice([1, per_host])
        else:
            gpus = min(rng.choice([1, 1, 1, 2, 2, 3]), per_host) if rng.random() > 0.03 else per_host + 1
        service = rng.choice(services)
        mig_profile, memory_mb = None, 1024
        if has_mig and rng.random() < 0.35:
            gpus, nodes = 1, 1  # a slice is one unit on one node
            mig_profile = rng.choice(["1g.10gb", "1g.10gb", "3g.40gb", "7g.80gb", MIG_ANY, MIG_ANY, "4g.40gb"])
            memory_mb = rng.choice([0, 8000, 15000, 30000]) if mig_profile == MIG_ANY else 0
        share_mb = None
        if not has_mig and rng.random() < shares:
            # A share of one GPU: budgets from a sliver to more than any GPU has (never fits).
            gpus, nodes = 1, 1
            share_mb = memory_mb = rng.choice([1000, 5000, 10000, 20000, 40000, 70000, 10**7])
        request_id = cluster.new_request_id()
        if cluster.calls and rng.random() < 0.03:
            # Another service's id: 409 request_id_conflict once any server recorded it.
            earlier = rng.choice(cluster.calls)
            if earlier.op == "allocate" and earlier.service != service:
                request_id = earlier.request_id
        cluster.call(
            Call(
                "allocate",
                service,
                request_id=request_id,
                gpus=gpus,
                queue=rng.random() < 0.7,
                ttl_s=rng.uniform(1.0, 4.0),
                priority=rng.randrange(1, 11),
                nodes=nodes,
                min_memory_mb=memory_mb,
                mig_profile=mig_profile,
                share_mb=share_mb,
            )
        )
        cluster.later(rng.uniform(0.5, 3.0), allocate)

    def follow_up(call: Call, answer: Answer) -> None:
        if cluster.now >= horizon:
            return
        if call.op == "allocate" and answer.status == 200:
            assert answer.allocation is not None
            aid = lease_cluster.lease_id(answer.allocation)
            roll = rng.random()
            if roll < 0.35:
                renew = Call("renew", call.service, request_id=call.request_id, allocation_id=aid, ttl_s=rng.uniform(1.0, 5.0))
                cluster.call_later(rng.uniform(2.0, 30.0), renew)
            if roll < 0.6:
                by_request = rng.random() < 0.3
                release = Call(
                    "release",
                    call.service,
                    request_id=call.request_id if by_request else "",
                    allocation_id="" if by_request else aid,
                )
                cluster.call_later(rng.uniform(5.0, 50.0), release)
            elif roll < 0.7:
                again = replace(call, attempts=0, finished=False, answers=[])
                cluster.call_later(rng.uniform(1.0, 60.0), again)
        elif call.op == "allocate" and answer.status == 202:
            if rng.random() < 0.3:
                cancel = Call("release", call.service, request_id=call.request_id)
                cluster.call_later(rng.uniform(2.0, 20.0), cancel)
            else:
                poll = replace(call, attempts=0, finished=False, answers=[])
                cluster.call_later(rng.uniform(5.0, 30.0), poll)

    def operator() -> None:
        if cluster.now >= horizon:
            return
        cluster.operator("drain" if rng.random() < 0.8 else "host_lost")
        cluster.later(rng.uniform(5.0, 30.0), operator)

    cluster.on_finished = follow_up
    cluster.later(1.0, allocate)
    cluster.later(rng.uniform(5.0, 20.0), operator)


def test_lease_chaos_three_servers() -> None:
    """Under loss, duplication, reordering, partitions, crashes, slow disks and leader changes
    (3 voters): no GPU under two leases, one allocation per request id, no acknowledged lease
    lost, only documented answers; the healed cluster serves again."""
    run_seeds("lease_chaos_three", 0, lambda seed: chaos(seed, 3))


# Two teams with guarantees and caps, a third service in the default queue, short
# grace periods: borrowing, reclaim and priority preemption happen in every run.
SHARED = QueuePolicy.of(
    [
        QueueSpec("research", guaranteed_gpus=2, max_gpus=6, weight=1.0, preemption_grace_s=1.5, services=("train",)),
        QueueSpec("prod", guaranteed_gpus=2, weight=2.0, preemption_grace_s=0.5, services=("infer",)),
    ],
    preemption_priority_gap=4,
)


def test_lease_chaos_with_gangs() -> None:
    """A fifth of the requests are gangs over 2 or all hosts (some over more than there are),
    under the same faults, host losses included: besides every lease invariant, every gang is
    whole or absent on every server after every event, and ends whole."""
    run_seeds("lease_chaos_with_gangs", 300_000, lambda seed: chaos(seed, 3, gangs=0.2))


def test_lease_chaos_with_gangs_and_queues() -> None:
    """Gangs with queues: quotas count all of a gang's GPUs, and a preempted gang member takes its
    whole gang, with one deadline."""
    run_seeds("lease_chaos_with_gangs_and_queues", 400_000, lambda seed: chaos(seed, 3, queues=SHARED, gangs=0.2))


def test_lease_chaos_with_queues() -> None:
    """With queues, under the same faults: besides every lease invariant, no queue above its cap,
    no reclaim below a queue's guarantee, no non-preemptible lease preempted, and every preempted
    lease ends once, at or after the one deadline every server agrees on."""

    def body(seed: int) -> LeaseCluster:
        cluster = chaos(seed, 3, queues=SHARED)
        assert cluster.table(cluster.raft.up()[0].id).queue_policy == SHARED
        return cluster

    run_seeds("lease_chaos_with_queues", 200_000, body)


def test_lease_chaos_with_mig() -> None:
    """With hosts whose GPUs are split into MIG slices and clients asking for slices, under the
    same faults: besides every lease invariant, no MIG instance in two leases, no GPU leased whole
    and in slices at once, every slice of the profile asked for, and no slice under a whole-GPU lease.
    Every other seed runs with the queues of test_lease_chaos_with_queues, so slices are preempted too."""

    run_seeds("lease_chaos_with_mig", 300_000, lambda seed: chaos(seed, 3, mig=True, queues=SHARED if seed % 2 else None))


def test_the_mig_checker_catches_a_slice_under_a_whole_gpu_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the MIG invariants can fail: placement that ignores the kind of unit is caught."""
    monkeypatch.setattr(Requirements, "matches_unit", lambda self, mig_profile: True)
    with pytest.raises(AssertionError, match="holds whole GPU|asked .* and holds|slice"):
        run_seeds("lease_chaos_with_mig", 300_000, lambda seed: chaos(seed, 3, mig=True), only=[300_000, 300_001])


# Shares beside whole GPUs: a capped queue that allows cross-queue shares, one that keeps its
# shares to itself, and the default queue (its own group) for the third service.
SHARING = QueuePolicy.of(
    [
        QueueSpec("research", guaranteed_gpus=1, max_gpus=2, preemption_grace_s=1.5, services=("train",), cross_queue_shares=True),
        QueueSpec("prod", guaranteed_gpus=1, max_gpus=3, preemption_grace_s=0.5, services=("infer",)),
        QueueSpec("default", cross_queue_shares=True),
    ],
    preemption_priority_gap=4,
)


def test_lease_chaos_with_shares() -> None:
    """Half the requests are shares of a GPU, under the same faults: besides every lease
    invariant, no GPU memory oversubscribed by shares, no GPU shared across groups or leased
    whole beside shares, and no queue above its cap counting a shared GPU once per queue.
    Every other seed runs with queues (caps and cross-queue groups), the rest without."""
    run_seeds(
        "lease_chaos_with_shares",
        500_000,
        lambda seed: chaos(seed, 3, shares=0.5, queues=SHARING if seed % 2 else None),
    )


def test_the_share_checker_catches_oversubscription(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the share invariants can fail: a table that lets any share onto its GPU is caught."""
    from coordinator.share_placement import ShareIndex

    monkeypatch.setattr(ShareIndex, "check", lambda self, alloc: None)
    monkeypatch.setattr(ShareIndex, "fits", lambda self, group, budget: iter(sorted(self.gpus)))
    with pytest.raises(AssertionError, match="oversubscribed|shared by groups"):
        run_seeds("lease_chaos_with_shares", 500_000, lambda seed: chaos(seed, 3, shares=0.5), only=[500_000, 500_001])


def test_lease_chaos_five_servers() -> None:
    """The same properties with 5 voters (two can fail at once)."""
    run_seeds("lease_chaos_five", 100_000, lambda seed: chaos(seed, 5))


# --- scenarios -------------------------------------------------------------------------------


def _stable(seed: int = 1, *, ready_gate: bool = True) -> tuple[LeaseCluster, str]:
    """A healthy 3-server cluster with a ready leader (returned with it)."""
    cluster = LeaseCluster(seed, 3, CONFIG, ready_gate=ready_gate)
    cluster.run_until(40.0)
    leader = cluster.raft.leader()
    assert leader is not None and leader.core is not None and leader.core.leader_ready
    return cluster, leader.id


def _step_until(cluster: LeaseCluster, done: Callable[[], bool], ticks: float = 100.0) -> None:
    """Advance in steps shorter than any message delay until `done()`."""
    deadline = cluster.now + ticks
    while not done():
        assert cluster.now < deadline, "the awaited moment never came"
        cluster.run_until(cluster.now + 0.01)


def test_leader_isolated_mid_allocate_client_gets_exactly_one_allocation() -> None:
    """The leader proposes an Allocate and is cut off before it commits. Its client hears a
    503 (never a made-up answer), retries the same request id through the majority, and gets
    one allocation; once healed, the old leader's entry is overwritten, not applied."""
    cluster, old = _stable()
    call = cluster.call(Call("allocate", "train", request_id="iso-1", gpus=2), first=old)

    def proposed() -> bool:
        return any(
            p.node == old and isinstance(p.command, Allocate) and p.command.allocation.request.request_id == "iso-1"
            for p in cluster.inflight.values()
        )

    _step_until(cluster, proposed)
    lost = next(p.command for p in cluster.inflight.values() if p.node == old)
    assert isinstance(lost, Allocate)
    cluster.raft.partition({old}, set(cluster.raft.nodes) - {old})
    _step_until(cluster, lambda: call.finished, ticks=200.0)

    assert [(a.server == old, a.status) for a in call.answers][0] == (True, 503)
    assert call.answers[-1].status == 200 and call.answers[-1].server != old
    granted = call.answers[-1].allocation
    assert granted is not None and granted.allocation_id != lost.allocation.allocation_id
    cluster.settle()
    assert cluster.allocated["iso-1"] == granted.allocation_id  # the only allocation ever applied
    for node_id in cluster.raft.nodes:
        record = cluster.table(node_id).record("iso-1")
        assert record is not None and record.allocation_id == granted.allocation_id


@pytest.mark.parametrize("ready_gate", [True, False])
def test_new_leader_does_not_answer_from_a_table_missing_committed_entries(ready_gate: bool) -> None:
    """An allocation is committed and acknowledged, then its leader is cut off before the
    followers learn the commit index: their tables lack it. The client's retry reaches the
    new leader before its NOOP commits. It waits for leader_ready (thesis §6.4) and answers the
    same allocation. Deciding before ready (ready_gate=False, the mutation) allocates the id
    again, and the table refuses it: the client would hear 409 duplicate_request, which the
    checker flags - the contrast shows the test can fail."""
    cluster, old = _stable(seed=2, ready_gate=ready_gate)
    first = cluster.call(Call("allocate", "train", request_id="pre-1"), first=old)
    _step_until(cluster, lambda: cluster.table(old).record("pre-1") is not None)
    cluster.raft.partition({old}, set(cluster.raft.nodes) - {old})
    followers = [v for v in cluster.raft.nodes if v != old]
    assert all(cluster.table(v).record("pre-1") is None for v in followers)  # committed, not yet known

    def new_leader() -> str | None:
        return next((v for v in followers if (c := cluster.raft.nodes[v].core) and c.role is Role.LEADER), None)

    _step_until(cluster, lambda: new_leader() is not None)
    new = new_leader()
    assert new is not None and cluster.table(new).record("pre-1") is None
    retry = Call("allocate", "train", request_id="pre-1")

    def retry_and_settle() -> None:
        cluster.call(retry, first=new, at_once=True)
        _step_until(cluster, lambda: retry.finished and first.finished)
        cluster.settle()

    if not ready_gate:
        with pytest.raises(LeaseViolation, match="duplicate_request"):
            retry_and_settle()
        return
    retry_and_settle()
    assert cluster.stats["waited_for_ready"] >= 1
    acked = first.answers[0].allocation
    assert first.answers[0].status == 200 and acked is not None
    assert [(a.status, a.server, a.allocation) for a in retry.answers] == [(200, new, acked)]


def test_outcome_unknown_keeps_the_request_id_and_gpus_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """The followers' answers to the leader are cut for a few ticks after it proposes an
    Allocate: the proposal times out and the client hears 503 outcome_unknown while the leader
    still leads. A retry with the same request id must not be decided again: the id is still
    in flight, so it waits for the entry and gets that one allocation. (A shell
    that let the id and GPUs go at the timeout would decide it twice: 409 duplicate_request.)"""
    monkeypatch.setattr(lease_cluster, "PROPOSE_TIMEOUT", 2.0)
    cluster, leader = _stable(seed=3)
    core = cluster.raft.nodes[leader].core
    assert core is not None
    term = core.term
    call = cluster.call(Call("allocate", "train", request_id="slow-1", gpus=2), first=leader)
    _step_until(cluster, lambda: any(p.node == leader for p in cluster.inflight.values()))
    for v in cluster.raft.nodes:
        if v != leader:
            cluster.raft.cut(v, leader)
    _step_until(cluster, lambda: bool(call.answers), ticks=8.0)
    assert [(a.status, a.code) for a in call.answers] == [(503, "outcome_unknown")]
    retry = cluster.call(Call("allocate", "train", request_id="slow-1", gpus=2), first=leader, at_once=True)
    assert cluster.stats["waited_for_id"] == 1 and not retry.answers  # the id is still in flight
    cluster.raft.heal()
    _step_until(cluster, lambda: retry.finished)

    assert [(a.status, a.server) for a in retry.answers] == [(200, leader)]
    granted = retry.answers[0].allocation
    assert granted is not None and cluster.allocated["slow-1"] == granted.allocation_id
    assert core.role is Role.LEADER and core.term == term  # one leader decided, once
    cluster.settle()


def test_a_failing_run_is_reported_with_its_seed() -> None:
    """The harness itself: a violation names the seed and the one command that reruns it."""

    def broken(seed: int) -> LeaseCluster:
        raise SafetyViolation("injected")

    with pytest.raises(
        AssertionError,
        match=r"seed 7 failed: injected\nreproduce: LEASE_SIM_SEED=7 python -m pytest -q \S+ -k demo\n1 of 2 seeds failed: \[7\]",
    ):
        run_seeds("demo", 0, lambda seed: broken(seed) if seed == 7 else LeaseCluster(seed, 1, CONFIG), only=[6, 7])


def test_a_seed_reproduces_its_run() -> None:
    """Determinism: the same seed gives the same run (answers, acknowledgements, tables)."""
    a, b = chaos(5, 3), chaos(5, 3)
    assert (a.stats, a.acks, a.allocated, list(a.raft.trace)) == (b.stats, b.acks, b.allocated, list(b.raft.trace))
    assert [c.answers for c in a.calls] == [c.answers for c in b.calls]
