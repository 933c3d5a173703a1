"""Inventory: GPU views by node, replaced node by node, with a journal of what changed."""

from __future__ import annotations

import pytest

from coordinator.inventory import Inventory
from coordinator.model import GpuRef, GpuView

H100 = "NVIDIA H100 80GB HBM3"
L4 = "NVIDIA L4"


def view(
    node: str, index: int, name: str = H100, memory_mb: int = 81559,
    *, utilization_pct: float | None = None, sampled_at: float = 0.0,
) -> GpuView:
    return GpuView(
        node, index, f"GPU-{node}-{index}", name, memory_mb,
        utilization_pct=utilization_pct, sampled_at=sampled_at,
    )


def test_views_are_grouped_by_node_in_index_order() -> None:
    """of() takes views in any order; iteration, nodes() and node_views() are sorted."""
    inventory = Inventory.of([view("b", 1), view("a", 0), view("b", 0)])
    assert inventory.nodes() == ["a", "b"]
    assert [v.ref for v in inventory] == [GpuRef("a", 0), GpuRef("b", 0), GpuRef("b", 1)]
    assert [v.index for v in inventory.node_views("b")] == [0, 1]
    assert inventory.node_views("zz") == ()
    assert len(inventory) == 3
    assert inventory.get(GpuRef("b", 1)) == view("b", 1)
    assert inventory.get(GpuRef("b", 7)) is None


def test_set_node_replaces_a_node_and_an_empty_one_removes_it() -> None:
    """set_node swaps every GPU of the node; () and remove_node forget it."""
    inventory = Inventory.of([view("a", 0), view("a", 1), view("b", 0)])
    inventory.set_node("a", [view("a", 0, L4, 23034)])
    assert [v.name for v in inventory.node_views("a")] == [L4]
    assert inventory.get(GpuRef("a", 1)) is None
    inventory.set_node("a", [])
    inventory.remove_node("b")
    inventory.remove_node("never-there")
    assert inventory.nodes() == [] and len(inventory) == 0 and list(inventory) == []


def test_the_journal_names_the_nodes_changed_since_a_version() -> None:
    """Only real changes bump the version; changed_since lists each changed node once."""
    inventory = Inventory.of([view("a", 0), view("b", 0), view("c", 0)])
    seen = inventory.version
    inventory.set_node("b", [view("b", 0)])  # equal views: nothing changes
    assert inventory.version == seen and inventory.changed_since(seen) == []
    inventory.set_node("b", [view("b", 0, utilization_pct=50.0)])
    inventory.set_node("a", [view("a", 0, sampled_at=3.0)])
    inventory.set_node("b", [view("b", 0, utilization_pct=60.0)])
    assert inventory.changed_since(seen) == ["b", "a"]
    assert inventory.changed_since(inventory.version) == []
    inventory.remove_node("c")
    assert inventory.changed_since(seen) == ["c", "b", "a"]


def test_kinds_and_memory_sizes_follow_the_nodes() -> None:
    """Nodes are counted by kind (their GPUs' names and memory); sizes by what is present."""
    inventory = Inventory.of([view("a", 0), view("a", 1, L4, 23034), view("b", 0, L4, 23034), view("b", 1)])
    assert inventory.kinds() == [((H100, 81559), (L4, 23034))]
    assert inventory.smallest_memory_at_least(30000) == 81559
    assert inventory.smallest_memory_at_least(0) == 23034
    assert inventory.smallest_memory_at_least(90000) is None
    inventory.set_node("b", [view("b", 0)])
    assert sorted(inventory.kinds()) == [((H100, 81559),), ((H100, 81559), (L4, 23034))]
    inventory.remove_node("a")
    assert inventory.kinds() == [((H100, 81559),)]
    assert inventory.smallest_memory_at_least(0) == 81559


@pytest.mark.parametrize(
    "views", [[view("b", 0)], [view("a", 0), view("a", 0, L4, 23034)]], ids=["other-node", "same-index"]
)
def test_set_node_refuses_views_that_do_not_describe_the_node(views: list[GpuView]) -> None:
    """A view of another node, or two views of one index, is a caller's bug: ValueError."""
    inventory = Inventory()
    with pytest.raises(ValueError):
        inventory.set_node("a", views)
    assert len(inventory) == 0
