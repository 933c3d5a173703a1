"""Choosing GPUs by interconnect (coordinator/topology.py), on real machines' matrices.

Each box is written as `nvidia-smi topo -m` prints it (GPU rows, then CPU and
NUMA affinity; the legend: X = self, SYS = across NUMA nodes / sockets, NODE =
between host bridges of one NUMA node, PHB = through a host bridge, PXB =
several PCIe bridges, PIX = at most one PCIe bridge, NV# = # bonded NVLinks),
and parsed by `NodeTopology.from_nvidia_smi`:

- HGX H100: eight SXM H100s behind four NVSwitches (a DGX H100's matrix: every
  pair NV18, GPUs 0-3 on socket 0 and 4-7 on socket 1);
- a 4-GPU PCIe box with NVLink bridges joining 0-1 and 2-3 (e.g. H100 NVL pairs);
- a 2-socket PCIe box of eight L40S: pairs on one switch, pairs of switches
  under one socket, SYS across sockets.
"""

from __future__ import annotations

import msgpack
import pytest

from coordinator.fragmentation import LargestRequest, cluster_largest_request, largest_requests
from coordinator.inventory import Inventory
from coordinator.model import UNHEALTHY, AllocationTopology, GpuRef, GpuView
from coordinator.topology import (
    NODE,
    NVLINK_BASE,
    PHB,
    PIX,
    PXB,
    SYS,
    UNKNOWN,
    NodeTopology,
    format_cpulist,
    link_name,
    link_weight,
    nvlink,
    parse_cpulist,
)

HGX_H100 = NodeTopology.from_nvidia_smi(
    """
        GPU0    GPU1    GPU2    GPU3    GPU4    GPU5    GPU6    GPU7    CPU Affinity    NUMA Affinity
GPU0     X      NV18    NV18    NV18    NV18    NV18    NV18    NV18    0-55,112-167    0
GPU1    NV18     X      NV18    NV18    NV18    NV18    NV18    NV18    0-55,112-167    0
GPU2    NV18    NV18     X      NV18    NV18    NV18    NV18    NV18    0-55,112-167    0
GPU3    NV18    NV18    NV18     X      NV18    NV18    NV18    NV18    0-55,112-167    0
GPU4    NV18    NV18    NV18    NV18     X      NV18    NV18    NV18    56-111,168-223  1
GPU5    NV18    NV18    NV18    NV18    NV18     X      NV18    NV18    56-111,168-223  1
GPU6    NV18    NV18    NV18    NV18    NV18    NV18     X      NV18    56-111,168-223  1
GPU7    NV18    NV18    NV18    NV18    NV18    NV18    NV18     X      56-111,168-223  1
"""
)

PCIE_NVLINK_PAIRS = NodeTopology.from_nvidia_smi(
    """
        GPU0    GPU1    GPU2    GPU3    CPU Affinity    NUMA Affinity
GPU0     X      NV12    PIX     PHB     0-31            0
GPU1    NV12     X      PHB     PIX     0-31            0
GPU2    PIX     PHB      X      NV12    0-31            0
GPU3    PHB     PIX     NV12     X      0-31            0
"""
)

PCIE_2SOCKET = NodeTopology.from_nvidia_smi(
    """
        GPU0    GPU1    GPU2    GPU3    GPU4    GPU5    GPU6    GPU7    CPU Affinity    NUMA Affinity
GPU0     X      PIX     NODE    NODE    SYS     SYS     SYS     SYS     0-31,64-95      0
GPU1    PIX      X      NODE    NODE    SYS     SYS     SYS     SYS     0-31,64-95      0
GPU2    NODE    NODE     X      PIX     SYS     SYS     SYS     SYS     0-31,64-95      0
GPU3    NODE    NODE    PIX      X      SYS     SYS     SYS     SYS     0-31,64-95      0
GPU4    SYS     SYS     SYS     SYS      X      PIX     NODE    NODE    32-63,96-127    1
GPU5    SYS     SYS     SYS     SYS     PIX      X      NODE    NODE    32-63,96-127    1
GPU6    SYS     SYS     SYS     SYS     NODE    NODE     X      PIX     32-63,96-127    1
GPU7    SYS     SYS     SYS     SYS     NODE    NODE    PIX      X      32-63,96-127    1

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
"""
)


