"""The cluster's GPUs as the scheduler sees them, grouped by node and updated by deltas.

The agent keeps one `Inventory` per node and replaces a node's views whenever
something about them changes (a telemetry sample, a member's gossip metadata,
a drain or a health verdict applied to the table), so nothing on a request's
path rebuilds the whole cluster's list. Views arrive with `drained` and `health`
already overlaid: the scheduler reads `GpuView.schedulable` as it is.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from coordinator.model import GpuRef, GpuView


class Inventory:
    """GPU views by node; `set_node` replaces one node's GPUs."""

    def __init__(self) -> None:
        self._nodes: dict[str, tuple[GpuView, ...]] = {}
        self._count = 0

    @classmethod
    def of(cls, views: Iterable[GpuView]) -> Inventory:
        """An inventory holding `views` (any order)."""
        by_node: dict[str, list[GpuView]] = {}
        for view in views:
            by_node.setdefault(view.node, []).append(view)
        inventory = cls()
        for node, node_views in by_node.items():
            inventory.set_node(node, node_views)
        return inventory

    def set_node(self, node: str, views: Sequence[GpuView]) -> None:
        """Replace every GPU of `node` (an empty sequence removes the node)."""
        if not views:
            self.remove_node(node)
            return
        ordered = tuple(sorted(views, key=lambda v: v.index))
        self._count += len(ordered) - len(self._nodes.get(node, ()))
        self._nodes[node] = ordered

    def remove_node(self, node: str) -> None:
        self._count -= len(self._nodes.pop(node, ()))

    def nodes(self) -> list[str]:
        """Node names, sorted."""
        return sorted(self._nodes)

    def node_views(self, node: str) -> Sequence[GpuView]:
        """`node`'s GPUs in index order; () when the node is unknown."""
        return self._nodes.get(node, ())

    def get(self, ref: GpuRef) -> GpuView | None:
        for view in self._nodes.get(ref.node, ()):
            if view.index == ref.index:
                return view
        return None

    def __iter__(self) -> Iterator[GpuView]:
        for node in sorted(self._nodes):
            yield from self._nodes[node]

    def __len__(self) -> int:
        return self._count
