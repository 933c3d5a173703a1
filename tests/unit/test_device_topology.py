"""How the sampler turns the backend's links and affinities into a NodeTopology, and when it reads them.

The topology is read with the first sample and again only when the set of
answering GPUs changes (a GPU lost, or back); a backend that cannot say keeps
the sample going.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import trio

from coordinator.topology import NODE, PHB, PIX, PXB, SYS, UNKNOWN, NodeTopology, nvlink

from agent.device_sampler import DeviceSampler, node_topology
from agent.devices import DeviceError, GpuAffinity, GpuLink, SimulatedDevices, parse_simulate_spec
from agent.devices.simulated import SIMULATED_HOSTS


@pytest.mark.parametrize("name", sorted(SIMULATED_HOSTS))
def test_a_simulated_host_reads_back_as_its_matrix(name: str) -> None:
    host = SIMULATED_HOSTS[name]
    devices = SimulatedDevices(parse_simulate_spec(name), seed=1, topology=host.topology)
    devices.open()

    assert node_topology(devices.topology(), devices.affinity()) == host.topology


def test_relations_become_link_codes() -> None:
    links = [
        GpuLink(0, 1, "nvlink", 4),
        GpuLink(0, 2, "same_board", 0),
        GpuLink(0, 3, "pcie_switch", None),
        GpuLink(1, 2, "host_bridge", 0),
        GpuLink(1, 3, "cross_cpu", 0),
        GpuLink(2, 3, "unknown", None),
    ]
    topology = node_topology(links, [])
    assert topology is not None
    assert [topology.code(a, b) for a, b in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))] == [
        nvlink(4), PIX, PIX, PHB, SYS, UNKNOWN
    ]
    # Several switches and several host bridges of one NUMA node keep their own levels.
    finer = node_topology([GpuLink(0, 1, "pcie_switches", 0), GpuLink(0, 2, "numa_node", 0)], [])
    assert finer is not None and (finer.code(0, 1), finer.code(0, 2)) == (PXB, NODE)


def test_nothing_known_is_no_topology_and_a_bad_cpulist_is_unknown() -> None:
    assert node_topology([], []) is None
    topology = node_topology([], [GpuAffinity(0, 1, "0-3,oops")])
    assert topology is not None and topology.numa_node(0) == 1 and topology.cpu_list(0) is None


class CountingDevices(SimulatedDevices):
    """A simulated fleet that counts topology reads and can refuse them."""

    def __init__(self) -> None:
        super().__init__(parse_simulate_spec("pcie-nvlink-pairs"), seed=1, topology=SIMULATED_HOSTS["pcie-nvlink-pairs"].topology)
        self.reads: Counter[str] = Counter()
        self.refuse = False

    def topology(self) -> list[GpuLink]:
        self.reads["topology"] += 1
        if self.refuse:
            raise DeviceError("NVML failed: topology (test)")
        return super().topology()


def test_the_sampler_reads_the_topology_when_the_gpus_change() -> None:
    devices = CountingDevices()
    clock = iter(float(i) for i in range(100))
    sampler = DeviceSampler(devices, "pairs", interval_s=1.0, timeout_s=5.0, clock=lambda: next(clock), rng=random.Random(1))

    async def scenario() -> None:
        await sampler.open()
        assert sampler.topology == SIMULATED_HOSTS["pcie-nvlink-pairs"].topology
        await sampler.sample_once()
        assert devices.reads["topology"] == 1  # the same GPUs: not read again
        devices.remove_gpu(1)
        devices.refuse = True
        assert await sampler.sample_once()  # the sample stands though the topology failed
        assert sampler.topology is not None and sampler.topology.indices == (0, 1, 2, 3)
        devices.refuse = False
        await sampler.sample_once()
        assert devices.reads["topology"] == 3
        assert sampler.topology is not None and sampler.topology.indices == (0, 2, 3)
        assert isinstance(sampler.topology, NodeTopology)

    trio.run(scenario)