def best(topology: NodeTopology, need: int, free: list[int]) -> tuple[int, ...]:
    """The set taken when every free GPU is interchangeable for best fit (one model, all healthy)."""
    return topology.best_set((), free, need, free)


# ---- the matrices read as written


def test_the_matrices_parse_to_link_codes() -> None:
    assert HGX_H100.indices == tuple(range(8))
    assert {HGX_H100.code(a, b) for a in range(8) for b in range(8) if a != b} == {nvlink(18)}
    assert PCIE_NVLINK_PAIRS.code(0, 1) == PCIE_NVLINK_PAIRS.code(3, 2) == nvlink(12)
    assert (PCIE_NVLINK_PAIRS.code(0, 2), PCIE_NVLINK_PAIRS.code(0, 3)) == (PIX, PHB)
    assert (PCIE_2SOCKET.code(0, 1), PCIE_2SOCKET.code(1, 2), PCIE_2SOCKET.code(3, 4)) == (PIX, NODE, SYS)
    # Every level keeps nvidia-smi's word: several switches (PXB) is not one switch (PIX),
    # nor host bridges of one NUMA node (NODE) one host bridge (PHB).
    words = NodeTopology.from_nvidia_smi(
        "  GPU0 GPU1 GPU2 GPU3\nGPU0 X PXB NODE PIX\nGPU1 PXB X PHB SYS\nGPU2 NODE PHB X PXB\nGPU3 PIX SYS PXB X\n"
    )
    assert [words.code(0, b) for b in (1, 2, 3)] == [PXB, NODE, PIX]
    assert (words.code(1, 2), words.code(1, 3)) == (PHB, SYS)
    assert NodeTopology.from_nvidia_smi(words.matrix()) == words
    assert PCIE_2SOCKET.numa_node(5) == 1 and PCIE_2SOCKET.cpu_list(5) == "32-63,96-127"


def test_every_nvlink_pair_outweighs_every_pcie_pair_and_levels_keep_their_order() -> None:
    levels = (nvlink(1), PIX, PXB, PHB, NODE, SYS, UNKNOWN)  # best first: the order shapes.md documents
    weights = [link_weight(code) for code in levels]
    assert weights == sorted(weights, reverse=True) and len(set(weights)) == len(weights)
    assert list(levels[1:]) == sorted(levels[1:], reverse=True)  # a higher code is a better link
    assert link_weight(nvlink(18)) == 450 and link_weight(nvlink(12)) == 300  # 25 GB/s a link
    assert [link_name(c) for c in (nvlink(18), *levels[1:])] == ["NV18", "PIX", "PXB", "PHB", "NODE", "SYS", "?"]
    with pytest.raises(ValueError):
        nvlink(0)


def test_unreadable_matrices_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown link"):
        NodeTopology.from_nvidia_smi("  GPU0 GPU1\nGPU0 X QPI\nGPU1 QPI X\n")
    with pytest.raises(ValueError, match="disagree"):
        NodeTopology.from_nvidia_smi("  GPU0 GPU1\nGPU0 X PIX\nGPU1 SYS X\n")


