"""The scheduler on nodes that report their topology: which GPUs a lease gets, and what it says about them.

The rules (placement.py, coordinator/topology.py): best fit chooses the node
and which GPUs are interchangeable (health first, then the least memory); the
node's topology chooses among those the best-connected set, leaving the
node's other free GPUs best connected. Without a topology, the lowest indices.
"""

from __future__ import annotations

import random

from coordinator.commands import Allocate, Command, Renew
from coordinator.model import DEGRADED, Allocation, AllocationTopology
from coordinator.placement import OpenGpus, Placement, PlanWalk
from coordinator.scheduler import Scheduler, SchedulerConfig
from coordinator.topology import NodeTopology

from tests.unit.test_scheduler import A100_40, A100_40_MB, Cluster, gpu, node, req
from tests.unit.test_topology import HGX_H100, PCIE_2SOCKET, PCIE_NVLINK_PAIRS


def with_topology(cluster: Cluster, node_name: str, topology: NodeTopology) -> Cluster:
    cluster.inventory.set_topology(node_name, topology)
    return cluster


def granted(command: Command) -> Allocation:
    assert isinstance(command, Allocate), command
    return command.allocation


def indices(alloc: Allocation) -> list[int]:
    return [g.index for g in alloc.gpus]


def test_a_pair_takes_a_bridge_and_the_next_pair_takes_the_other() -> None:
    cluster = with_topology(Cluster(node("pairs", 4)), "pairs", PCIE_NVLINK_PAIRS)

    first = granted(cluster.admit(req("a", gpus=2)))
    second = granted(cluster.admit(req("b", gpus=2)))

    assert (indices(first), indices(second)) == ([0, 1], [2, 3])
    assert first.topology == AllocationTopology(score=300, links="NV12", numa_node=0, cpu_list="0-31")


def test_single_gpus_fill_one_bridge_before_breaking_the_other() -> None:
    cluster = with_topology(Cluster(node("pairs", 4)), "pairs", PCIE_NVLINK_PAIRS)
    cluster.hold("held", "pairs", [2])

    # The lowest index would be GPU 0 and break the whole 0-1 bridge; GPU 3 is
    # the partner of a leased GPU, so taking it leaves the bridge for a pair.
    single = granted(cluster.admit(req("single")))
    pair = granted(cluster.admit(req("pair", gpus=2)))

    assert (indices(single), indices(pair)) == ([3], [0, 1])
    assert single.topology == AllocationTopology(score=0, links=None, numa_node=0, cpu_list="0-31")


def test_on_two_sockets_four_gpus_stay_on_one() -> None:
    cluster = with_topology(Cluster(node("box", 8)), "box", PCIE_2SOCKET)
    cluster.hold("held-0", "box", [0])
    cluster.hold("held-2", "box", [2])

    quad = granted(cluster.admit(req("quad", gpus=4)))

    assert indices(quad) == [4, 5, 6, 7]
    assert quad.topology == AllocationTopology(score=56, links="NODE", numa_node=1, cpu_list="32-63,96-127")


def test_health_comes_before_topology() -> None:
    # GPU 1 is degraded: the healthy bridge 2-3 is taken rather than the bridge 0-1.
    views = node("pairs", 4)
    views[1] = gpu("pairs", 1, health=DEGRADED)
    cluster = with_topology(Cluster(views), "pairs", PCIE_NVLINK_PAIRS)
    assert indices(granted(cluster.admit(req("a", gpus=2)))) == [2, 3]

    # GPUs 1 and 3 degraded: two healthy GPUs beat any bridge, however poorly they are wired.
    views[3] = gpu("pairs", 3, health=DEGRADED)
    cluster = with_topology(Cluster(views), "pairs", PCIE_NVLINK_PAIRS)
    alloc = granted(cluster.admit(req("a", gpus=2)))
    assert indices(alloc) == [0, 2]
    assert alloc.topology is not None and alloc.topology.links == "PIX"


def test_memory_comes_before_topology() -> None:
    # GPUs 0 and 2 are smaller, and big enough: best fit keeps the big ones for big jobs.
    views = [gpu("mixed", i, name=A100_40, memory_mb=A100_40_MB) if i in (0, 2) else gpu("mixed", i) for i in range(4)]
    cluster = with_topology(Cluster(views), "mixed", PCIE_NVLINK_PAIRS)
    assert indices(granted(cluster.admit(req("a", gpus=2, memory_mb=1024)))) == [0, 2]
    # Three GPUs: both small ones, and the big one that joins them best (1: NVLink to 0).
    cluster = with_topology(Cluster(views), "mixed", PCIE_NVLINK_PAIRS)
    assert indices(granted(cluster.admit(req("b", gpus=3, memory_mb=1024)))) == [0, 1, 2]


