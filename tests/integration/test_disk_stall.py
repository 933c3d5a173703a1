"""A state file that stops making progress shows up while it is stuck, and clears once it moves.

The disk is made to stall for real where the log waits on it: the blocking
Ready persist (RaftStorage) is held in its worker thread
until the test lets it go, as an fsync on a dying disk would be. Meanwhile
the trio loop stays free, the stall grows, and /healthz's reason names it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import trio

from coordinator.raft_config import local
from coordinator.raft_messages import Message
from agent.context import DISK_STALL_DEGRADED_S, degraded_reason
from agent.raft_log import Applied, NotLeader, RaftLog
from agent.raft_storage import AsyncRaftStorage, RaftStorage


def hold(obj: object, name: str, gate: threading.Event, entered: threading.Event) -> None:
    """Make obj.name block (in its worker thread) until `gate` is set, like a stuck fsync."""
    real: Callable[..., Any] = getattr(obj, name)

    def stuck(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        gate.wait(timeout=30)
        return real(*args, **kwargs)

    setattr(obj, name, stuck)


async def no_hook(entries: Sequence[Applied]) -> None:
    return None


async def watch_stall(stalled: Callable[[], float], gate: threading.Event, entered: threading.Event) -> float:
    """Wait until the write is stuck past the degraded threshold; return the stall seen, then release it."""
    with trio.fail_after(10):
        while not entered.is_set() or stalled() < DISK_STALL_DEGRADED_S:
            await trio.sleep(0.05)
    seen = stalled()
    gate.set()
    return seen


class Outbox:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, message: Message) -> None:
        self.sent.append(message)


def test_a_stuck_persist_shows_as_a_growing_stall_and_clears_when_the_disk_moves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.raft_storage

    storage = RaftStorage(tmp_path / "state.db")
    gate, entered = threading.Event(), threading.Event()
    log = RaftLog(
        AsyncRaftStorage(storage), Outbox(), node_id="n1", on_applied=no_hook, config=local(),
        bootstrap_voters=("n1",),
    )

    async def main() -> None:
        await log.recover()
        # Inside the timed transaction, after the bootstrap write.
        hold(agent.raft_storage, "run_transaction", gate, entered)
        async with trio.open_nursery() as nursery:
            # A lone voter campaigns as it starts and must persist its vote.
            await nursery.start(log.run)
            seen = await watch_stall(log.disk_stalled_seconds, gate, entered)
            assert seen >= DISK_STALL_DEGRADED_S
            # Released, the write completes: the new leader's NOOP (entry 2) is applied.
            with trio.fail_after(10):
                while log.applied_index < 2:
                    await trio.sleep(0.01)
            assert log.is_leader and log.disk_stalled_seconds() == 0.0
            nursery.cancel_scope.cancel()

    trio.run(main)
    storage.close()


@pytest.mark.parametrize(
    ("devices", "stalled", "expected"),
    [
        (None, 0.0, None),
        (None, DISK_STALL_DEGRADED_S - 0.01, None),
        (None, 2.5, "state file write stalled for 2.5 s"),
        ("GPU 3 lost", 0.2, "GPU 3 lost"),
        ("GPU 3 lost", 3.0, "GPU 3 lost; state file write stalled for 3.0 s"),
    ],
)
def test_healthz_names_every_reason_it_is_degraded(devices: str | None, stalled: float, expected: str | None) -> None:
    assert degraded_reason(devices, stalled) == expected


def test_a_proposal_decided_in_another_term_is_refused_before_it_is_appended(tmp_path: Path) -> None:
    """A lease service decides for one leadership term; if this server lost and regained
    leadership meanwhile, its decision must not be appended in the new term."""
    from coordinator.commands import SetDrain

    storage = RaftStorage(tmp_path / "state.db")
    log = RaftLog(
        AsyncRaftStorage(storage), Outbox(), node_id="n1", on_applied=no_hook, config=local(),
        bootstrap_voters=("n1",),
    )

    async def main() -> None:
        await log.recover()
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            with trio.fail_after(10):
                while not log.leader_ready:
                    await trio.sleep(0.01)
            term, before = log.term, log.last_index
            with pytest.raises(NotLeader):
                await log.propose(SetDrain(1.0, "n1", 0, True, "stale"), term=term - 1)
            assert log.last_index == before  # nothing appended
            assert (await log.propose(SetDrain(2.0, "n1", 0, True, "current"), term=term)).ok
            nursery.cancel_scope.cancel()

    trio.run(main)
    storage.close()
