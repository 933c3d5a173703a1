"""SwimCore scenarios, without trio: each test states the rule it checks and its source.

Sources: SWIM = Das, Gupta, Motivala, "SWIM: Scalable Weakly-consistent
Infection-style Process Group Membership Protocol" (DSN 2002); Lifeguard =
Dadgar, Phillips, Currey, "Lifeguard: Local Health Awareness for More Accurate
Failure Detection" (arXiv 1707.00788); memberlist = hashicorp/memberlist
state.go / suspicion.go / awareness.go.
"""

from __future__ import annotations

import random

import pytest

from coordinator.swim import SwimCore
from coordinator.swim_config import SwimConfig, lan, memberlist_lan
from coordinator.swim_messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MalformedPacket,
    Nack,
    Ping,
    Suspect,
    decode_packet,
    encode_header,
    encode_message,
    frame,
)
from tests.sim.swim_network import LinkRule, SwimNetwork

CFG = lan()


def core(name: str, port: int, *, cfg: SwimConfig = CFG, now: float = 0.0, meta: bytes = b"") -> SwimCore:
    return SwimCore(cfg, name, ("10.0.0.1", port), meta, random.Random(name), now)


def datagram(sender: str, *msgs: object, incarnation: int = 0) -> bytes:
    return frame(encode_header(sender, incarnation), [encode_message(m) for m in msgs])  # type: ignore[arg-type]


def sent_messages(c: SwimCore) -> list[tuple[tuple[str, int], object]]:
    out = []
    for addr, data in c.take_datagrams():
        for m in decode_packet(data, max_meta_size=4096).messages:
            out.append((addr, m))
    return out


def cluster(n: int, seed: int = 1, cfg: SwimConfig = CFG, **kw: object) -> tuple[SwimNetwork, list[str]]:
    net = SwimNetwork(cfg, seed, **kw)  # type: ignore[arg-type]
    names = net.bootstrap(n)
    return net, names


def events_about(net: SwimNetwork, member: str, kind: str) -> list[tuple[float, str]]:
    return [(t, obs) for (t, obs, k, m, _) in net.trace if m == member and k == kind]


# --- joining ---------------------------------------------------------------------------------


def test_join_through_a_seed_over_udp() -> None:
    """A member joins by contacting a seed (SWIM §5: "join" through a known member).

    b sends JOIN + its alive message to a; a learns b from the alive message and
    answers with its own alive, so both know each other without any TCP sync.
    """
    a, b = core("a", 1), core("b", 2)
    b.join([("10.0.0.1", 1)], now=0.0)
    for addr, data in b.take_datagrams():
        assert addr == ("10.0.0.1", 1)
        a.receive(data, ("10.0.0.1", 2), 0.01)
    assert [e.kind for e in a.take_events()] == ["join"]
    for addr, data in a.take_datagrams():
        b.receive(data, ("10.0.0.1", 1), 0.02)
    assert [(e.kind, e.member.name) for e in b.take_events()] == [("join", "a")]
    assert {m.name: m.status for m in a.members()} == {"a": "alive", "b": "alive"}
    assert {m.name: m.status for m in b.members()} == {"a": "alive", "b": "alive"}


def test_join_retries_until_a_seed_answers() -> None:
    """A joiner keeps contacting its seeds every probe_interval until some member answers."""
    b = core("b", 2)
    b.join([("10.0.0.1", 1)], now=0.0)
    assert len(b.take_datagrams()) == 1
    assert b.next_deadline() <= CFG.probe_interval
    b.tick(CFG.probe_interval)
    assert any(addr == ("10.0.0.1", 1) for addr, _ in b.take_datagrams())


def test_push_pull_state_merge_follows_memberlist() -> None:
    """mergeState (memberlist): remote alive → aliveNode, remote dead → only *suspect*
    locally (we may still reach it), remote left → left."""
    a, b = core("a", 1), core("b", 2)
    for name, port, status_msg in (("c", 3, None), ("d", 4, "dead"), ("e", 5, "left")):
        b.receive(datagram("x", Alive(1, name, ("10.0.0.1", port), b"")), ("10.0.0.9", 9), 0.0)
        a.receive(datagram("x", Alive(1, name, ("10.0.0.1", port), b"")), ("10.0.0.9", 9), 0.0)
        if status_msg == "dead":
            b.receive(datagram("x", Dead(1, name, "x")), ("10.0.0.9", 9), 0.0)
        elif status_msg == "left":
            b.receive(datagram("x", Dead(1, name, name)), ("10.0.0.9", 9), 0.0)
    a.take_events()
    a.merge_remote_state(b.local_state(), 1.0)
    status = {m.name: m.status for m in a.members()}
    assert status == {"a": "alive", "b": "alive", "c": "alive", "d": "suspect", "e": "left"}