def test_the_node_is_best_fit_s_choice_whatever_the_topology() -> None:
    # "a" fits exactly on the 2-GPU node without topology; the pairs box would strand two.
    cluster = with_topology(Cluster([*node("a", 2), *node("pairs", 4)]), "pairs", PCIE_NVLINK_PAIRS)
    alloc = granted(cluster.admit(req("x", gpus=2)))
    assert alloc.node == "a" and alloc.topology is None


def test_without_topology_the_lowest_indices() -> None:
    cluster = Cluster(node("plain", 4))
    cluster.hold("held", "plain", [0])
    alloc = granted(cluster.admit(req("a")))
    assert indices(alloc) == [1] and alloc.topology is None


def test_the_topology_travels_in_the_log_and_survives_renewal() -> None:
    cluster = with_topology(Cluster(node("pairs", 4)), "pairs", PCIE_NVLINK_PAIRS)
    command = cluster.admit(req("a", gpus=2, ttl_s=60.0))
    alloc = granted(command)
    assert Allocation.from_wire(alloc.to_wire()) == alloc
    cluster.apply(Renew(1.0, alloc.allocation_id, 120.0))
    renewed = cluster.table.allocation(alloc.allocation_id)
    assert renewed is not None and renewed.expires_at == 120.0 and renewed.topology == alloc.topology


def test_records_without_topology_encode_as_before() -> None:
    cluster = Cluster(node("plain", 2))
    alloc = granted(cluster.admit(req("a")))
    assert "topology" not in alloc.to_wire()


def test_a_removed_node_forgets_its_topology() -> None:
    cluster = with_topology(Cluster(node("pairs", 4)), "pairs", PCIE_NVLINK_PAIRS)
    cluster.inventory.remove_node("pairs")
    assert cluster.inventory.topology("pairs") is None
    cluster.inventory.set_topology("ghost", PCIE_NVLINK_PAIRS)
    assert cluster.inventory.topology("ghost") is None


# ---- across nodes: the link class at equal stranding (SchedulerConfig.nvlink_first_gpus)


def nvlink_first(cluster: Cluster, gpus: int = 4) -> Cluster:
    """`cluster` with a scheduler whose requests of `gpus` or more prefer an all-NVLink set."""
    cluster.scheduler = Scheduler(SchedulerConfig(nvlink_first_gpus=gpus), random.Random(1))
    return cluster


def pairs_and_half_used_hgx(*, gpus: int = 4) -> Cluster:
    """A 4-GPU PCIe box of bridged pairs and an HGX box with four GPUs leased: both take 4 GPUs, stranding none.

    Best fit alone takes "a-pairs" by name, where 4 GPUs cannot all be NVLink-joined.
    """
    cluster = nvlink_first(Cluster([*node("a-pairs", 4), *node("b-hgx", 8)]), gpus)
    cluster.inventory.set_topology("a-pairs", PCIE_NVLINK_PAIRS)
    cluster.inventory.set_topology("b-hgx", HGX_H100)
    cluster.hold("held", "b-hgx", [0, 1, 2, 3])
    return cluster


def test_four_gpus_go_where_their_set_is_all_nvlink_when_both_strand_as_many() -> None:
    quad = granted(pairs_and_half_used_hgx().admit(req("quad", gpus=4)))
    assert quad.node == "b-hgx" and indices(quad) == [4, 5, 6, 7]
    assert quad.topology is not None and quad.topology.links == "NV18"


def test_off_by_default_best_fit_s_node_stands() -> None:
    cluster = pairs_and_half_used_hgx(gpus=0)
    assert granted(cluster.admit(req("quad", gpus=4))).node == "a-pairs"


def test_stranding_comes_before_the_link_class() -> None:
    # A whole HGX box would strand four GPUs: the pairs box, an exact fit, wins.
    cluster = nvlink_first(Cluster([*node("a-pairs", 4), *node("b-hgx", 8)]))
    cluster.inventory.set_topology("a-pairs", PCIE_NVLINK_PAIRS)
    cluster.inventory.set_topology("b-hgx", HGX_H100)
    quad = granted(cluster.admit(req("quad", gpus=4)))
    assert quad.node == "a-pairs" and quad.topology is not None and quad.topology.links == "PHB"


