"""`[queues.<name>]` and the scheduler's sharing knobs: parsing, validation, and what a SIGHUP applies.

Every test writes its own file and passes its own environment (tests/unit/test_config.py's helpers).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import reloaded, restart_needed_keys
from agent.config_checks import ConfigError
from coordinator.idle_reclaim import IdlePolicy
from coordinator.queues import UNCONFIGURED, QueuePolicy, QueueSpec
from tests.unit.test_config import load, write

TEAMS = """
[scheduler]
preemption_priority_gap = 2
age_weight_per_hour = 0.5

[queues.research]
guaranteed_gpus = 8
max_gpus = 16
lend = false

[queues.vision]
parent = "research"
guaranteed_gpus = { H100 = 4, A100 = 2 }
weight = 2
max_priority = 7
borrow = false
preemption_grace_s = 120
idle_reclaim = { utilization_pct = 5, minutes = 30 }
services = ["detector", "segmenter"]

[queues.batch]
parent = ""
services = ["nightly"]
"""


def test_no_queues_is_the_unconfigured_policy(tmp_path: Path) -> None:
    """Without [queues], the policy is today's strict priority: nothing for the leader to propose."""
    config = load(tmp_path)
    assert config.queues == ()
    assert config.queue_policy == UNCONFIGURED and not config.queue_policy.configured


def test_every_key_is_read_into_its_queue_spec(tmp_path: Path) -> None:
    write(tmp_path, TEAMS)
    policy = load(tmp_path).queue_policy
    assert policy == QueuePolicy.of(
        [
            QueueSpec("research", guaranteed_gpus=8, max_gpus=16, lend=False),
            QueueSpec(
                "vision",
                parent="research",
                guaranteed_by_model=(("A100", 2), ("H100", 4)),
                weight=2.0,
                max_priority=7,
                borrow=False,
                preemption_grace_s=120.0,
                idle_reclaim=IdlePolicy(5.0, 30.0),
                services=("detector", "segmenter"),
            ),
            # parent = "" is unset, as for every optional key (TOML has no null).
            QueueSpec("batch", services=("nightly",)),
        ],
        preemption_priority_gap=2,
        age_weight_per_hour=0.5,
    )
    assert policy.queue_of_service("segmenter") == "vision"
    assert policy.queue_of_service("unmapped") == "default"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[queues.a]\ngauranteed_gpus = 1\n", r"\[queues\.a\]: unknown key 'gauranteed_gpus'; did you mean 'guaranteed_gpus'\?"),
        ('[queues.a]\nweight = "heavy"\n', r"\[queues\.a\] weight: expected a number, got string 'heavy'"),
        ("[queues.a]\nborrow = 1\n", r"\[queues\.a\] borrow: expected a boolean"),
        ("[queues.a]\nmax_gpus = 2.5\n", r"\[queues\.a\] max_gpus: expected an integer"),
        ('[queues.a]\nservices = "svc"\n', r"\[queues\.a\] services: expected an array of strings"),
        ('[queues.a]\nservices = ["bad name"]\n', r"\[queues\.a\] services: 'bad name' can never be a service_name"),
        ("[queues.a]\nguaranteed_gpus = 1.5\n", r"\[queues\.a\] guaranteed_gpus: expected an integer or a table"),
        ('[queues.a]\nguaranteed_gpus = { H100 = "8" }\n', r"\[queues\.a\] guaranteed_gpus\.H100: expected an integer"),
        ("[queues.a]\nweight = 0\n", r"\[queues\.a\]: queue 'a': weight must be a positive number, got 0"),
        ("[queues.a]\nmax_priority = 11\n", r"\[queues\.a\]: queue 'a': max_priority must be 1-10, got 11"),
        ("[queues.a]\nguaranteed_gpus = 4\nmax_gpus = 2\n", r"max_gpus \(2\) is below the guarantee \(4\)"),
        ("[queues.a]\npreemption_grace_s = -1\n", r"preemption_grace_s must be >= 0"),
        ('[queues."a b"]\n', r"name must be letters, digits"),
        ("[queues.a]\nidle_reclaim = 5\n", r"\[queues\.a\] idle_reclaim: expected a table"),
        ("[queues.a]\nidle_reclaim = { utilization_pct = 5 }\n", r"idle_reclaim: needs minutes as well"),
        ("[queues.a]\nidle_reclaim = { utilization_pct = 5, minutes = 1, mins = 2 }\n", r"unknown key 'mins'; did you mean 'minutes'\?"),
        ("[queues.a]\nidle_reclaim = { utilization_pct = 0, minutes = 1 }\n", r"idle_reclaim utilization must be in \(0, 100\]"),
        ("[queues]\na = 1\n", r"\[queues\.a\] must be a table of the queue's keys"),
        ("queues = 1\n", r"\[queues\] must hold \[queues\.<name>\] tables"),
    ],
)
def test_a_bad_queue_key_is_refused_naming_the_queue_and_key(tmp_path: Path, toml: str, message: str) -> None:
    write(tmp_path, toml)
    with pytest.raises(ConfigError, match=message):
        load(tmp_path)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[queues.a]\nparent = "nobody"\n', r"\[queues\] queue 'a': parent 'nobody' is not declared"),
        ('[queues.a]\nservices = ["s"]\n[queues.b]\nservices = ["s"]\n', r"service 's' is mapped to queues 'a' and 'b'"),
        ('[queues.top]\n[queues.mid]\nparent = "top"\n[queues.leaf]\nparent = "mid"\n', r"one level only"),
        ('[queues.top]\nservices = ["s"]\n[queues.kid]\nparent = "top"\n', r"has child queues, so it cannot take services"),
    ],
)
def test_queues_that_do_not_fit_together_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError, match=message) as refused:
        load(tmp_path)
    assert f"(set by {path})" in str(refused.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[scheduler]\npreemption_priority_gap = -1\n", r"\[scheduler\] preemption_priority_gap must be an integer >= 0"),
        ("[scheduler]\nage_weight_per_hour = -0.5\n", r"\[scheduler\] age_weight_per_hour must be a number >= 0"),
        ("[scheduler]\npreemption_priority_gap = 1.5\n", r"\[scheduler\] preemption_priority_gap: expected an integer"),
    ],
)
def test_the_sharing_knobs_are_validated(tmp_path: Path, toml: str, message: str) -> None:
    write(tmp_path, toml)
    with pytest.raises(ConfigError, match=message):
        load(tmp_path)


