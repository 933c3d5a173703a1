"""How a gang looks outside: the API object, webhooks and graph events, and gpuctl.

A gang is one allocation to its owner (one id, every node's GPUs under
`nodes`, a `rendezvous`), one event per lifecycle change, and a row per node
in listings, tied together by the GANG column.
"""

from __future__ import annotations

from coordinator.commands import Allocate, Release
from coordinator.views import allocation_view, graph_event, webhook_payload
from agent.gpuctl_render import render_allocation, render_list
from tests.unit.test_gangs import cluster, gang
from tests.unit.test_scheduler import Cluster


def granted() -> tuple[Cluster, Allocate]:
    c = cluster()
    command = c.admit(gang("g", 2, 4))
    assert isinstance(command, Allocate)
    return c, command


def test_the_allocation_of_a_gang_names_every_node_and_the_rendezvous() -> None:
    _, command = granted()
    view = allocation_view(command.allocation, command.members)
    gang_id = view["gang_id"]
    assert view["id"] == view["allocation_id"] == gang_id
    assert [(n["rank"], n["node"], n["gpu_ids"]) for n in view["nodes"]] == [(0, "n0", [0, 1, 2, 3]), (1, "n1", [0, 1, 2, 3])]
    assert [n["allocation_id"] for n in view["nodes"]] == [f"{gang_id}.0", f"{gang_id}.1"]
    assert len(view["gpus"]) == 8
    assert view["node"] == "n0" and view["gpu_ids"] == [0, 1, 2, 3]
    assert view["rendezvous"] == {"address": "10.0.0.1", "port": 29500, "port_range": [29500, 29599], "nnodes": 2}
    assert view["requirements"]["nodes"] == 2 and view["requirements"]["gpus_per_node"] == 4
    # A member alone (as listed) says which gang it is part of.
    member = allocation_view(command.gang_rest[0])
    assert member["gang"] == {"gang_id": gang_id, "rank": 1, "size": 2}
    assert "rendezvous" not in member


def test_a_gang_is_one_webhook_and_one_graph_event_per_change() -> None:
    c, command = granted()
    result = c.table.apply(Release(9.0, (command.allocation.allocation_id,)))
    (event,) = result.events
    payload = webhook_payload(event)
    assert payload["event"] == "released"
    assert payload["allocation"]["id"] == payload["allocation"]["gang_id"]
    assert len(payload["allocation"]["nodes"]) == 2
    doc = graph_event(event, "n0")
    assert doc["allocation_id"] == doc["allocation"]["gang_id"]


def test_gpuctl_lists_a_gang_as_a_row_per_node_and_shows_its_rendezvous() -> None:
    _, command = granted()
    listing = render_list({"allocations": [allocation_view(m) for m in command.members], "queue": []}, 0.0)
    assert "GANG" in listing.splitlines()[1]
    assert listing.count(" rank ") == 2
    single = render_list({"allocations": [allocation_view(command.allocation)][:0], "queue": []}, 0.0)
    assert "GANG" not in single
    block = render_allocation(allocation_view(command.allocation, command.members), 0.0)
    assert "rendezvous" in block and "10.0.0.1:29500" in block and "--nnodes 2" in block
    assert "rank 1" in block