def test_health_comes_before_the_link_class() -> None:
    views = [*node("a-pairs", 4), *node("b-hgx", 8)]
    views[4 + 5] = gpu("b-hgx", 5, health=DEGRADED)
    cluster = nvlink_first(Cluster(views))
    cluster.inventory.set_topology("a-pairs", PCIE_NVLINK_PAIRS)
    cluster.inventory.set_topology("b-hgx", HGX_H100)
    cluster.hold("held", "b-hgx", [0, 1, 2, 3])
    assert granted(cluster.admit(req("quad", gpus=4))).node == "a-pairs"


def test_smaller_requests_keep_best_fit_s_node() -> None:
    # Below the threshold: the first node by name among those stranding as many, as without it.
    assert granted(pairs_and_half_used_hgx().admit(req("one"))).node == "a-pairs"
    assert granted(pairs_and_half_used_hgx().admit(req("two", gpus=2))).node == "a-pairs"
    # At it, two GPUs on the pairs box are a bridged pair already: all-NVLink there, so the name decides.
    assert granted(pairs_and_half_used_hgx(gpus=2).admit(req("two", gpus=2))).node == "a-pairs"


def test_among_all_nvlink_nodes_the_name_decides() -> None:
    cluster = nvlink_first(Cluster([*node("a-pairs", 4), *node("b-hgx", 8), *node("c-hgx", 8)]))
    for name, topology in (("a-pairs", PCIE_NVLINK_PAIRS), ("b-hgx", HGX_H100), ("c-hgx", HGX_H100)):
        cluster.inventory.set_topology(name, topology)
    cluster.hold("held-b", "b-hgx", [0, 1, 2, 3])
    cluster.hold("held-c", "c-hgx", [0, 1, 2, 3])
    assert granted(cluster.admit(req("quad", gpus=4))).node == "b-hgx"


def test_a_topology_reported_later_counts_at_once() -> None:
    # The scheduler indexes nodes by their NVLink-joined open GPUs: a wiring that arrives
    # after their GPUs were indexed must reach that index (the inventory journals it).
    cluster = nvlink_first(Cluster([*node("a-pairs", 4), *node("b-hgx", 8), *node("c-one", 1)]))
    cluster.hold("held", "b-hgx", [0, 1, 2, 3])
    assert granted(cluster.admit(req("one"))).node == "c-one"
    cluster.inventory.set_topology("a-pairs", PCIE_NVLINK_PAIRS)
    cluster.inventory.set_topology("b-hgx", HGX_H100)
    assert granted(cluster.admit(req("quad", gpus=4))).node == "b-hgx"


def test_the_nvlink_index_follows_placements_and_undo() -> None:
    # OpenGpus files each node by its largest NVLink-joined set of open GPUs: after a
    # pass that placed, and after its undo, it must read as one rebuilt from scratch.
    cluster = nvlink_first(Cluster([*node("a-pairs", 4), *node("b-hgx", 8)]))
    cluster.inventory.set_topology("a-pairs", PCIE_NVLINK_PAIRS)
    cluster.inventory.set_topology("b-hgx", HGX_H100)
    cluster.hold("held", "a-pairs", [0])

    def rebuilt() -> dict[int, list[tuple[int, str]]]:
        fresh = OpenGpus()
        for name in cluster.inventory.nodes():
            fresh.refresh(name, cluster.table, cluster.inventory)
        return {k: list(v) for k, v in fresh.nvlink_nodes.items()}

    index = OpenGpus()
    for name in cluster.inventory.nodes():
        index.refresh(name, cluster.table, cluster.inventory)
    before = rebuilt()
    assert before == {2: [(3, "a-pairs")], 8: [(8, "b-hgx")]}

    walk = PlanWalk(index, cluster.table, cluster.inventory, nvlink_first_gpus=4)
    placed = walk.step(req("five", gpus=5))
    assert isinstance(placed, Placement) and placed.node == "b-hgx"
    assert {k: list(v) for k, v in index.nvlink_nodes.items()} == {2: [(3, "a-pairs")], 3: [(3, "b-hgx")]}
    walk.undo()
    assert {k: list(v) for k, v in index.nvlink_nodes.items()} == before
