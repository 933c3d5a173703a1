"""FinishedRecords: finished request records by the hour they ended, pruned oldest first."""

from __future__ import annotations

import json
from typing import Any

from coordinator.finished_records import FinishedRecords


def row(request_id: str, ended: float) -> list[Any]:
    return [request_id, "svc", "released", 0.0, ended, None, "released"]


def test_rows_are_found_by_id_and_written_by_hour_in_end_order() -> None:
    """get() finds any row; to_wire() gives [hour, ids, text] per hour, rows by (end, id)."""
    records = FinishedRecords.of([row("b", 10.0), row("late", 7300.0), row("a", 10.0), row("first", 5.0)])
    assert records.get("a") == row("a", 10.0) and "late" in records
    assert records.get("nope") is None and "nope" not in records
    wire = records.to_wire()
    assert [(hour, ids) for hour, ids, _ in wire] == [(0, ["first", "a", "b"]), (2, ["late"])]
    assert json.loads(wire[0][2]) == [row("first", 5.0), row("a", 10.0), row("b", 10.0)]


def test_a_restored_store_answers_adds_and_prunes_like_the_original() -> None:
    """from_wire(to_wire()) holds the same rows; later adds and prunes give the same wire."""
    original = FinishedRecords.of([row(f"r{i}", 1000.0 * i) for i in range(8)])
    restored = FinishedRecords.from_wire(json.loads(json.dumps(original.to_wire())))
    assert restored.to_wire() == original.to_wire()
    assert restored.get("r5") == row("r5", 5000.0)
    for records in (original, restored):
        records.add(row("new", 3500.0))
        records.prune(3000.0)  # part of hour 0 (r0-r2), from the parsed or unparsed text
    assert restored.to_wire() == original.to_wire()
    assert [ids for _, ids, _ in original.to_wire()] == [["r3", "new"], ["r4", "r5", "r6", "r7"]]
    assert "r2" not in restored and restored.get("r2") is None
    for records in (original, restored):
        records.prune(10_000.0)  # whole hours, the restored one without parsing hour 1
    assert original.to_wire() == restored.to_wire() == []


def test_a_snapshot_is_a_value_of_its_own() -> None:
    """Adding or pruning after to_wire() leaves the earlier wire as it was."""
    records = FinishedRecords.of([row("a", 1.0)])
    before = records.to_wire()
    records.add(row("b", 2.0))
    records.prune(1.5)
    assert [ids for _, ids, _ in before] == [["a"]]