def test_an_unknown_section_lists_the_queue_tables(tmp_path: Path) -> None:
    write(tmp_path, "[queue.a]\nweight = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[queue\]; did you mean 'queues'\?.*\[queues\.<name>\]"):
        load(tmp_path)


def test_a_reload_applies_the_queues_and_knobs_and_nothing_that_needs_a_restart(tmp_path: Path) -> None:
    """SIGHUP: queues, preemption_priority_gap and age_weight_per_hour change in place; a port change waits."""
    running = load(tmp_path)
    write(tmp_path, TEAMS + "\n[http]\nport = 9999\n")
    fresh = load(tmp_path)
    assert restart_needed_keys(running, fresh) == ["http.port"]
    in_force = reloaded(running, fresh)
    assert in_force.queue_policy == fresh.queue_policy
    assert in_force.http.port == running.http.port
    assert in_force == replace(running, scheduler=fresh.scheduler, queues=fresh.queues)


def test_share_keys_are_read_and_reload_in_place(tmp_path: Path) -> None:
    """allow_shares and cross_queue_shares (docs/shapes.md#shared-gpus-by-memory) default to true and false."""
    write(tmp_path, '[queues.infer]\ncross_queue_shares = true\n\n[queues.train]\nallow_shares = false\n')
    running = load(tmp_path)
    infer, train = running.queue_policy.spec("infer"), running.queue_policy.spec("train")
    assert (infer.allow_shares, infer.cross_queue_shares) == (True, True)
    assert (train.allow_shares, train.cross_queue_shares) == (False, False)
    write(tmp_path, "[queues.infer]\n\n[queues.train]\n")
    fresh = load(tmp_path)
    assert restart_needed_keys(running, fresh) == []
    assert not reloaded(running, fresh).queue_policy.spec("infer").cross_queue_shares
    write(tmp_path, '[queues.train]\nallow_shares = "no"\n')
    with pytest.raises(ConfigError, match="allow_shares"):
        load(tmp_path)
