"""Whole SWIM clusters in one process on a seeded, faulty network (tests/sim/swim_network.py).

Each test states the property it checks. A failure prints the seed and the
command that reproduces it; `SWIM_SIM_SEED=<n>` reruns any test with another seed.
"""

from __future__ import annotations

import os

import pytest

from coordinator.swim_config import SwimConfig, lan, memberlist_lan
from tests.sim.swim_network import SwimNetwork

SEED = int(os.environ.get("SWIM_SIM_SEED", "20240611"))
HERE = "tests/sim/test_swim_sim.py"


def dead_or_left_about(net: SwimNetwork, member: str) -> list[tuple[float, str]]:
    return [(t, o) for (t, o, k, m, _) in net.trace if m == member and k in ("dead", "left")]


def false_deaths(net: SwimNetwork, spared: set[str]) -> list[tuple[float, str, str]]:
    """Dead events about members that never crashed (and are not in `spared`)."""
    return [(t, o, m) for (t, o, k, m, _) in net.trace if k == "dead" and m not in spared]


@pytest.mark.parametrize("n", [5, 50])
def test_join_convergence(n: int) -> None:
    """Members joining one by one through a seed (UDP JOIN + one TCP push-pull, as the
    shell does) converge: gossip alone brings ≥ 99% of all views right within 10 s of
    the last join (SWIM dissemination is probabilistic: each member misses a broadcast
    with probability ~e^-(retransmit limit)); the shell's periodic push-pull
    (memberlist's anti-entropy) makes it 100% within one push-pull period."""
    cfg = lan()
    net = SwimNetwork(cfg, SEED, periodic_push_pull=True)
    names = [net.add_node(f"n{i:04d}").name for i in range(n)]
    for i, name in enumerate(names[1:], start=1):
        net.call_at(0.05 * i, lambda name=name: net.join(name, ["n0000"]))
    last_join = 0.05 * n

    def wrong_views() -> list[tuple[str, str]]:
        return [(o, x) for o in names for x in names if net.status(o, x) != "alive"]

    net.run_until(last_join + 10.0)
    assert len(wrong_views()) <= 0.01 * n * n, f"{wrong_views()[:5]}; {net.repro(HERE)}"
    net.run_until(last_join + 10.0 + cfg.push_pull_interval * cfg.push_pull_scale(n))
    assert not wrong_views(), f"{wrong_views()[:5]}; {net.repro(HERE)}"


