"""The one inventory: this host's GPUs, the members' from gossip, and the lease table's verdicts over both.

Both the scheduler (through `inventory()`) and `/gpu/status` (through
`overlay`) read GPUs through this module, so a drained or recorded-unhealthy GPU
looks the same to both.

Theory of operation
-------------------
`InventoryFeed` keeps a pure `Inventory` (coordinator/inventory.py) and
rebuilds only the nodes whose inputs changed since the last read:

- this node, at every device sample (`DeviceSampler.subscribe`);
- a member, whenever gossip reports it joined, changed status or metadata, or
  left (`MembershipService.on_change`);
- a node named by an applied `SetDrain`, `ReportGpuHealth` or `MarkHostLost`
  (`note_applied`), and every node when the table is replaced (a snapshot
  restored) or the voters change (both seen at the next read).

So a read costs the nodes that changed, not the cluster.

Which members' GPUs are scheduled here: an alive member with metadata that is a
client (`server = false`), or a voter of this server's Raft configuration. A
member that is a server outside it (a blank server not yet added, or another
cluster's lone agent that shares the gossip) keeps its own GPUs. Where no
configuration is known (a client), every alive member counts.

With its views, each node's topology (how its GPUs are wired): this node's
from the sampler, a member's from its gossip metadata (None when it sends none).

The overlay, in one place (`overlay`): a GPU the table drains is drained; a
remote GPU the table holds unhealthy is unhealthy whatever its host gossips (the
leader keeps a verdict for its quiet period even when the host forgot it,
coordinator/remote_health.py). This host's own GPUs take health from the
sampler, which decides it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from coordinator.commands import Command, MarkHostLost, ReportGpuHealth, SetDrain
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.mig import gpu_of_slice
from coordinator.model import UNHEALTHY, GpuRef, GpuView

from agent.device_sampler import DeviceSampler
from agent.membership import Member, MembershipService
from agent.node_meta import ROLE_CLIENT


def overlay(view: GpuView, table: LeaseTable | None, *, local: bool) -> GpuView:
    """`view` with the table's drain and, for another host's GPU, its recorded unhealthy verdict.

    A MIG slice takes both from its GPU too: draining a GPU drains its slices,
    and health is recorded per GPU.
    """
    if table is None:
        return view
    gpu = gpu_of_slice(view.index)
    gpu_ref = view.ref if gpu is None else GpuRef(view.node, gpu)
    drains = table.drained()
    drained = view.drained or view.ref in drains or gpu_ref in drains
    unhealthy = not local and view.health != UNHEALTHY and table.gpu_health(gpu_ref)[0] == UNHEALTHY
    if drained == view.drained and not unhealthy:
        return view
    return replace(view, drained=drained, health=UNHEALTHY if unhealthy else view.health)


def member_views(member: Member) -> list[GpuView]:
    """A member's GPUs as its gossip metadata describes them."""
    meta = member.meta
    if meta is None:
        return []
    received = member.meta_received_at
    # A slice's GPU, for its UUID: gossiped beside it (bit 2 of its flags says MIG mode).
    parents = {g.index: g.uuid for g in meta.gpus if g.mig_mode}
    return [
        GpuView(
            node=member.view.name,
            index=g.index,
            uuid=g.uuid,
            name=g.model,
            memory_total_mb=g.memory_total_mb,
            memory_free_mb=g.memory_free_mb,
            utilization_pct=None if g.utilization_pct is None else float(g.utilization_pct),
            health=g.health,
            drained=g.drained,
            sampled_at=received,
            mig_profile=g.mig_profile,
            parent_uuid=_parent_uuid(g.index, parents),
        )
        for g in meta.gpus
        # A GPU in MIG mode is leased by its slices only.
        if not g.mig_mode
    ]


def _parent_uuid(index: int, parents: dict[int, str]) -> str | None:
    """The UUID of the GPU a slice's unit `index` is part of; None for a whole GPU or an unknown parent."""
    gpu = gpu_of_slice(index)
    return None if gpu is None else parents.get(gpu)


class InventoryFeed:
    """Keeps the scheduler's `Inventory` current, node by node (see the module docstring)."""

    def __init__(
        self,
        node: str,
        sampler: DeviceSampler,
        membership: MembershipService,
        table: Callable[[], LeaseTable | None],
        voters: Callable[[], Sequence[str] | None],
    ) -> None:
        self.node = node
        self._sampler = sampler
        self._membership = membership
        self._table = table
        self._voters = voters
        self._inventory = Inventory()
        self._dirty: set[str] = set()
        self._all_dirty = True
        # What the inventory was last built against: a new table or voter set rebuilds it all.
        self._built_for: tuple[LeaseTable | None, tuple[str, ...] | None] = (None, None)
        sampler.subscribe(lambda: self._mark(node))
        membership.on_change(self._mark)

    def inventory(self) -> Inventory:
        """The GPUs this node would schedule, current as of now."""
        voters = self._voters()
        basis = (self._table(), None if voters is None else tuple(voters))
        if basis[0] is not self._built_for[0] or basis[1] != self._built_for[1]:
            self._built_for = basis
            self._all_dirty = True
        if self._all_dirty:
            self._all_dirty = False
            self._dirty.clear()
            known = {self.node} | {m.view.name for m in self._membership.members()} | set(self._inventory.nodes())
            for name in known:
                self._refresh(name)
        elif self._dirty:
            dirty, self._dirty = self._dirty, set()
            for name in dirty:
                self._refresh(name)
        return self._inventory

    def _mark(self, name: str) -> None:
        self._dirty.add(name)

    def note_applied(self, commands: Iterable[Command]) -> None:
        """Mark the nodes whose drains or recorded verdicts the applied commands changed."""
        for command in commands:
            if isinstance(command, (SetDrain, ReportGpuHealth, MarkHostLost)):
                self._mark(command.node)

    def _refresh(self, name: str) -> None:
        table = self._table()
        if name == self.node:
            views = [overlay(v, table, local=True) for v in self._sampler.gpu_views()]
            topology = self._sampler.topology
        else:
            member = self._membership.member(name)
            views, topology = [], None
            if member is not None and member.meta is not None and self._scheduled_here(member):
                views = [overlay(v, table, local=False) for v in member_views(member)]
                topology = member.meta.topology
        self._inventory.set_node(name, views)
        self._inventory.set_topology(name, topology)
        # Address and labels for gangs (coordinator/gang_placement.py): from gossip,
        # the agent's own included; a lone agent without gossip has neither.
        member = self._membership.member(name)
        meta = None if member is None else member.meta
        self._inventory.set_facts(name, None if meta is None else meta.advertise_ip, {} if meta is None else meta.labels)

    def _scheduled_here(self, member: Member) -> bool:
        if member.view.status != "alive" or member.meta is None:
            return False
        if member.meta.role == ROLE_CLIENT:
            return True
        voters = self._voters()
        return voters is None or member.view.name in voters