def test_restart_at_incarnation_zero_refutes_its_past_life() -> None:
    """memberlist refute(): told it is dead at incarnation 5, a member restarted at 0
    gossips itself alive at 6, above the accusation, so the cluster takes it back."""
    a = core("a", 1)
    a.receive(datagram("b", Dead(5, "a", "b")), ("10.0.0.1", 2), 1.0)
    assert a.incarnation == 6
    assert a.stats.refutations == 1
    alives = [m for _, m in sent_messages_after_gossip(a) if isinstance(m, Alive) and m.name == "a"]
    assert alives and alives[0].incarnation == 6


def sent_messages_after_gossip(c: SwimCore) -> list[tuple[tuple[str, int], object]]:
    c.receive(datagram("z", Alive(1, "z", ("10.0.0.1", 26), b"")), ("10.0.0.1", 26), 1.0)
    c.tick(c.next_deadline() + 0.2)
    return sent_messages(c)


def test_restarted_member_is_taken_back_by_the_cluster() -> None:
    """A crashed member restarted with the same name (incarnation 0) rejoins: every
    member sees it alive again at a higher incarnation than its declared death."""
    net, names = cluster(5)
    net.run_until(5.0)
    net.crash("n0003")
    net.run_until(30.0)
    assert all(net.status(o, "n0003") == "dead" for o in names if o != "n0003"), net.repro(__file__)
    dead_inc = net.nodes["n0000"].core.member("n0003").incarnation  # type: ignore[union-attr]
    net.restart("n0003", ["n0000"])
    net.run_until(35.0)
    for o in names:
        view = net.nodes[o].core.member("n0003")
        assert view is not None and view.status == "alive" and view.incarnation > dead_inc, o


# --- failure detection --------------------------------------------------------------------------


def test_crashed_member_is_suspected_then_declared_dead() -> None:
    """SWIM §4: a member that answers neither direct nor indirect probes is suspected,
    and declared dead when the suspicion times out (never sooner than the minimum)."""
    net, names = cluster(4)
    net.run_until(3.0)
    net.crash("n0002")
    net.run_until(3.0 + CFG.detection_bound(4))
    suspects = events_about(net, "n0002", "suspect")
    deads = events_about(net, "n0002", "dead")
    assert suspects and len({obs for _, obs in deads}) == 3
    assert min(t for t, _ in deads) - min(t for t, _ in suspects) >= CFG.suspicion_min(4) - 1e-9


def test_indirect_probe_saves_a_member_behind_a_lossy_link() -> None:
    """SWIM §3.2 ping-req: when a→b loses every packet, a's direct probes fail but the
    k relays reach b, so a never suspects b."""
    net, names = cluster(4)
    net.set_link("n0000", "n0001", LinkRule(loss=1.0))
    net.run_until(60.0)
    assert net.nodes["n0000"].core.stats.indirect_probes > 0
    assert not events_about(net, "n0001", "suspect"), net.repro(__file__)
    assert not events_about(net, "n0000", "suspect"), net.repro(__file__)


def test_refutation_by_a_live_member_bumps_its_incarnation() -> None:
    """SWIM §4.2: a suspected member that hears the suspicion gossips alive with a higher
    incarnation; that overrides the suspicion everywhere and nobody declares it dead."""
    net, names = cluster(5)
    net.run_until(2.0)
    # n0000 (wrongly) suspects n0003 and tells everyone.
    accuser = net.nodes["n0000"].core
    accuser.receive(datagram("n0004", Suspect(0, "n0003", "n0004")), net.nodes["n0004"].address, net.now)
    net._after(net.nodes["n0000"])
    net.run_until(20.0)
    assert net.nodes["n0003"].core.incarnation >= 1
    assert net.nodes["n0003"].core.stats.refutations >= 1
    assert not events_about(net, "n0003", "dead")
    assert all(net.status(o, "n0003") == "alive" for o in names)
    assert events_about(net, "n0003", "alive")  # the suspicion was cleared with an event


