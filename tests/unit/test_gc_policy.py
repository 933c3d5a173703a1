"""agent/gc_policy.py: full collections freeze their survivors; the frozen part is handed back on schedule."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from agent import gc_policy


@pytest.fixture
def policy_off() -> Iterator[None]:
    gc_policy.uninstall()
    yield
    gc_policy.uninstall()


def test_a_full_collection_freezes_its_survivors_and_uninstall_hands_them_back(policy_off: None) -> None:
    survivors = [[i] for i in range(1000)]  # tracked objects that outlive the collection
    policy = gc_policy.install()
    assert gc_policy.install() is policy  # once per process
    gc.collect()  # a full collection
    assert policy.freezes == 1 and gc.get_freeze_count() >= len(survivors)
    gc_policy.uninstall()
    assert gc.get_freeze_count() == 0


def test_cycles_that_die_while_frozen_are_collected_after_the_periodic_unfreeze(policy_off: None) -> None:
    policy = gc_policy.install(unfreeze_every_s=3600.0)

    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    node = Node()
    alive = weakref.ref(node)
    gc.collect()  # `node` survives, and is frozen
    del node
    gc.collect()
    assert alive() is not None  # dead, but frozen: no collection looks at it
    policy.unfreeze_every_s = 0.0  # the period is up
    gc.collect()  # this one hands the frozen part back...
    assert policy.unfreezes == 1 and gc.get_freeze_count() == 0
    gc.collect()  # ...and the next finds the dead cycle
    assert alive() is None
