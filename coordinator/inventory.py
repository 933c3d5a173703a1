"""The cluster's GPUs as the scheduler sees them, grouped by node and updated by deltas.

Theory of operation
-------------------
The caller (the agent) owns the facts: each node's GPUs with their latest
telemetry, health and the table's drains already laid over them. It hands them
in one node at a time with `set_node`, as often as it likes; handing in views
equal to the stored ones changes nothing and costs one tuple comparison.

Every real change bumps `version` and moves the node to the end of a change
journal, so a consumer that remembers the version it last saw asks
`changed_since(version)` for the nodes to look at again, in time proportional
to the number of changed nodes, not the cluster. The journal holds each node
once (its latest change), so it never grows beyond the number of nodes ever seen.

Beside the views, the inventory counts nodes by their *kind*: the sorted
(name, total memory) pairs of their GPUs. Whether a request could ever fit
(`Scheduler.check_satisfiable`) depends on nothing else, and a cluster has a
handful of kinds however many nodes it has.

MIG slices (coordinator/mig.py) are views too, but a node's kind and the
memory sizes count whole GPUs only: a whole-GPU request can never take a
slice, so what it could fit is decided as if no slice existed. Slices are
counted apart, by (profile, name, memory), which is all a slice request's
fit depends on (it takes one slice).

A node may also have a `NodeTopology` (coordinator/topology.py): how its GPUs
are wired, which decides which of them placement takes together. It is set
apart from the views (`set_topology`) and changes rarely; a change bumps
`version` and journals the node, because placement indexes each node by how
many of its open GPUs NVLink joins (coordinator/placement.py).

Likewise a node's labels (its `[agent] labels`, gossiped) and address
(`set_facts`): gang placement prefers nodes sharing a label and names the
first node's address as the gang's rendezvous (coordinator/gang_placement.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, Mapping, Sequence, TypeVar

from sortedcontainers import SortedList

from coordinator.change_journal import ChangeJournal
from coordinator.model import GpuRef, GpuView
from coordinator.topology import NodeTopology

# What a node could ever offer a request: its GPUs' (name, total memory), sorted.
NodeKind = tuple[tuple[str, int], ...]
# One kind of MIG slice: (profile, name, total memory).
SliceKind = tuple[str, str, int]
_K = TypeVar("_K")


class Inventory:
    """Every GPU view of the cluster, by node, with a journal of the nodes that changed."""

    def __init__(self) -> None:
        self._views: dict[str, tuple[GpuView, ...]] = {}
        self._by_ref: dict[GpuRef, GpuView] = {}
        self._names: SortedList[str] = SortedList()
        self._kinds: Counter[NodeKind] = Counter()
        self._node_kind: dict[str, NodeKind] = {}
        self._sizes: Counter[int] = Counter()
        self._slices: Counter[SliceKind] = Counter()
        self._changes = ChangeJournal()
        self._topologies: dict[str, NodeTopology] = {}
        self._labels: dict[str, Mapping[str, str]] = {}
        self._addresses: dict[str, str] = {}
        self._count = 0

    @classmethod
    def of(cls, views: Iterable[GpuView]) -> Inventory:
        """An inventory holding `views` (any order; grouped by their node)."""
        by_node: dict[str, list[GpuView]] = {}
        for view in views:
            by_node.setdefault(view.node, []).append(view)
        inventory = cls()
        for node, node_views in by_node.items():
            inventory.set_node(node, node_views)
        return inventory

    # ------------------------------------------------------------------ updates

    def set_node(self, node: str, views: Sequence[GpuView]) -> None:
        """Replace every GPU of `node` with `views` (an empty sequence removes the node).

        Raises ValueError when a view belongs to another node or two share an index.
        """
        ordered = tuple(sorted(views, key=lambda v: v.index))
        current = self._views.get(node)
        if current is not None and (current is ordered or current == ordered):
            return
        if not ordered and current is None:
            return
        if any(v.node != node for v in ordered):
            raise ValueError(f"set_node({node!r}) got a view of another node")
        if len({v.index for v in ordered}) != len(ordered):
            raise ValueError(f"set_node({node!r}) got two views with the same index")
        if current is not None:
            self._forget(node, current)
        if not ordered:
            self._topologies.pop(node, None)
            self._labels.pop(node, None)
            self._addresses.pop(node, None)
        if ordered:
            self._views[node] = ordered
            self._names.add(node)
            for view in ordered:
                self._by_ref[view.ref] = view
                if view.mig_profile is None:
                    self._sizes[view.memory_total_mb] += 1
                else:
                    self._slices[_slice_kind(view)] += 1
            kind = tuple(sorted((v.name, v.memory_total_mb) for v in ordered if v.mig_profile is None))
            self._node_kind[node] = kind
            self._kinds[kind] += 1
            self._count += len(ordered)
        self._changes.changed(node)

    def set_topology(self, node: str, topology: NodeTopology | None) -> None:
        """Make `topology` how `node`'s GPUs are wired (None: unknown). Ignored for a node without GPUs."""
        old = self._topologies.get(node)
        if topology is None or node not in self._views:
            self._topologies.pop(node, None)
        else:
            self._topologies[node] = topology
        if self._topologies.get(node) != old:
            # Placement indexes each node's NVLink-joined open GPUs: a new wiring is a change.
            self._changes.changed(node)

    def set_facts(self, node: str, address: str | None, labels: Mapping[str, str]) -> None:
        """Record `node`'s address (None: unknown) and labels. Does not bump `version`."""
        if address:
            self._addresses[node] = address
        else:
            self._addresses.pop(node, None)
        if labels:
            self._labels[node] = labels
        else:
            self._labels.pop(node, None)

    def labels(self) -> Mapping[str, Mapping[str, str]]:
        """Each labelled node's labels (nodes without any are absent)."""
        return self._labels

    def address(self, node: str) -> str | None:
        """The address other hosts reach `node` at, or None when unknown."""
        return self._addresses.get(node)

    def remove_node(self, node: str) -> None:
        """Forget `node` and its GPUs (nothing happens for an unknown node)."""
        self.set_node(node, ())

    def _forget(self, node: str, views: tuple[GpuView, ...]) -> None:
        del self._views[node]
        self._names.remove(node)
        for view in views:
            del self._by_ref[view.ref]
            if view.mig_profile is None:
                _uncount(self._sizes, view.memory_total_mb)
            else:
                _uncount(self._slices, _slice_kind(view))
        _uncount(self._kinds, self._node_kind.pop(node))
        self._count -= len(views)

    # ------------------------------------------------------------------ queries

    def nodes(self) -> list[str]:
        """Node names, sorted."""
        return list(self._names)

    def node_views(self, node: str) -> Sequence[GpuView]:
        """The GPUs of `node` in index order; () for an unknown node."""
        return self._views.get(node, ())

    def topology(self, node: str) -> NodeTopology | None:
        """How `node`'s GPUs are wired, or None when it has not said."""
        return self._topologies.get(node)

    def get(self, ref: GpuRef) -> GpuView | None:
        """The view of one GPU, or None when the inventory does not hold it."""
        return self._by_ref.get(ref)

    def __iter__(self) -> Iterator[GpuView]:
        """Every view, in (node, index) order."""
        for node in self._names:
            yield from self._views[node]

    def __len__(self) -> int:
        """The number of GPUs."""
        return self._count

    def kinds(self) -> list[NodeKind]:
        """The distinct node kinds present (each node's sorted (name, total memory) pairs)."""
        return list(self._kinds)

    def kind_counts(self) -> Mapping[NodeKind, int]:
        """How many nodes there are of each kind."""
        return self._kinds

    def smallest_memory_at_least(self, memory_mb: int) -> int | None:
        """The smallest whole GPU's total memory ≥ `memory_mb` in the cluster, or None when none is that big."""
        sizes = [size for size in self._sizes if size >= memory_mb]
        return min(sizes, default=None)

    def slice_kinds(self) -> list[SliceKind]:
        """The distinct kinds of MIG slice present, as (profile, name, total memory), sorted."""
        return sorted(self._slices)

    @property
    def version(self) -> int:
        """Bumped by every change; 0 for an inventory that never changed."""
        return self._changes.version

    def changed_since(self, version: int) -> list[str]:
        """Nodes set or removed after `version` (a value `version` had then), latest first."""
        return self._changes.changed_since(version)


def _slice_kind(view: GpuView) -> SliceKind:
    return (view.mig_profile or "", view.name, view.memory_total_mb)


def _uncount(counter: Counter[_K], key: _K) -> None:
    counter[key] -= 1
    if not counter[key]:
        del counter[key]