def test_suspected_member_probed_with_the_accusation_piggybacked() -> None:
    """Lifeguard's buddy system (memberlist probeNode): a ping to a suspect member carries
    the suspect message, so the accused hears it directly and can refute at once."""
    a = core("a", 1)
    a.receive(datagram("b", Alive(0, "b", ("10.0.0.1", 2), b"")), ("10.0.0.1", 2), 0.0)
    a.receive(datagram("c", Suspect(0, "b", "c")), ("10.0.0.1", 3), 0.0)
    msgs: list[tuple[tuple[str, int], object]] = []
    while a.stats.probes == 0:
        a.tick(a.next_deadline())
        msgs += sent_messages(a)
    pings = [addr for addr, m in msgs if isinstance(m, Ping)]
    assert pings == [("10.0.0.1", 2)]
    assert any(isinstance(m, Suspect) and m.name == "b" for addr, m in msgs if addr == ("10.0.0.1", 2))


def test_suspicion_timeout_shortens_with_independent_confirmations() -> None:
    """Lifeguard §IV-B / memberlist suspicion.go: the timer starts at the maximum and each
    *independent* accuser (not the first, not a repeat) brings it towards the minimum."""
    cfg = lan()
    a = core("a", 1, cfg=cfg)
    for i in range(2, 10):
        a.receive(datagram(f"m{i}", Alive(0, f"m{i}", ("10.0.0.1", i), b"")), ("10.0.0.1", i), 0.0)
    n = 9
    lo, hi, k = cfg.suspicion_min(n), cfg.suspicion_max(n), cfg.suspicion_k(n)
    assert k == 3
    a.receive(datagram("m3", Suspect(0, "m2", "m3")), ("10.0.0.1", 3), 0.0)

    def deadline() -> float:
        return a._suspicions["m2"].deadline

    assert deadline() == pytest.approx(hi)
    a.receive(datagram("m3", Suspect(0, "m2", "m3")), ("10.0.0.1", 3), 1.0)  # repeat: no effect
    assert deadline() == pytest.approx(hi)
    expected = [SwimConfig.suspicion_timeout(c, k, lo, hi) for c in (1, 2, 3)]
    for accuser, want in zip(("m4", "m5", "m6"), expected):
        a.receive(datagram(accuser, Suspect(0, "m2", accuser)), ("10.0.0.1", 4), 1.0)
        assert deadline() == pytest.approx(want)
    assert expected[0] > expected[1] > expected[2] == pytest.approx(lo)
    a.receive(datagram("m7", Suspect(0, "m2", "m7")), ("10.0.0.1", 7), 1.0)  # beyond k: ignored
    assert deadline() == pytest.approx(lo)
    a.tick(lo)
    assert a.member("m2").status == "dead"  # type: ignore[union-attr]


def test_small_cluster_needs_no_confirmations() -> None:
    """memberlist suspectNode: k = 0 when N − 2 < k, and then the timeout is just the minimum."""
    cfg = lan()
    assert cfg.suspicion_k(4) == 0 and cfg.suspicion_k(5) == 3
    assert SwimConfig.suspicion_timeout(0, 0, 3.0, 12.0) == 3.0


# --- Lifeguard: local health ----------------------------------------------------------------------


def test_isolated_member_raises_its_health_score_and_slows_its_probes() -> None:
    """Lifeguard §IV-A (LHA-Probe): probes that fail with no nacks coming back mean *we*
    are the problem: the health score rises and the probe interval and timeout stretch."""
    net, names = cluster(6)
    others = [n for n in names if n != "n0000"]
    net.partition(["n0000"], others)
    net.run_until(20.0)
    a = net.nodes["n0000"].core
    assert a.health_score == CFG.awareness_max_multiplier - 1
    probes_before = a.stats.probes
    net.run_until(60.0)
    # At the maximum multiplier a probe round takes probe_interval · max seconds.
    assert a.stats.probes - probes_before <= 40.0 / (CFG.probe_interval * CFG.awareness_max_multiplier) + 1


