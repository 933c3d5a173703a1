"""The single-server command log: a cluster of one.

Every change to the lease table goes through `propose(command)`, which returns
once the command is durable (fsync'd) and applied. The Raft log that replaces
this one for a cluster offers the same `propose`, `recover` and `run`, so the
lease service above does not change.

Theory of operation
-------------------
Proposals go into a channel. One writer task takes everything waiting (group
commit: one fsync for a burst of concurrent requests), appends the batch in a
single transaction, then applies each command to the table in log order and
wakes its proposer with the result. Applied results are also handed to
`on_applied` (for the outbox and metrics) before any proposer is woken. If that
hook fails, the proposers are still answered (their commands are durable); the
missing outbox rows are re-derived when the next start-up replays the log, and
no snapshot is taken until then so the replay still covers them. Every `snapshot_every` entries the
writer stores a snapshot of the table and the log before it is dropped.

Error handling
--------------
If the append fails, no command of the batch is applied and each proposer gets
StorageError: the state on disk and in memory stay equal. If `on_applied` or the
snapshot fails the error is logged and the next batch tries again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import msgpack
import trio

from coordinator.commands import Command, command_from_wire
from coordinator.lease_table import ApplyResult, LeaseTable

from agent.storage import AsyncStateStore, StorageError

log = logging.getLogger(__name__)

# Largest group commit. Bounded so one burst cannot hold every proposer for a
# long transaction; 512 commands of ~1 KB is well under a millisecond of writes.
MAX_BATCH = 512


@dataclass(frozen=True, slots=True)
class Applied:
    """One applied log entry, as `on_applied` receives it."""

    index: int
    command: Command
    result: ApplyResult
    replayed: bool


OnApplied = Callable[[Sequence[Applied]], Awaitable[None]]


@dataclass(slots=True)
class _Proposal:
    command: Command
    done: trio.Event = field(default_factory=trio.Event)
    result: ApplyResult | None = None
    error: Exception | None = None


def encode_command(command: Command) -> bytes:
    return msgpack.packb(command.to_wire(), use_bin_type=True)  # type: ignore[no-any-return]


def decode_command(data: bytes) -> Command:
    return command_from_wire(msgpack.unpackb(data, raw=False))


class LocalLog:
    """Durable, ordered application of commands to a LeaseTable on one server."""

    def __init__(
        self,
        store: AsyncStateStore,
        *,
        on_applied: OnApplied,
        snapshot_every: int = 10_000,
        retention_s: float | None = None,
    ) -> None:
        self.table = LeaseTable() if retention_s is None else LeaseTable(retention_s=retention_s)
        self._store = store
        self._on_applied = on_applied
        self._snapshot_every = snapshot_every
        self._send, self._recv = trio.open_memory_channel[_Proposal](math.inf)
        self.last_index = 0
        self.snapshot_index = 0
        # Filled by run(); the fsync time of the last batch is exported as a metric.
        self.last_batch_size = 0
        self.last_append_seconds = 0.0
        # False once a post-apply hook failed: a snapshot would then cover entries
        # whose outbox rows were never written, so none is taken until restart,
        # when replaying the log re-derives them.
        self._hooks_complete = True
        # When the append in flight started (trio time); None when the writer is idle.
        self._append_started: float | None = None

    @property
    def applied_index(self) -> int:
        """Entries are applied as soon as they are durable: the same as last_index."""
        return self.last_index

    def disk_stalled_seconds(self) -> float:
        """How long the state-file append in flight has been running (0.0 when none)."""
        started = self._append_started
        return 0.0 if started is None else max(0.0, trio.current_time() - started)

    async def read_barrier(self) -> None:
        """Reads of `table` are always current on the only server there is."""

    async def recover(self) -> int:
        """Load the snapshot and replay the log after it; returns entries replayed."""
        state = await self._store.load()
        if state.snapshot is not None:
            self.table = LeaseTable.restore(msgpack.unpackb(state.snapshot, raw=False))
        self.snapshot_index = self.last_index = state.snapshot_index
        applied: list[Applied] = []
        for index, data in state.entries:
            if index != self.last_index + 1:
                raise StorageError(f"log gap: entry {index} follows {self.last_index}")
            command = decode_command(data)
            applied.append(Applied(index, command, self.table.apply(command), replayed=True))
            self.last_index = index
        if applied:
            await self._on_applied(applied)
        return len(applied)

    async def propose(self, command: Command) -> ApplyResult:
        """Append `command`, wait until it is durable and applied, return its result.

        Raises StorageError when the state file refused the write.
        """
        return (await self.propose_many([command]))[0]

    async def propose_many(self, commands: Sequence[Command]) -> list[ApplyResult]:
        """Propose several commands that must stay in this order in the log."""
        proposals = [_Proposal(c) for c in commands]
        for p in proposals:
            self._send.send_nowait(p)
        results: list[ApplyResult] = []
        for p in proposals:
            await p.done.wait()
            if p.error is not None:
                raise p.error
            assert p.result is not None
            results.append(p.result)
        return results

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: group-commit proposals forever."""
        task_status.started()
        while True:
            batch = [await self._recv.receive()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._commit(batch)

    async def _commit(self, batch: list[_Proposal]) -> None:
        first = self.last_index + 1
        entries = [(first + i, encode_command(p.command)) for i, p in enumerate(batch)]
        started = self._append_started = trio.current_time()
        try:
            await self._store.append(entries)
        except StorageError as exc:
            self._append_started = None
            log.error("state file append failed; %d proposals refused: %s", len(batch), exc)
            for p in batch:
                p.error = exc
                p.done.set()
            return
        self._append_started = None
        self.last_append_seconds = trio.current_time() - started
        self.last_batch_size = len(batch)
        applied = []
        for (index, _), p in zip(entries, batch):
            p.result = self.table.apply(p.command)
            applied.append(Applied(index, p.command, p.result, replayed=False))
        self.last_index = entries[-1][0]
        try:
            await self._on_applied(applied)
        except Exception:
            log.exception("post-apply hook failed for entries %d..%d", first, self.last_index)
            self._hooks_complete = False
        for p in batch:
            p.done.set()
        if self._hooks_complete and self.last_index - self.snapshot_index >= self._snapshot_every:
            await self.snapshot()

    async def snapshot(self) -> None:
        """Store the table as of the last applied entry and truncate the log."""
        index = self.last_index
        data = msgpack.packb(self.table.snapshot(), use_bin_type=True)
        try:
            await self._store.save_snapshot(index, data)
        except StorageError as exc:
            log.error("snapshot at %d failed (the log is kept): %s", index, exc)
            return
        self.snapshot_index = index
