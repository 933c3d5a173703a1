"""RaftConfig: etcd's defaults, and validation of nonsense."""

from __future__ import annotations

import pytest

from coordinator.raft_config import InvalidRaftConfig, RaftConfig, from_mapping, lan, local


def test_defaults_are_etcds_timing() -> None:
    """100 ms ticks, heartbeat 1 tick, election 10 ticks (etcd's 100 ms / 1,000 ms), pre-vote and
    check-quorum on."""
    c = lan()
    assert (c.tick_interval_s, c.heartbeat_ticks, c.election_ticks) == (0.1, 1, 10)
    assert c.pre_vote and c.check_quorum
    local().validate()


@pytest.mark.parametrize(
    "changes",
    [{"election_ticks": 1}, {"heartbeat_ticks": 0}, {"tick_interval_s": 0.0}, {"max_inflight_messages": 0}, {"snapshot_every": 0}],
)
def test_validate_rejects_nonsense(changes: dict[str, object]) -> None:
    """An election timeout not above the heartbeat, or zero sizes, cannot work."""
    with pytest.raises(InvalidRaftConfig):
        RaftConfig().replace(**changes)


def test_unknown_keys_are_errors() -> None:
    """Like every config table here, unknown keys are refused rather than ignored."""
    with pytest.raises(InvalidRaftConfig, match="electon_ticks"):
        from_mapping({"electon_ticks": 5})
    assert from_mapping({"election_ticks": 20}).election_ticks == 20