def test_nacks_keep_a_healthy_prober_healthy() -> None:
    """Lifeguard nack: when the target is really gone, the relays still answer with nacks,
    so the prober knows its own links work and its health score does not degrade."""
    net, names = cluster(6)
    net.run_until(2.0)
    net.crash("n0005")
    net.run_until(40.0)
    for n in names[:-1]:
        assert net.nodes[n].core.health_score == 0, n
    assert sum(net.nodes[n].core.stats.nacks_sent for n in names[:-1]) > 0


def test_without_nacks_a_failed_probe_counts_against_the_prober() -> None:
    """Lifeguard: with no nacks expected, every failed probe costs +1 health."""
    cfg = lan().replace(nacks=False)
    a = core("a", 1, cfg=cfg)
    a.receive(datagram("b", Alive(0, "b", ("10.0.0.1", 2), b"")), ("10.0.0.1", 2), 0.0)
    a.receive(datagram("c", Alive(0, "c", ("10.0.0.1", 3), b"")), ("10.0.0.1", 3), 0.0)
    while a.stats.probes < 2:  # the second probe starts when the first has failed
        a.tick(a.next_deadline())
    assert a.health_score == 1


def test_relay_answers_nack_when_target_is_silent_and_forwards_acks() -> None:
    """SWIM ping-req relay + Lifeguard nack: the relay pings the target with its own
    sequence number, forwards an ack under the requester's, or sends a nack after probe_timeout."""
    relay = core("r", 1)
    relay.receive(datagram("a", IndirectPing(77, "t", ("10.0.0.1", 3), True)), ("10.0.0.1", 2), 0.0)
    ((addr, ping),) = [(a, m) for a, m in sent_messages(relay) if isinstance(m, Ping)]
    assert addr == ("10.0.0.1", 3) and isinstance(ping, Ping) and ping.target == "t"
    relay.receive(datagram("t", Ack(ping.seq)), ("10.0.0.1", 3), 0.1)
    assert [(a, m) for a, m in sent_messages(relay) if isinstance(m, Ack)] == [(("10.0.0.1", 2), Ack(77))]
    relay.receive(datagram("a", IndirectPing(78, "t", ("10.0.0.1", 3), True)), ("10.0.0.1", 2), 1.0)
    relay.take_datagrams()
    relay.tick(1.0 + CFG.probe_timeout)
    assert [(a, m) for a, m in sent_messages(relay) if isinstance(m, Nack)] == [(("10.0.0.1", 2), Nack(78))]


def test_ping_for_another_name_is_not_acked() -> None:
    """memberlist handlePing: a ping naming a different member (a stale address) gets no ack."""
    a = core("a", 1)
    a.receive(datagram("b", Ping(5, "someone-else")), ("10.0.0.1", 2), 0.0)
    assert not [m for _, m in sent_messages(a) if isinstance(m, Ack)]
    a.receive(datagram("b", Ping(6, "a")), ("10.0.0.1", 2), 0.0)
    assert [m for _, m in sent_messages(a) if isinstance(m, Ack)] == [Ack(6)]


# --- leave, reaping, partitions ---------------------------------------------------------------------


def test_graceful_leave_is_seen_as_left_not_dead() -> None:
    """memberlist Leave: a dead message whose sender is the member itself means "left"."""
    net, names = cluster(5)
    net.run_until(2.0)
    net.nodes["n0001"].core.leave(net.now)
    net._after(net.nodes["n0001"])
    net.run_until(6.0)
    assert all(net.status(o, "n0001") == "left" for o in names if o != "n0001")
    assert not events_about(net, "n0001", "dead")
    assert net.nodes["n0001"].core.leave_complete


def test_dead_members_are_gossiped_then_reaped() -> None:
    """memberlist resetNodes: dead members stay (and are gossiped to) for
    gossip_to_the_dead_time, then vanish at the next probe-round boundary."""
    cfg = lan().replace(gossip_to_the_dead_time=5.0)
    net, names = cluster(4, cfg=cfg)
    net.run_until(1.0)
    net.crash("n0003")
    net.run_until(9.0)  # found dead 3 s after the 1-second probe: well inside the 5 s window
    assert all(net.status(o, "n0003") == "dead" for o in names[:3])
    net.run_until(9.0 + 5.0 + 4 * cfg.probe_interval + 1)  # window, then one full round
    assert all(net.status(o, "n0003") is None for o in names[:3])