def test_cpulists_round_trip() -> None:
    assert parse_cpulist("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert format_cpulist({8, 7, 5, 2, 1, 0}) == "0-2,5,7-8"
    assert format_cpulist(parse_cpulist("0-55,112-167")) == "0-55,112-167"
    with pytest.raises(ValueError):
        parse_cpulist("0-3,x")
    with pytest.raises(ValueError):
        parse_cpulist("5-3")


# ---- best sets


def test_hgx_any_set_is_all_nvlink_and_the_lowest_indices_win() -> None:
    # NVSwitch: every pair alike, so the rank ties and the lowest indices are taken.
    assert best(HGX_H100, 4, list(range(8))) == (0, 1, 2, 3)
    assert HGX_H100.describe((0, 1, 2, 3)) == AllocationTopology(
        score=6 * 450, links="NV18", numa_node=0, cpu_list="0-55,112-167"
    )
    # Across the two sockets the NVLink set stays whole; the CPUs are both sockets'.
    assert HGX_H100.describe((2, 3, 4, 5)) == AllocationTopology(
        score=6 * 450, links="NV18", numa_node=None, cpu_list="0-223"
    )


def test_pairs_box_two_gpus_take_a_bridged_pair_and_leave_the_other_whole() -> None:
    assert best(PCIE_NVLINK_PAIRS, 2, [0, 1, 2, 3]) == (0, 1)
    assert PCIE_NVLINK_PAIRS.describe((0, 1)).links == "NV12"
    # With GPU 1 leased, the 2-3 bridge beats 0-2 (one switch) and 0-3 (the host bridge).
    assert best(PCIE_NVLINK_PAIRS, 2, [0, 2, 3]) == (2, 3)


def test_pairs_box_one_gpu_goes_where_its_partner_is_already_gone() -> None:
    # GPU 0 is leased: taking GPU 1 leaves the 2-3 bridge whole; taking 2 or 3 would break it.
    assert best(PCIE_NVLINK_PAIRS, 1, [1, 2, 3]) == (1,)
    assert best(PCIE_NVLINK_PAIRS, 1, [0, 1, 3]) == (3,)


def test_pairs_box_three_gpus_keep_a_bridge_and_the_switch() -> None:
    # Every 3-set has a PHB pair (the weakest); among them the sums tie, and the lowest indices win.
    chosen = best(PCIE_NVLINK_PAIRS, 3, [0, 1, 2, 3])
    assert chosen == (0, 1, 2)
    assert PCIE_NVLINK_PAIRS.describe(chosen) == AllocationTopology(
        score=300 + 16 + 8, links="PHB", numa_node=0, cpu_list="0-31"
    )


def test_two_socket_box_four_gpus_stay_on_one_socket() -> None:
    assert best(PCIE_2SOCKET, 4, list(range(8))) == (0, 1, 2, 3)
    # Socket 0 half taken: a socket-1 quad beats any set that crosses.
    assert best(PCIE_2SOCKET, 4, [1, 3, 4, 5, 6, 7]) == (4, 5, 6, 7)
    # Its weakest pairs cross between the socket's two switches: NODE, as nvidia-smi says.
    assert PCIE_2SOCKET.describe((4, 5, 6, 7)) == AllocationTopology(
        score=2 * 16 + 4 * 6, links="NODE", numa_node=1, cpu_list="32-63,96-127"
    )


def test_two_socket_box_pairs_take_a_switch_and_leave_whole_switches() -> None:
    assert best(PCIE_2SOCKET, 2, list(range(8))) == (0, 1)
    # GPUs 0 and 2 leased: 1-3 (NODE) loses to 4-5 (PIX), which leaves 6-7 on their switch.
    assert best(PCIE_2SOCKET, 2, [1, 3, 4, 5, 6, 7]) == (4, 5)
    # One GPU: the one whose switch partner is gone, so no switch pair breaks.
    assert best(PCIE_2SOCKET, 1, [1, 2, 3, 4, 5, 6, 7]) == (1,)


def test_forced_gpus_are_always_in_the_set() -> None:
    # Best fit must take GPU 4 (say, the only smaller one); the rest join it on its socket.
    assert PCIE_2SOCKET.best_set((4,), (0, 1, 2, 3, 5, 6, 7), 2, range(8)) == (4, 5)
    assert PCIE_2SOCKET.best_set((4,), (0, 1, 2, 3, 5, 6, 7), 4, range(8)) == (4, 5, 6, 7)
    with pytest.raises(ValueError):
        PCIE_2SOCKET.best_set((4,), (5,), 3, range(8))
    with pytest.raises(ValueError, match="among the free"):
        PCIE_2SOCKET.best_set((4,), (5, 6), 2, (5, 6))


def test_unknown_links_rank_below_every_known_one() -> None:
    # GPU 2's links were not readable: a pair without it is preferred, even across sockets.
    topology = NodeTopology({(0, 1): SYS, (0, 2): UNKNOWN, (1, 2): UNKNOWN})
    assert best(topology, 2, [0, 1, 2]) == (0, 1)
    assert topology.describe((0, 2)).links == "?"


def test_a_sixteen_gpu_node_falls_back_to_the_greedy_search() -> None:
    # Two 8-GPU NVSwitch islands joined over PCIe across sockets (16 choose 8 = 12870 sets).
    links = {
        (a, b): nvlink(18) if a // 8 == b // 8 else SYS for a in range(16) for b in range(a + 1, 16)
    }
    topology = NodeTopology(links)
    free = list(range(16))
    assert best(topology, 8, free) == tuple(range(8))
    assert best(topology, 8, [1, 2, 3, *range(8, 16)]) == tuple(range(8, 16))
    assert best(topology, 4, [0, 1, 2, *range(8, 16)]) == (8, 9, 10, 11)


def test_answers_are_memoized_and_bounded() -> None:
    topology = NodeTopology({(a, b): nvlink(4) if b == a + 1 else PIX for a in range(8) for b in range(a + 1, 8)})
    first = best(topology, 3, list(range(8)))
    assert best(topology, 3, list(range(8))) is first


# ---- fragmentation figures


def test_largest_nvlink_set_on_each_box() -> None:
    assert HGX_H100.largest_nvlink_set(range(8)) == 8
    assert HGX_H100.largest_nvlink_set([1, 5, 6]) == 3
    assert PCIE_NVLINK_PAIRS.largest_nvlink_set(range(4)) == 2
    assert PCIE_NVLINK_PAIRS.largest_nvlink_set([0, 3]) == 1
    assert PCIE_2SOCKET.largest_nvlink_set(range(8)) == 1  # no NVLink at all: any one GPU
    assert PCIE_2SOCKET.largest_nvlink_set([]) == 0


# ---- the gossip form


def test_wire_round_trip_and_size() -> None:
    for topology in (HGX_H100, PCIE_NVLINK_PAIRS, PCIE_2SOCKET):
        wire = topology.to_wire()
        assert NodeTopology.from_wire(msgpack.unpackb(msgpack.packb(wire))) == topology
    assert len(msgpack.packb(PCIE_2SOCKET.to_wire())) < 100


def test_agents_of_either_version_read_each_others_wire_form() -> None:
    # Agents before PXB and NODE read five lists of codes 0-3 (and NVLink) and refuse the rest.
    fine = NodeTopology({(0, 1): PXB, (0, 2): NODE, (1, 2): nvlink(4)}, {0: 0, 1: 0, 2: 0})
    wire = fine.to_wire()
    assert wire[1] == [3, 2, NVLINK_BASE + 4] and wire[5] == [0, 1]
    # An older agent reads the first five: one switch and one host bridge, as it always did.
    assert NodeTopology.from_wire(wire[:5]) == NodeTopology(
        {(0, 1): PIX, (0, 2): PHB, (1, 2): nvlink(4)}, {0: 0, 1: 0, 2: 0}
    )
    # An older agent's form (no sixth list) reads the same way here.
    assert NodeTopology.from_wire([[0, 1], [1], [None, None], [], [None, None]]).code(0, 1) == SYS


@pytest.mark.parametrize(
    "wire",
    [
        "nope",
        [[0, 1], [], [None, None], [], [None, None]],  # a pair's code missing
        [[1, 0], [2], [None, None], [], [None, None]],  # indices out of order
        [[0, 1], [7], [None, None], [], [None, None]],  # 7 is no code
        [[0, 1], [2], [None, None], [], [0, None]],  # cpulist #0 absent
        [[0, 1], [2], [None, None], ["0-3,"], [0, 0]],  # not a cpulist
        [[0, 1], [True], [None, None], [], [None, None]],
        [[0, 1], [5], [None, None], [], [None, None]],  # PIX's own code is never gossiped: 3 is
        [[0, 1], [3], [None, None], [], [None, None], [1]],  # refined pair #1 absent
        [[0, 1], [1], [None, None], [], [None, None], [0]],  # SYS has no finer level
        [[0, 1], [3], [None, None], [], [None, None], 0],
    ],
)
def test_bad_wire_forms_are_refused(wire: object) -> None:
    with pytest.raises(ValueError):
        NodeTopology.from_wire(wire)


def test_equal_by_value() -> None:
    again = NodeTopology.from_nvidia_smi(PCIE_NVLINK_PAIRS.matrix())
    assert again == PCIE_NVLINK_PAIRS and hash(again) == hash(PCIE_NVLINK_PAIRS)
    assert again != HGX_H100
    assert NVLINK_BASE + 12 == PCIE_NVLINK_PAIRS.code(0, 1)


# ---- fragmentation, as the metrics and gpuctl status show it


def test_largest_requests_per_node_and_for_the_cluster() -> None:
    def views(node: str, count: int, unhealthy: int | None = None) -> list[GpuView]:
        return [
            GpuView(node, i, f"GPU-{node}-{i}", "H100", 81559, health=UNHEALTHY if i == unhealthy else "healthy")
            for i in range(count)
        ]

    inventory = Inventory.of([*views("hgx", 8), *views("pairs", 4, unhealthy=3), *views("plain", 2)])
    inventory.set_topology("hgx", HGX_H100)
    inventory.set_topology("pairs", PCIE_NVLINK_PAIRS)
    held = {GpuRef("hgx", i) for i in (0, 1, 2)} | {GpuRef("pairs", 0)}

    per_node = largest_requests(inventory, lambda ref: ref in held, {})

    # Any free GPU takes a share of its whole memory; no node has MIG slices.
    assert per_node == {
        "hgx": LargestRequest(gpus=5, nvlink=5, share_mb=81559),
        # 1 and 2 are free, but only PHB apart; 3 is unhealthy.
        "pairs": LargestRequest(gpus=2, nvlink=1, share_mb=81559),
        "plain": LargestRequest(gpus=2, nvlink=None, share_mb=81559),
    }
    assert cluster_largest_request(per_node.values()) == LargestRequest(gpus=5, nvlink=5, share_mb=81559)
    assert cluster_largest_request([LargestRequest(1, None)]) == LargestRequest(1, None)
    assert cluster_largest_request([]) == LargestRequest(0, None)


def test_nic_columns_and_the_gpu_numa_id_column_of_newer_drivers_are_skipped() -> None:
    # The shape of a DGX H100's output (NICs trimmed to two) on driver 550+, and a lone H200.
    dgx = NodeTopology.from_nvidia_smi(
        """
        GPU0    GPU1    NIC0    NIC1    CPU Affinity    NUMA Affinity   GPU NUMA ID
GPU0     X      NV18    PXB     SYS     0-55,112-167    0               N/A
GPU1    NV18     X      SYS     PXB     56-111,168-223  1               N/A
NIC0    PXB     SYS      X      SYS
NIC1    SYS     PXB     SYS      X

Legend:

  X    = Self
NIC Legend:

  NIC0: mlx5_0
"""
    )
    assert dgx == NodeTopology({(0, 1): nvlink(18)}, {0: 0, 1: 1}, {0: "0-55,112-167", 1: "56-111,168-223"})
    lone = NodeTopology.from_nvidia_smi("\tGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\nGPU0\t X \t0-15\t0\t\tN/A\n")
    assert lone.indices == (0,) and lone.cpu_list(0) == "0-15" and lone.numa_node(0) == 0
