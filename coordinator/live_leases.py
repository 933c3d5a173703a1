"""The live leases of the lease table and the indexes it answers from.

`LiveLeases` holds every live allocation and keeps, on each add and remove,
the indexes that make the scheduler's questions a lookup instead of a walk:
which lease holds each GPU, the shares of shared GPUs, each node's leases,
lease expiries in time order, live gangs, and a journal of the nodes whose
held GPUs changed. It knows nothing of commands, queues or usage: the lease
table (lease_table.py) decides what changes and calls `add`, `remove`,
`renew` and `add_gang` in the order its rules give.

Iteration orders that leak into results are fixed (oldest first, rank order),
so every replica answers alike whatever order its dicts were filled in.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping, ValuesView

from sortedcontainers import SortedList

from coordinator.change_journal import ChangeJournal
from coordinator.model import Allocation, GpuRef
from coordinator.share_placement import ShareIndex


class LiveLeases:
    """Live allocations by id, with their GPU, node, expiry and gang indexes."""

    def __init__(self) -> None:
        self._by_id: dict[str, Allocation] = {}
        self._holders: dict[GpuRef, str] = {}
        self._shares = ShareIndex()
        self._on_node: dict[str, set[str]] = {}
        self._expiries: SortedList[tuple[float, str]] = SortedList()
        # Live gangs: gang id -> member allocation ids, rank order.
        self._gangs: dict[str, tuple[str, ...]] = {}
        self._changes = ChangeJournal()

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, allocation_id: object) -> bool:
        return allocation_id in self._by_id

    def __getitem__(self, allocation_id: str) -> Allocation:
        return self._by_id[allocation_id]

    def get(self, allocation_id: str) -> Allocation | None:
        return self._by_id.get(allocation_id)

    def values(self) -> ValuesView[Allocation]:
        """Every live allocation, in no set order (for counts and `any`, not for results)."""
        return self._by_id.values()

    def oldest_first(self) -> list[Allocation]:
        return sorted(self._by_id.values(), key=age)

    def holder(self, gpu: GpuRef) -> str | None:
        """The allocation id holding `gpu` (for a shared GPU, the least of its shares' ids), or None."""
        return self._holders.get(gpu)

    def held_gpus(self) -> Mapping[GpuRef, str]:
        return self._holders

    @property
    def shares(self) -> ShareIndex:
        """The GPUs holding shares, their budgets and tenants (read only: kept by `add` and `remove`)."""
        return self._shares

    def on_node(self, node: str) -> list[Allocation]:
        """Live allocations on `node`, oldest first."""
        return sorted((self._by_id[i] for i in self._on_node.get(node, ())), key=age)

    def expiries_due(self, now: float) -> list[Allocation]:
        """Live allocations whose `expires_at` is at or before `now`, oldest first."""
        due = [self._by_id[i] for _, i in itertools.takewhile(lambda e: e[0] <= now, self._expiries)]
        return sorted(due, key=age)

    def next_expiry(self) -> float | None:
        return self._expiries[0][0] if self._expiries else None

    def is_gang(self, gang_id: str) -> bool:
        return gang_id in self._gangs

    def gang(self, gang_id: str) -> tuple[Allocation, ...] | None:
        """A live gang's member leases, rank order, or None when `gang_id` names none."""
        ids = self._gangs.get(gang_id)
        return None if ids is None else tuple(self._by_id[i] for i in ids)

    def unit(self, allocation_id: str) -> tuple[Allocation, ...]:
        """What ends or renews together with `allocation_id`: its gang's members, or itself alone.

        `allocation_id` may name a gang; () when it names nothing live.
        """
        members = self.gang(allocation_id)
        if members is not None:
            return members
        alloc = self._by_id.get(allocation_id)
        if alloc is None:
            return ()
        if alloc.gang is not None:
            return self.gang(alloc.gang.gang_id) or (alloc,)
        return (alloc,)

    def gang_count(self) -> int:
        return len(self._gangs)

    def gang_ports_in_use(self, address: str) -> set[int]:
        """Rendezvous ports live gangs hold at `address` (reads only the live gangs)."""
        ports = set()
        for ids in self._gangs.values():
            gang = self._by_id[ids[0]].gang
            if gang is not None and gang.rendezvous_address == address:
                ports.add(gang.rendezvous_port)
        return ports

    @property
    def holder_version(self) -> int:
        """Bumped whenever a GPU is taken or freed; 0 where none ever was."""
        return self._changes.version

    def holders_changed_since(self, version: int) -> list[str]:
        """Nodes whose held GPUs changed after `holder_version` was `version`, latest first."""
        return self._changes.changed_since(version)

    # ------------------------------------------------------------------ changes

    def add(self, alloc: Allocation) -> None:
        """A new live lease (a gang's members one by one, then `add_gang`)."""
        self._by_id[alloc.allocation_id] = alloc
        if alloc.share_group is not None:
            self._shares.add(alloc)
            # The least id of the GPU's shares stands as its holder (whatever the order they came in).
            self._holders[alloc.gpus[0].ref] = self._shares.tenants(alloc.gpus[0].ref)[0]
        else:
            for gpu in alloc.gpus:
                self._holders[gpu.ref] = alloc.allocation_id
        self._on_node.setdefault(alloc.node, set()).add(alloc.allocation_id)
        self._add_expiry(alloc)
        self._changes.changed(alloc.node)

    def add_gang(self, gang_id: str, member_ids: tuple[str, ...]) -> None:
        """Index the members just added as one gang, rank order."""
        self._gangs[gang_id] = member_ids

    def remove(self, alloc: Allocation) -> list[GpuRef]:
        """End a live lease; returns the GPUs it leaves free (none for a share whose GPU keeps other shares)."""
        del self._by_id[alloc.allocation_id]
        if alloc.gang is not None:
            # Its other members leave in the same apply (whole gangs only).
            self._gangs.pop(alloc.gang.gang_id, None)
        freed: list[GpuRef] = []
        if alloc.share_group is not None and not self._shares.remove(alloc):
            # Other shares stay on the GPU: it stays held, by the least of their ids.
            ref = alloc.gpus[0].ref
            self._holders[ref] = self._shares.tenants(ref)[0]
        else:
            for gpu in alloc.gpus:
                del self._holders[gpu.ref]
                freed.append(gpu.ref)
        on_node = self._on_node[alloc.node]
        on_node.discard(alloc.allocation_id)
        if not on_node:
            del self._on_node[alloc.node]
        self._remove_expiry(alloc)
        self._changes.changed(alloc.node)
        return freed

    def renew(self, fresh: Allocation) -> None:
        """Replace a live lease by its renewed copy (same id and GPUs, a new expiry)."""
        self._remove_expiry(self._by_id[fresh.allocation_id])
        self._by_id[fresh.allocation_id] = fresh
        self._add_expiry(fresh)

    def load(self, allocs: Iterable[Allocation]) -> None:
        """Fill empty indexes at once (a restore): one sort per sorted index instead of an insert per lease."""
        allocs = list(allocs)
        for alloc in allocs:
            self._by_id[alloc.allocation_id] = alloc
            if alloc.share_group is not None:
                self._shares.add(alloc)
            else:
                for gpu in alloc.gpus:
                    self._holders[gpu.ref] = alloc.allocation_id
            self._on_node.setdefault(alloc.node, set()).add(alloc.allocation_id)
        for ref in self._shares.gpus:
            # The same stand-in holder as one-by-one adds and removes would leave: the least id.
            self._holders[ref] = self._shares.tenants(ref)[0]
        self._gangs = _gangs_of(allocs)
        self._expiries = SortedList((a.expires_at, a.allocation_id) for a in allocs if a.expires_at is not None)
        for node in self._on_node:
            self._changes.changed(node)

    def _add_expiry(self, alloc: Allocation) -> None:
        if alloc.expires_at is not None:
            self._expiries.add((alloc.expires_at, alloc.allocation_id))

    def _remove_expiry(self, alloc: Allocation) -> None:
        if alloc.expires_at is not None:
            self._expiries.remove((alloc.expires_at, alloc.allocation_id))



def age(alloc: Allocation) -> tuple[float, str]:
    """The oldest-first order of leases: allocation time, then id."""
    return (alloc.allocated_at, alloc.allocation_id)


def _gangs_of(allocs: Iterable[Allocation]) -> dict[str, tuple[str, ...]]:
    """The gang index of a set of live leases: gang id -> member ids, rank order."""
    ranked: dict[str, list[tuple[int, str]]] = {}
    for alloc in allocs:
        if alloc.gang is not None:
            ranked.setdefault(alloc.gang.gang_id, []).append((alloc.gang.rank, alloc.allocation_id))
    return {gang_id: tuple(i for _, i in sorted(rows)) for gang_id, rows in ranked.items()}