@pytest.mark.parametrize("n", [5, 50, 200])
def test_crash_is_detected_by_every_live_member_within_the_bound(n: int) -> None:
    """SWIM's completeness: a crashed member is declared dead by every live member within
    SwimConfig.detection_bound(N) (first probe + failed probe + max suspicion + gossip)."""
    cfg = lan()
    net = SwimNetwork(cfg, SEED)
    names = net.bootstrap(n)
    net.run_until(3.0)
    victim = names[n // 3]
    net.crash(victim)
    bound = cfg.detection_bound(n)
    net.run_until(3.0 + bound)
    deaths = {o: t for t, o in reversed(dead_or_left_about(net, victim))}
    missing = sorted(set(names) - {victim} - set(deaths))
    assert not missing, f"{len(missing)} members never declared {victim} dead within {bound:.1f}s; {net.repro(HERE)}"
    assert not false_deaths(net, {victim}), f"false positives: {false_deaths(net, {victim})[:5]}; {net.repro(HERE)}"


def test_no_false_positives_at_ten_percent_loss() -> None:
    """Lifeguard's claim, and ours: with 10% packet loss on every link (and 2% duplication)
    no live member is ever declared dead - suspicions happen, refutations win."""
    net = SwimNetwork(lan(), SEED, loss=0.10, duplicate=0.02)
    names = net.bootstrap(30)
    net.run_until(90.0)
    assert not false_deaths(net, set()), f"{false_deaths(net, set())[:5]}; {net.repro(HERE)}"
    assert all(net.status(o, x) in ("alive", "suspect") for o in names for x in names), net.repro(HERE)


def test_no_false_positives_with_a_member_paused_five_seconds() -> None:
    """Lifeguard: a member frozen for 5 s (GC pause, SIGSTOP) wakes up to expired timers.
    Its probes time out before it reads its backlog; it must not get any *other* member
    declared dead, and it is alive everywhere again soon after it resumes."""
    net = SwimNetwork(lan(), SEED, loss=0.01)
    names = net.bootstrap(20)
    net.run_until(5.0)
    sleeper = names[7]
    net.pause(sleeper, 5.0)
    net.run_until(40.0)
    assert not false_deaths(net, {sleeper}), f"{false_deaths(net, {sleeper})[:5]}; {net.repro(HERE)}"
    assert all(net.status(o, x) == "alive" for o in names for x in names), net.repro(HERE)


def test_refutation_after_a_partition_heals() -> None:
    """After a two-way partition long enough for each side to declare members of the other
    dead, healing it (within gossip_to_the_dead_time) brings every member back to alive
    on every side: the dead hear a stale-verdict correction and refute it with a higher
    incarnation."""
    cfg = lan()
    net = SwimNetwork(cfg, SEED, loss=0.01)
    names = net.bootstrap(20)
    net.run_until(2.0)
    net.partition(names[:8], names[8:])
    net.run_until(25.0)
    declared = [(o, x) for o in names[:8] for x in names[8:] if net.status(o, x) == "dead"]
    assert len(declared) > 8 * 12 // 2, f"only {len(declared)} verdicts; {net.repro(HERE)}"
    net.heal()
    net.run_until(35.0)
    stale = [(o, x) for o in names for x in names if net.status(o, x) != "alive"]
    assert not stale, f"{len(stale)} stale views, e.g. {stale[:3]}; {net.repro(HERE)}"
    assert sum(net.nodes[x].core.stats.refutations for x in names) > 0, net.repro(HERE)


def test_a_member_restarted_after_leaving_is_readmitted_without_a_seed() -> None:
    """A member that left gracefully and restarts with no seed to join (the cluster's own
    seed, say) is not stranded: within gossip_to_the_dead_time the others tell it their
    "left" verdict, it refutes, and every member lists it alive again. (memberlist never
    gossips to left members; our correct_stale_senders profiles do.)"""
    net = SwimNetwork(lan(), SEED)
    names = net.bootstrap(5)
    net.run_until(5.0)
    seed_member = names[0]
    net.nodes[seed_member].core.leave(net.now)
    net.run_until(net.now + 2.0)
    net.crash(seed_member)
    net.run_until(net.now + 10.0)
    assert all(net.status(o, seed_member) == "left" for o in names[1:]), net.repro(HERE)
    net.restart(seed_member, [])
    net.run_until(net.now + lan().gossip_to_the_dead_time - 12.0)
    stale = [o for o in names[1:] if net.status(o, seed_member) != "alive"]
    assert not stale, f"{stale} still do not list it alive; {net.repro(HERE)}"


def test_one_way_partition_does_not_kill_the_member_that_can_still_talk() -> None:
    """An asymmetric cut (a cannot hear b) is bridged by indirect probes through others:
    nobody is declared dead."""
    net = SwimNetwork(lan(), SEED)
    names = net.bootstrap(8)
    net.partition([names[1]], [names[0]], one_way=True)
    net.run_until(60.0)
    assert not false_deaths(net, set()), f"{false_deaths(net, set())[:5]}; {net.repro(HERE)}"


@pytest.mark.parametrize("cfg", [lan(), memberlist_lan()], ids=["lan", "memberlist"])
def test_same_seed_same_trace(cfg: SwimConfig) -> None:
    """Determinism: the same seed gives the same event trace, bit for bit (hashed)."""

    def run(seed: int) -> str:
        net = SwimNetwork(cfg, seed, loss=0.05, duplicate=0.01)
        names = net.bootstrap(12)
        net.run_until(2.0)
        net.crash(names[3])
        net.pause(names[5], 3.0)
        net.run_until(30.0)
        net.restart(names[3], [names[0]])
        net.run_until(40.0)
        assert net.trace
        return net.trace_digest()

    assert run(SEED) == run(SEED), f"nondeterminism; {SwimNetwork(cfg, SEED).repro(HERE)}"
    assert run(SEED) != run(SEED + 1)
