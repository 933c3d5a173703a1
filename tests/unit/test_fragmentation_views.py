"""Fragmentation made visible: the leader's metrics and `gpuctl status` (coordinator/fragmentation.py).

One cluster with a MIG-mode GPU beside a whole one, a slice and a share leased
through the scheduler as the agent does; then what a scrape exports and what
gpuctl prints from the status summary's `largest_request` objects.
"""

from __future__ import annotations

import random

from coordinator.fragmentation import cluster_largest_request, largest_requests

from agent.device_sampler import DeviceSampler
from agent.devices.simulated import SimulatedDevices, parse_simulate_spec
from agent.gpuctl_render import render_status, render_status_summary
from agent.metrics import StateCollector
from tests.unit.test_gpuctl_queues import NOW, rows
from tests.unit.test_mig_scheduling import Cluster, request, slices, whole
from tests.unit.test_shares import share


def fleet() -> Cluster:
    """Node a: a MIG GPU (3g.40gb, 2g.20gb, two 1g.10gb) and a whole A100; node b: two whole A100s."""
    cluster = Cluster(
        [*slices("a", 0, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]), whole("a", 1), whole("b", 0), whole("b", 1)]
    )
    cluster.placed(request("slice", mig="1g.10gb"))
    cluster.placed(request("pinned", node="b"))
    cluster.placed(share("tenant", 30_000, node="b"))  # opens b's other GPU to sharing
    return cluster


def collector(cluster: Cluster, *, leader: bool) -> StateCollector:
    """The agent's scrape-time collector over `cluster`'s table and inventory."""
    sampler = DeviceSampler(
        SimulatedDevices(parse_simulate_spec("1xA100-80GB"), seed=1),
        "a",
        interval_s=1.0,
        timeout_s=1.0,
        clock=lambda: NOW,
        rng=random.Random(1),
    )
    return StateCollector(
        node_name="a",
        sampler=sampler,
        table=lambda: cluster.table,
        clock=lambda: NOW,
        is_leader=lambda: leader,
        term=lambda: 2,
        members=lambda: {"alive": 2},
        outbox_pending=lambda: 0,
        inventory=lambda: cluster.inventory,
    )


FRAGMENTATION_SERIES = ("largest_request_gpus", "free_mig_instances", "largest_share_bytes")


def scrape(cluster: Cluster, *, leader: bool = True) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The fragmentation series a scrape exports: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector(cluster, leader=leader).collect()
        if family.name.endswith(FRAGMENTATION_SERIES)
        for sample in family.samples
    }


def summary_payload(cluster: Cluster) -> dict[str, object]:
    """GET /gpu/status?summary=true as the agent builds it (agent/context.py), fragmentation figures included."""
    per_node = largest_requests(
        cluster.inventory, lambda ref: cluster.table.holder(ref) is not None, cluster.table.shares.gpus
    )
    return {
        "summary": {
            "nodes": 2, "gpus": 4, "allocated": 2, "unhealthy": 0, "drained": 0,
            "largest_request": cluster_largest_request(per_node.values()).to_wire(),
        },
        "nodes": [
            {"node": node, "gpus": 2, "allocated": 1, "unhealthy": 0, "drained": 0, "scheduled_here": True,
             "largest_request": largest.to_wire()}
            for node, largest in per_node.items()
        ],
    }


def test_the_leader_exports_free_mig_instances_and_the_largest_share() -> None:
    found = scrape(fleet())
    mib = 1024 * 1024

    assert {labels: v for (name, labels), v in found.items() if name == "gpu_orchestrator_node_free_mig_instances"} == {
        (("node", "a"), ("profile", "1g.10gb")): 1.0,
        (("node", "a"), ("profile", "2g.20gb")): 1.0,
        (("node", "a"), ("profile", "3g.40gb")): 1.0,
    }
    assert {labels: v for (name, labels), v in found.items() if name == "gpu_orchestrator_cluster_free_mig_instances"} == {
        (("profile", "1g.10gb"),): 1.0,
        (("profile", "2g.20gb"),): 1.0,
        (("profile", "3g.40gb"),): 1.0,
    }
    # a: its whole GPU is free (80 GiB); b: both GPUs held, one shared with 81,920 - 30,000 MB left.
    assert found[("gpu_orchestrator_node_largest_share_bytes", (("node", "a"),))] == 81920 * mib
    assert found[("gpu_orchestrator_node_largest_share_bytes", (("node", "b"),))] == 51920 * mib
    assert found[("gpu_orchestrator_cluster_largest_share_bytes", ())] == 81920 * mib
    assert found[("gpu_orchestrator_node_largest_request_gpus", (("node", "b"), ("shape", "gpus")))] == 0.0
    assert found[("gpu_orchestrator_cluster_largest_request_gpus", (("shape", "gpus"),))] == 1.0


def test_a_follower_exports_no_fragmentation_figures() -> None:
    """Only the leader's table knows what every lease holds (agent/metrics.py): sums never double count."""
    cluster = fleet()
    assert scrape(cluster, leader=True) and not scrape(cluster, leader=False)


def test_status_summary_shows_fits_nvlink_share_and_free_mig_per_node() -> None:
    out = render_status_summary(summary_payload(fleet()), NOW)

    by_node = {row["NODE"]: row for row in rows(out)}
    assert by_node["a"] | {"GPUS": "2", "LEASED": "1", "FITS": "1", "NVLINK": "-", "SHARE": "80.0 GiB",
                           "MIG": "1g.10gb:1,2g.20gb:1,3g.40gb:1"} == by_node["a"]
    assert by_node["b"] | {"FITS": "0", "NVLINK": "-", "SHARE": "50.7 GiB", "MIG": "-"} == by_node["b"]
    assert "largest request now: 1 GPU(s); a share of 80.0 GiB; MIG 1g.10gb:1,2g.20gb:1,3g.40gb:1" in out


def test_the_columns_say_none_free_and_unknown_apart() -> None:
    nodes = [
        {"node": "full", "gpus": 8, "largest_request": {"gpus": 0, "nvlink": 0, "mig": {"1g.10gb": 0}, "share_mb": 0}},
        {"node": "hgx", "gpus": 8, "largest_request": {"gpus": 8, "nvlink": 8, "mig": None, "share_mb": 81559}},
    ]
    out = render_status_summary({"summary": {"nodes": 2, "gpus": 16}, "nodes": nodes}, NOW)
    by_node = {row["NODE"]: row for row in rows(out)}
    # MIG "0": the node has slices, none free; "-": no MIG there. SHARE "-": no share fits.
    assert (by_node["full"]["FITS"], by_node["full"]["NVLINK"], by_node["full"]["SHARE"], by_node["full"]["MIG"]) == (
        "0", "0", "-", "0"
    )
    assert (by_node["hgx"]["FITS"], by_node["hgx"]["NVLINK"], by_node["hgx"]["MIG"]) == ("8", "8", "-")


def test_status_ends_with_the_clusters_largest_request() -> None:
    gpus = [{"node": "a", "index": 1, "name": "A100", "memory_total": 81920, "memory_used": 0, "health": "healthy"}]
    largest = {"gpus": 4, "nvlink": 2, "mig": {"1g.10gb": 3, "7g.80gb": 0}, "share_mb": 40960}
    out = render_status({"gpus": gpus}, NOW, largest)
    assert out.endswith("largest request now: 4 GPU(s), 2 all-NVLink; a share of 40.0 GiB; MIG 1g.10gb:3")
