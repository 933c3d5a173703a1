"""The inventory feed: which GPUs this node schedules, rebuilt node by node as gossip, samples and the table change.

The feed is read by the scheduler on every decision, so it must follow every
change without rebuilding the cluster: each scenario changes one input, reads,
changes it again, and reads again (a feed that stops hearing after its first
rebuild fails the second read).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from coordinator.commands import SetDrain
from coordinator.lease_table import LeaseTable
from coordinator.model import UNHEALTHY, GpuView
from coordinator.commands import ReportGpuHealth
from coordinator.swim_members import MemberView
from coordinator.topology import PIX, NodeTopology, nvlink

from agent.device_sampler import DeviceSampler
from agent.inventory_feed import InventoryFeed
from agent.membership import Member, MembershipService
from agent.node_meta import ROLE_CLIENT, ROLE_SERVER, GpuMeta, NodeMeta

ME = "leader"


class FakeSampler:
    def __init__(self) -> None:
        self.views = [GpuView(ME, 0, "GPU-l0", "H100", 81559)]
        self.topology: NodeTopology | None = None
        self._subscribers: list[Callable[[], None]] = []

    def gpu_views(self) -> Sequence[GpuView]:
        return self.views

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: None

    def sample(self) -> None:
        for callback in self._subscribers:
            callback()


class FakeMembership:
    def __init__(self) -> None:
        self._members: dict[str, Member] = {}
        self._listeners: list[Callable[[str], None]] = []

    def set(
        self, name: str, status: str, role: str = ROLE_CLIENT, gpus: int = 1, topology: NodeTopology | None = None
    ) -> None:
        meta = NodeMeta(
            name, role, "127.0.0.1", 8086, 7946, 7947, "0.1.0",
            gpus=tuple(GpuMeta(i, f"GPU-{name}-{i}", "H100", 81559, None, None, "healthy", False, False) for i in range(gpus)),
            topology=topology,
        )
        view = MemberView(name, ("127.0.0.1", 7946), 0, cast(Any, status), b"meta", 0.0)
        self._members[name] = Member(view, meta, 100.0)
        for listener in self._listeners:
            listener(name)

    def members(self) -> list[Member]:
        return [self._members[n] for n in sorted(self._members)]

    def member(self, name: str) -> Member | None:
        return self._members.get(name)

    def on_change(self, listener: Callable[[str], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: None


def feed(voters: tuple[str, ...] | None = (ME,)) -> tuple[InventoryFeed, FakeSampler, FakeMembership, LeaseTable]:
    sampler, membership, table = FakeSampler(), FakeMembership(), LeaseTable()
    inventory = InventoryFeed(
        ME, cast(DeviceSampler, sampler), cast(MembershipService, membership), lambda: table, lambda: voters
    )
    return inventory, sampler, membership, table


def nodes(inventory: InventoryFeed) -> list[str]:
    return inventory.inventory().nodes()


def test_members_follow_gossip_after_every_read() -> None:
    inventory, _, membership, _ = feed()
    membership.set("client-1", "alive")
    assert nodes(inventory) == sorted([ME, "client-1"])
    membership.set("client-1", "dead")
    assert nodes(inventory) == [ME]
    membership.set("client-1", "alive", gpus=2)
    assert [v.index for v in inventory.inventory().node_views("client-1")] == [0, 1]


def test_only_clients_and_voters_are_scheduled_here() -> None:
    inventory, _, membership, _ = feed(voters=(ME, "server-2"))
    membership.set("server-2", "alive", role=ROLE_SERVER)
    membership.set("blank-server", "alive", role=ROLE_SERVER)  # not added yet, or another cluster's lone agent
    membership.set("client-1", "alive")
    assert nodes(inventory) == sorted([ME, "client-1", "server-2"])


def test_without_a_configuration_every_alive_member_counts() -> None:
    inventory, _, membership, _ = feed(voters=None)
    membership.set("server-2", "alive", role=ROLE_SERVER)
    assert nodes(inventory) == sorted([ME, "server-2"])


def test_a_sample_and_the_tables_drains_and_verdicts_reach_the_views() -> None:
    inventory, sampler, membership, table = feed()
    membership.set("client-1", "alive")
    assert not inventory.inventory().node_views(ME)[0].drained
    table.apply(SetDrain(1.0, ME, 0, True, "maintenance"))
    inventory.note_applied([SetDrain(1.0, ME, 0, True, "maintenance")])
    assert inventory.inventory().node_views(ME)[0].drained
    # A remote GPU the table holds unhealthy is unhealthy whatever its host gossips.
    report = ReportGpuHealth(2.0, "client-1", 0, UNHEALTHY, ("xid 79",))
    table.apply(report)
    inventory.note_applied([report])
    assert inventory.inventory().node_views("client-1")[0].health == UNHEALTHY
    sampler.views = [GpuView(ME, 0, "GPU-l0", "H100", 81559, memory_free_mb=100)]
    sampler.sample()
    assert inventory.inventory().node_views(ME)[0].memory_free_mb == 100
    sampler.views = [GpuView(ME, 0, "GPU-l0", "H100", 81559, memory_free_mb=200)]
    sampler.sample()
    assert inventory.inventory().node_views(ME)[0].memory_free_mb == 200


def test_topologies_follow_the_sampler_and_gossip() -> None:
    inventory, sampler, membership, _ = feed(voters=(ME, "server-2"))
    bridged = NodeTopology({(0, 1): nvlink(4)})
    membership.set("client-1", "alive", gpus=2, topology=bridged)
    assert inventory.inventory().topology("client-1") == bridged
    assert inventory.inventory().topology(ME) is None
    sampler.views = [GpuView(ME, 0, "GPU-l0", "H100", 81559), GpuView(ME, 1, "GPU-l1", "H100", 81559)]
    sampler.topology = NodeTopology({(0, 1): PIX})
    sampler.sample()
    assert inventory.inventory().topology(ME) == sampler.topology
    # A member that stops sending one, or is not scheduled here, has none.
    membership.set("client-1", "alive", gpus=2)
    assert inventory.inventory().topology("client-1") is None
    membership.set("blank-server", "alive", role=ROLE_SERVER, gpus=2, topology=bridged)
    assert inventory.inventory().topology("blank-server") is None
