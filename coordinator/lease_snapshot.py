"""The lease table's snapshot: versions, wire form, and the encoding helpers.

A snapshot is `LeaseTable.snapshot()`'s canonical plain dict (equal tables
give equal dicts); `LeaseTable.restore` reads this version and every older one.
Each version is written only while the state needs it, so the servers of a
rolling upgrade that still run the release before read what they can.

Version 6 is version 5 whose leases may be shares of a GPU (their wire
form's "share_group" and requirements' "share_mb"; the share index is
rebuilt from them), written only while a share lives or waits.
Version 5 is version 4 whose leases may be gang members (their wire
form's "gang"; the table's gang index is rebuilt from them) and whose
records may ask for a MIG slice ("mig_profile"): a version 4 reader would
take such members for independent leases and slices for whole GPUs, so it
must refuse. It is written only while a gang is live or a lease or waiter
asks for a slice; otherwise the snapshot is version 4.
Version 4 is version 3 plus "queue_policy" (queues.py's wire form),
"preempting" rows [allocation_id, deadline, reason] and "claims" rows
[request_id, node, victim ids]. Version 3 is version 2 plus "usage" (usage_ledger.py's snapshot form) and
"usage_retention_s". Version 2: allocations oldest first and the queue in rank order, each the
JSON text of its wire dict; records as rows [request_id, service_name,
status, submitted_at, updated_at, allocation_id, reason]: live ones by id
under "records", finished ones under "finished" as [hour, ids, text] per
hour they ended in (finished_records.py). Texts are canonical JSON
(sorted keys, no spaces), so equal tables still give equal snapshots,
and msgpack copies them rather than walking thousands of small dicts.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

from coordinator.finished_records import canonical_json
from coordinator.model import Allocation, QueuedRequest, RequestRecord, Wire

SNAPSHOT_VERSION = 6
# Written while no share lease lives or waits: what the release before shares reads
# (gangs and MIG as in version 5). A version 5 reader would take a share for a
# whole-GPU lease (or request) and two shares of one GPU for a corrupt table, so
# shares need version 6.
SNAPSHOT_VERSION_WITHOUT_SHARES = 5
# The version written while no gang is live and no lease or waiter asks for a MIG
# slice: what the release before gangs and MIG reads, so a rolling upgrade's older
# servers take snapshots of tables that use neither. A gang member would read there
# as an independent lease, and a record's `mig_profile` would be dropped silently
# (placing the lease's slice as a whole GPU): such an agent refuses version 5 instead.
SNAPSHOT_VERSION_WITHOUT_SHAPES = 4
# Every version `LeaseTable.restore` reads.
READABLE_VERSIONS = (1, 2, 3, SNAPSHOT_VERSION_WITHOUT_SHAPES, SNAPSHOT_VERSION_WITHOUT_SHARES, SNAPSHOT_VERSION)


def snapshot_version(*, shares: bool, gangs_or_mig: bool) -> int:
    """The version a table writes: the oldest that can hold what it holds now."""
    if shares:
        return SNAPSHOT_VERSION
    if gangs_or_mig:
        return SNAPSHOT_VERSION_WITHOUT_SHARES
    return SNAPSHOT_VERSION_WITHOUT_SHAPES


def record_row(record: RequestRecord) -> list[Any]:
    return [
        record.request_id,
        record.service_name,
        record.status,
        record.submitted_at,
        record.updated_at,
        record.allocation_id,
        record.reason,
    ]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (if it runs) for the block; nothing else changes."""
    running = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if running:
            gc.enable()


_Item = TypeVar("_Item", Allocation, QueuedRequest)


def text_or_item(cache: dict[str, tuple[_Item, str]], key: str, item: _Item) -> str | _Item:
    """The JSON text of `item.to_wire()` if made already (per object: a renewed lease is a new one), else `item`."""
    cached = cache.get(key)
    if cached is not None and cached[0] is item:
        return cached[1]
    return item


@dataclass(frozen=True, slots=True)
class SnapshotCapture:
    """`LeaseTable.snapshot_capture()`: the snapshot dict, its leases and waiters texts or items still to encode."""

    wire: Wire

    def to_wire(self) -> Wire:
        """The snapshot dict, every item as its canonical JSON text. Reads no table: safe in a worker thread."""
        wire = dict(self.wire)
        for key in ("allocations", "queue"):
            wire[key] = [x if isinstance(x, str) else canonical_json(x.to_wire()) for x in self.wire[key]]
        return wire