def test_partition_heals_by_refutation() -> None:
    """Stale-sender correction: after a partition heals, members that declared each other
    dead hear from each other (gossip to the dead), are told their verdict, refute with
    a higher incarnation, and everyone is alive again."""
    net, names = cluster(6)
    net.run_until(2.0)
    net.partition(names[:3], names[3:])
    net.run_until(20.0)
    assert all(net.status("n0000", x) == "dead" for x in names[3:]), net.repro(__file__)
    net.heal()
    net.run_until(30.0)
    for o in names:
        for x in names:
            assert net.status(o, x) == "alive", (o, x, net.repro(__file__))


# --- metadata -----------------------------------------------------------------------------------


def test_metadata_change_is_an_alive_message_with_a_higher_incarnation() -> None:
    """memberlist UpdateNode: new metadata = alive at incarnation + 1; peers emit "meta".
    Setting the same bytes again sends nothing."""
    net, names = cluster(5)
    net.run_until(2.0)
    b = net.nodes["n0001"].core
    b.set_meta(b"gpu:8xH100 free=3", net.now)
    net._after(net.nodes["n0001"])
    net.run_until(4.0)
    assert b.incarnation == 1
    metas = events_about(net, "n0001", "meta")
    assert {obs for _, obs in metas} == set(names) - {"n0001"}
    for o in names:
        assert net.nodes[o].core.member("n0001").meta == b"gpu:8xH100 free=3"  # type: ignore[union-attr]
    queued_before = len(b._queue)
    b.set_meta(b"gpu:8xH100 free=3", net.now)
    assert b.incarnation == 1 and len(b._queue) == queued_before


def test_metadata_size_is_capped() -> None:
    """A hard cap keeps any alive message within one datagram (max_meta_size, 1,024 in lan)."""
    a = core("a", 1)
    a.set_meta(b"x" * CFG.max_meta_size, 0.0)
    with pytest.raises(ValueError):
        a.set_meta(b"x" * (CFG.max_meta_size + 1), 0.0)
    with pytest.raises(ValueError):
        core("b", 2, meta=b"x" * (CFG.max_meta_size + 1))


# --- malformed input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"S\x01",
        b"S\x01\xc1\xc1",
        b"S\x02\x92\xa1a\x00",  # unknown version
        b"S\x01\x93\xa1a\x00\x93\x00\x01",  # truncated message
        b"S\x01\x93\xa1a\x00\x91\x63",  # unknown message type
        b"S\x01\x92\xa1a\x00\x00",  # trailing bytes
        b"S\x01\x93\xa1a\x00\x93\x00\x01\xc3",  # wrong field type (bool as target)
    ],
)
def test_garbage_raises_malformed_packet_and_changes_nothing(data: bytes) -> None:
    """h11's rule: one error class at the single receive entry point; state untouched."""
    a = core("a", 1)
    a.receive(datagram("b", Alive(0, "b", ("10.0.0.1", 2), b"m")), ("10.0.0.1", 2), 0.0)
    before = a.members()
    a.take_datagrams()
    with pytest.raises(MalformedPacket):
        a.receive(data, ("10.0.0.1", 2), 1.0)
    assert a.members() == before and a.take_datagrams() == [] and a.stats.malformed == 1


def test_valid_prefix_with_bad_tail_is_rejected_whole() -> None:
    """Nothing in a datagram is applied unless all of it decodes."""
    a = core("a", 1)
    data = frame(encode_header("b", 0), [encode_message(Alive(0, "b", ("10.0.0.1", 2), b"")), b"\x92\x63\x00"])
    with pytest.raises(MalformedPacket):
        a.receive(data, ("10.0.0.1", 2), 0.0)
    assert [m.name for m in a.members()] == ["a"]


def test_memberlist_profile_uses_memberlist_timeouts() -> None:
    """The faithful profile: probe timeout not scaled by health (memberlist probeNode)."""
    cfg = memberlist_lan()
    a = core("a", 1, cfg=cfg)
    a._awareness.apply(3)
    a.receive(datagram("b", Alive(0, "b", ("10.0.0.1", 2), b"")), ("10.0.0.1", 2), 0.0)
    now = a.next_deadline()
    a.tick(now)
    while a._probe is None:
        now = a.next_deadline()
        a.tick(now)
    probe = a._probe
    assert probe.direct_deadline - now == pytest.approx(cfg.probe_timeout)
    assert probe.deadline - now == pytest.approx(cfg.probe_interval * 4)
