"""SwimConfig: profiles, formulas (memberlist util.go / suspicion.go) and validate()."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.swim_config import (
    InvalidSwimConfig,
    SwimConfig,
    lan,
    local,
    memberlist_lan,
    profile,
    with_overrides,
)


def test_memberlist_profile_is_default_lan_config() -> None:
    """memberlist config.go DefaultLANConfig, field for field."""
    c = memberlist_lan()
    assert (c.probe_interval, c.probe_timeout, c.indirect_checks) == (1.0, 0.5, 3)
    assert (c.retransmit_mult, c.suspicion_mult, c.suspicion_max_timeout_mult) == (4, 4, 6)
    assert (c.gossip_interval, c.gossip_nodes, c.gossip_to_the_dead_time) == (0.2, 3, 30.0)
    assert (c.awareness_max_multiplier, c.packet_size, c.max_meta_size) == (8, 1400, 512)
    assert c.suspicion_confirmations == c.suspicion_mult - 2
    assert not c.scale_probe_timeout and c.dead_node_reclaim_time is None


def test_formulas_match_memberlist() -> None:
    """retransmitLimit = mult·⌈log10(N+1)⌉; suspicionTimeout = mult·max(1, log10 N)·interval."""
    c = memberlist_lan()
    assert [c.retransmit_limit(n) for n in (1, 5, 9, 10, 99, 1000)] == [4, 4, 4, 8, 8, 16]
    assert c.suspicion_min(5) == pytest.approx(4.0)
    assert c.suspicion_min(1000) == pytest.approx(12.0)
    assert c.suspicion_max(1000) == pytest.approx(72.0)
    # remainingSuspicionTime: n=1 of k=2 with min 4 / max 24 -> 24 - log(2)/log(3)*20
    assert SwimConfig.suspicion_timeout(1, 2, 4.0, 24.0) == pytest.approx(11.381, abs=1e-3)
    assert SwimConfig.suspicion_timeout(2, 2, 4.0, 24.0) == pytest.approx(4.0)
    assert c.push_pull_scale(32) == 1 and c.push_pull_scale(1000) == 6


def test_profiles_validate_and_are_found_by_name() -> None:
    for name in ("lan", "local", "memberlist"):
        assert profile(name).validate() == profile(name)
    assert local().probe_timeout < lan().probe_timeout
    with pytest.raises(InvalidSwimConfig):
        profile("wan")


@pytest.mark.parametrize(
    "changes",
    [
        {"probe_timeout": 1.0},  # not below the interval
        {"probe_interval": 0},
        {"gossip_nodes": 0},
        {"max_meta_size": 1300},  # largest alive no longer fits 1,400 bytes
        {"packet_size": 200},
        {"awareness_max_multiplier": 0},
        {"dead_node_reclaim_time": -1.0},
    ],
)
def test_validate_rejects_nonsense(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidSwimConfig):
        dataclasses.replace(lan(), **changes).validate()  # type: ignore[arg-type]


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(InvalidSwimConfig, match="probe_intervall"):
        with_overrides(lan(), {"probe_intervall": 2.0})
    assert with_overrides(lan(), {"probe_interval": 2.0}).probe_interval == 2.0


def test_without_lifeguard_turns_off_all_three_mechanisms() -> None:
    c = lan().without_lifeguard()
    assert c.awareness_max_multiplier == 1 and not c.nacks
    assert c.suspicion_k(1000) == 0 and c.suspicion_max(1000) == c.suspicion_min(1000)


def test_metadata_rate_budget() -> None:
    """Each change costs N · retransmit limit · size bytes cluster-wide: at 1,000 members,
    160-byte metadata and 10 KB/s per member, a member may change it every ~320 s."""
    c = lan()
    assert c.meta_update_interval(1000, 160) == pytest.approx(1000 * 16 * 200 / 10_000)
    assert c.meta_update_interval(5, 160) < 1.0
