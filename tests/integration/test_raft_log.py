"""Three RaftLogs over real TCP on loopback, each with its own SQLite file.

One trio process runs three servers, each a RaftLog + RaftTransport + RaftStorage
exactly as an agent would wire them (10 ms ticks: elections in ~100-200 ms). The
scenario: a leader is elected; allocations proposed on it apply on every server in
the same order with equal tables; a follower refuses proposals naming the leader;
the leader is stopped (its tasks cancelled, its listener closed) and another takes
over; proposals continue (and the logs compact); the stopped server restarts from
its state file and catches up — through an InstallSnapshot, since the entries it
missed were compacted away. A server holding the wrong cluster key never gets in.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import pytest
import trio

from coordinator.commands import Allocate, Command, Release
from coordinator.lease_table import LeaseTable
from coordinator.model import AllocatedGpu, Allocation, AllocationRequest, Requirements
from coordinator.raft_config import local
from coordinator.raft_messages import Message, MessageKind, encode_message
from agent.cluster_keyring import KeyringFile, generate_key, install_key
from agent import raft_log as raft_log_module
from agent.raft_log import Applied, NotLeader, ProposalRejected, RaftLog, ReadUnconfirmed
from agent.raft_storage import AsyncRaftStorage, RaftStorage
from agent.raft_transport import RaftTransport

HOST = "127.0.0.1"
NAMES = ("n1", "n2", "n3")
# local(): 10 ms ticks, 100 ms election timeout. Compact every 20 entries so the
# scenario below needs snapshots.
CONFIG = local().replace(snapshot_every=20)


def allocate(n: int) -> Command:
    """An allocation of one GPU, distinct for every n (so all of them succeed)."""
    host, index = f"gpu-host-{n // 8}", n % 8
    req = AllocationRequest(
        request_id=f"req-{n}",
        service_name=f"svc-{n % 3}",
        workload_type="generic",
        priority=5,
        requirements=Requirements(gpu_count=1, min_memory_mb=1024),
        ttl_s=0.0,
        submitted_at=float(n),
    )
    gpu = AllocatedGpu(host, index, f"GPU-{host}-{index}", "NVIDIA H100 80GB HBM3", 81559)
    return Allocate(float(n), Allocation(f"alloc-{n}", req, host, (gpu,), float(n), None))


@dataclass
class Server:
    name: str
    path: Path
    key_file: Path | None
    port: int = 0
    log: RaftLog | None = None
    transport: RaftTransport | None = None
    storage: RaftStorage | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)
    applied: list[tuple[int, str]] = field(default_factory=list)
    restored: int = 0

    @property
    def raft(self) -> RaftLog:
        assert self.log is not None
        return self.log

    @property
    def net(self) -> RaftTransport:
        assert self.transport is not None
        return self.transport


class Cluster:
    def __init__(self, tmp_path: Path, keys: Sequence[str], names: Sequence[str] = NAMES) -> None:
        self.servers: dict[str, Server] = {}
        for name, key in zip(names, keys):
            key_file = tmp_path / f"{name}.key"
            install_key(key_file, key)
            self.servers[name] = Server(name, tmp_path / f"{name}.db", key_file)

    async def open_ports(self) -> None:
        """Bind every listener first (port 0), so each server knows all addresses before it starts."""
        for s in self.servers.values():
            s.transport = RaftTransport(
                s.name, HOST, s.port, KeyringFile(s.key_file) if s.key_file else None,
                rng=random.Random(s.name), backoff_cap_s=0.1,
            )
            s.port = await s.transport.open()

    async def start(self, nursery: trio.Nursery, s: Server) -> tuple[int, dict[str, object], int]:
        """Recover `s` from its state file and run it; returns the entries replayed, the table and the last index then."""
        if s.transport is None:
            s.transport = RaftTransport(
                s.name, HOST, s.port, KeyringFile(s.key_file) if s.key_file else None,
                rng=random.Random(s.name), backoff_cap_s=0.1,
            )
            await s.transport.open()
        s.transport.set_peers({o.name: (HOST, o.port) for o in self.servers.values() if o is not s})
        s.storage = RaftStorage(s.path)

        async def on_applied(entries: Sequence[Applied]) -> None:
            s.applied.extend((e.index, type(e.command).__name__) for e in entries)

        async def on_restored() -> None:
            s.restored += 1

        s.log = RaftLog(
            AsyncRaftStorage(s.storage), s.transport, node_id=s.name, on_applied=on_applied,
            on_restored=on_restored, config=CONFIG, rng=random.Random(s.name),
            bootstrap_voters=NAMES if s.name in NAMES else None,  # any other name starts blank
            propose_timeout_s=5.0,
        )
        replayed = await s.log.recover()
        recovered, recovered_last = s.log.table.snapshot(), s.log.last_index
        s.scope, s.stopped = trio.CancelScope(), trio.Event()
        transport, raft = s.transport, s.log

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with s.scope:  # type: ignore[union-attr]
                    async with trio.open_nursery() as inner:
                        await inner.start(transport.run, raft.receive)
                        await inner.start(raft.run)
                        task_status.started()
            finally:
                s.stopped.set()

        await nursery.start(serve)
        return replayed, recovered, recovered_last

    async def stop(self, s: Server) -> None:
        """Crash-stop `s`: cancel its tasks, close its listener and its state file."""
        assert s.scope is not None and s.storage is not None and s.transport is not None
        s.scope.cancel()
        await s.stopped.wait()
        await s.transport.aclose()
        s.storage.close()
        s.transport = None

    def running(self) -> list[Server]:
        return [s for s in self.servers.values() if s.scope is not None and not s.stopped.is_set()]

    def leader(self, among: Sequence[Server] | None = None) -> Server | None:
        leaders = [s for s in (among or self.running()) if s.raft.is_leader]
        return leaders[0] if len(leaders) == 1 else None

    async def wait_leader(self, among: Sequence[Server] | None = None) -> Server:
        await until(lambda: self.leader(among) is not None)
        leader = self.leader(among)
        assert leader is not None
        return leader


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def tables(servers: Sequence[Server]) -> list[dict[str, object]]:
    return [s.raft.table.snapshot() for s in servers]


def run(test: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await test(nursery)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_three_servers_elect_replicate_fail_over_and_catch_up_from_disk(tmp_path: Path) -> None:
    key = generate_key()
    cluster = Cluster(tmp_path, [key, key, key])

    async def test(nursery: trio.Nursery) -> None:
        await cluster.open_ports()
        for s in cluster.servers.values():
            await cluster.start(nursery, s)
        leader = await cluster.wait_leader()
        followers = [s for s in cluster.running() if s is not leader]

        # Allocations proposed on the leader apply everywhere, in the same order.
        results = [await leader.raft.propose(allocate(n)) for n in range(20)]
        results += await leader.raft.propose_many([allocate(n) for n in range(20, 40)])
        assert all(r.ok for r in results)
        last = leader.raft.applied_index
        await until(lambda: all(s.raft.applied_index >= last for s in cluster.running()))
        assert leader.applied == followers[0].applied == followers[1].applied
        assert [op for _, op in leader.applied] == ["Allocate"] * 40
        assert tables(cluster.running())[1:] == tables(cluster.running())[:-1]
        assert len(leader.raft.table.allocations()) == 40

        # A follower refuses, naming the leader (the HTTP layer forwards there).
        with pytest.raises(NotLeader) as refused:
            await followers[0].raft.propose(allocate(99))
        assert refused.value.leader_hint == leader.name

        # Stop the leader: another is elected within a few seconds, and proposals continue.
        await cluster.stop(leader)
        at_stop, at_stop_index = leader.raft.table.snapshot(), leader.raft.last_index
        survivor = await cluster.wait_leader(followers)
        assert survivor.raft.term > 1
        release = Release(100.0, ("alloc-0", "alloc-1"))
        assert (await survivor.raft.propose(release)).affected == ("alloc-0", "alloc-1")
        # One at a time, so the applied index passes every snapshot_every boundary
        # (a batch could jump over one) and the logs compact past where the stopped one ends.
        results = [await survivor.raft.propose(allocate(n)) for n in range(40, 80)]
        assert all(r.ok for r in results)
        last = survivor.raft.applied_index
        await until(lambda: all(s.raft.applied_index >= last for s in followers))
        assert survivor.raft.snapshot_index > at_stop_index  # compacted past the stopped server's log

        # The stopped server restarts from its SQLite file and catches up; what it
        # missed was compacted away, so it gets there through the leader's snapshot.
        # Its whole log survived; it replays up to the commit index on its disk, which may
        # trail (a commit index alone is never written), and learns the rest from the leader.
        replayed, recovered, recovered_last = await cluster.start(nursery, leader)
        assert recovered_last == at_stop_index and len(recovered["allocations"]) <= len(at_stop["allocations"])
        await until(lambda: leader.raft.applied_index >= last)
        assert leader.restored == 1
        assert leader.raft.leader_id == survivor.name
        assert tables(cluster.running())[1:] == tables(cluster.running())[:-1]
        assert len(leader.raft.table.allocations()) == 78

        # And the restarted server keeps applying new entries like the others.
        await survivor.raft.propose(allocate(80))
        last = survivor.raft.applied_index
        await until(lambda: all(s.raft.applied_index >= last for s in cluster.running()))
        assert tables(cluster.running())[1:] == tables(cluster.running())[:-1]

    run(test)


def test_reads_are_confirmed_by_a_majority_and_a_cut_off_leader_serves_none(tmp_path: Path) -> None:
    """ReadIndex (thesis §6.4): the leader reads only after a majority confirms it still leads."""
    key = generate_key()
    cluster = Cluster(tmp_path, [key, key, key])

    async def test(nursery: trio.Nursery) -> None:
        await cluster.open_ports()
        for s in cluster.servers.values():
            await cluster.start(nursery, s)
        leader = await cluster.wait_leader()
        followers = [s for s in cluster.running() if s is not leader]
        assert (await leader.raft.propose(allocate(1))).ok

        # Confirmed reads on the leader: each returns with the write above applied.
        async with trio.open_nursery() as readers:
            for _ in range(20):
                readers.start_soon(leader.raft.read_barrier)
        assert leader.raft.table.allocation("alloc-1") is not None

        # A follower does not read; it names the leader (the HTTP layer forwards there).
        with pytest.raises(NotLeader) as refused:
            await followers[0].raft.read_barrier()
        assert refused.value.leader_hint == leader.name

        # Cut the leader off from both followers: it can no longer confirm a read,
        # whichever comes first (its read timeout or its check-quorum step-down).
        for follower in followers:
            await cluster.stop(follower)
        with pytest.raises((ReadUnconfirmed, NotLeader)):
            await leader.raft.read_barrier(timeout_s=1.0)

    run(test)


def test_change_voters_adds_a_blank_server_removes_a_dead_one_and_the_leader(tmp_path: Path) -> None:
    """Membership through RaftLog.change_voters: a blank server n4 never campaigns until the
    leader adds it, then holds every entry; a change while another is in flight is refused and
    changes nothing; a stopped voter is removed (replacing it); the leader removes itself and
    its caller still hears the outcome before it steps down."""
    key = generate_key()
    cluster = Cluster(tmp_path, [key] * 4, names=(*NAMES, "n4"))
    blank = cluster.servers["n4"]

    async def test(nursery: trio.Nursery) -> None:
        await cluster.open_ports()
        for s in cluster.servers.values():
            await cluster.start(nursery, s)
        founders = [cluster.servers[n] for n in NAMES]
        leader = await cluster.wait_leader(founders)
        for n in range(5):
            assert (await leader.raft.propose(allocate(n))).ok
        await trio.sleep(0.3)  # 30 ticks: a promotable server would have campaigned by now
        assert not blank.raft.is_voter and blank.raft.voters == () and blank.raft.term == 0
        assert blank.applied == [] and blank.raft.last_index == 0

        with pytest.raises(ValueError):
            await leader.raft.change_voters()
        follower = next(s for s in founders if s is not leader)
        with pytest.raises(NotLeader):
            await follower.raft.change_voters(add="n4")
        with pytest.raises(ProposalRejected):
            await leader.raft.change_voters(add=follower.name)  # a voter already

        # A second change while the first is appended but not yet committed (that takes a
        # round trip to the followers): refused, and nothing proposed for it.
        added: list[tuple[str, ...]] = []

        async def add_n4() -> None:
            added.append(await leader.raft.change_voters(add="n4"))

        before = leader.raft.last_index
        async with trio.open_nursery() as both:
            both.start_soon(add_n4)
            while leader.raft.last_index == before:
                await trio.sleep(0)
            with pytest.raises(ProposalRejected, match="not committed"):
                await leader.raft.change_voters(remove=follower.name)
        assert added == [(*NAMES, "n4")] and leader.raft.last_index == before + 1
        last = leader.raft.applied_index
        await until(lambda: blank.raft.applied_index >= last)
        assert blank.raft.is_voter and blank.raft.voters == (*NAMES, "n4")
        assert tables([leader, blank])[0] == tables([leader, blank])[1]

        # Replace a dead server: stop one follower, remove it; three voters, quorum two.
        dead = next(s for s in founders if s is not leader)
        await cluster.stop(dead)
        voters = await leader.raft.change_voters(remove=dead.name)
        assert dead.name not in voters and len(voters) == 3
        assert (await leader.raft.propose(allocate(10))).ok

        # The leader removes itself: answered with the new voters, then another leads.
        rest = [s for s in cluster.running() if s is not leader]
        voters = await leader.raft.change_voters(remove=leader.name)
        assert leader.name not in voters and len(voters) == 2
        successor = await cluster.wait_leader(rest)
        assert not leader.raft.is_voter and not leader.raft.is_leader
        assert (await successor.raft.propose(allocate(11))).ok
        with pytest.raises(ProposalRejected):
            await successor.raft.change_voters(remove=leader.name)  # not a voter any more

    run(test)


def test_a_server_with_the_wrong_cluster_key_is_kept_out(tmp_path: Path) -> None:
    key = generate_key()
    cluster = Cluster(tmp_path, [key, key, generate_key()])
    outsider = cluster.servers["n3"]

    async def test(nursery: trio.Nursery) -> None:
        await cluster.open_ports()
        for s in cluster.servers.values():
            await cluster.start(nursery, s)
        insiders = [cluster.servers["n1"], cluster.servers["n2"]]
        leader = await cluster.wait_leader(insiders)  # two of three voters are a quorum
        for n in range(5):
            assert (await leader.raft.propose(allocate(n))).ok
        await trio.sleep(0.3)  # 30 ticks: many heartbeats and pre-vote rounds each way
        assert not outsider.raft.is_leader and outsider.raft.leader_id is None
        assert outsider.raft.applied_index == 1  # only the bootstrap configuration
        assert outsider.raft.table.snapshot() == LeaseTable().snapshot()
        assert outsider.applied == []
        # Each side drops (and counts) what the other sealed, and closes those connections.
        assert outsider.net.stats.dropped["decrypt"] > 0
        assert all(s.net.stats.dropped["decrypt"] > 0 for s in insiders)
        assert all(s.net.stats.messages["in"] > 0 for s in insiders)
        assert outsider.net.stats.messages["in"] == 0

    run(test)


def test_the_raft_port_drops_and_counts_bad_frames_and_closes_their_connections(tmp_path: Path) -> None:
    got: list[Message] = []
    transport = RaftTransport("n1", HOST, 0, None, rng=random.Random(1), max_message_bytes=1024)
    heartbeat = Message(MessageKind.HEARTBEAT, "n2", "n1", 3, commit=7)

    def frame(payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + payload

    async def closed(stream: trio.SocketStream) -> bool:
        with trio.fail_after(2):
            return await stream.receive_some(1) == b""

    async def test(nursery: trio.Nursery) -> None:
        port = await transport.open()
        await nursery.start(transport.run, got.append)
        # Valid frames, pipelined on one connection; one addressed elsewhere is skipped.
        good = await trio.open_tcp_stream(HOST, port)
        misaddressed = Message(MessageKind.HEARTBEAT, "n2", "n9", 3)
        await good.send_all(frame(encode_message(heartbeat)) + frame(encode_message(misaddressed)) * 2 + frame(encode_message(heartbeat)))
        await until(lambda: len(got) == 2)
        assert got == [heartbeat, heartbeat] and transport.stats.dropped["misaddressed"] == 2
        # Garbage and oversized frames: dropped, counted, that connection closed.
        for payload, reason in ((frame(b"\xc1 not msgpack"), "malformed"), (struct.pack(">I", 10**6), "oversized")):
            bad = await trio.open_tcp_stream(HOST, port)
            await bad.send_all(payload)
            assert await closed(bad)
            assert transport.stats.dropped[reason] == 1
            await bad.aclose()
        # The good connection is unaffected.
        await good.send_all(frame(encode_message(heartbeat)))
        await until(lambda: len(got) == 3)
        await good.aclose()
        await transport.aclose()

    run(test)


def test_a_leader_whose_writes_stall_twice_hands_leadership_to_a_follower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its heartbeats still flow between writes, so no follower would elect another on its own:
    the slow leader steps aside itself (RaftLog, "A leader whose disk stalls")."""
    monkeypatch.setattr(raft_log_module, "SLOW_PERSIST_S", 0.03)  # scaled to local()'s 100 ms election timeout
    key = generate_key()
    cluster = Cluster(tmp_path, [key, key, key])

    async def test(nursery: trio.Nursery) -> None:
        await cluster.open_ports()
        for s in cluster.servers.values():
            await cluster.start(nursery, s)
        slow = await cluster.wait_leader()
        storage = slow.raft._storage
        persist = storage.persist_ready

        async def stalling(rd: object) -> None:
            await trio.sleep(0.05)  # slower than SLOW_PERSIST_S, shorter than the heartbeats' gap
            await persist(rd)  # type: ignore[arg-type]

        monkeypatch.setattr(storage, "persist_ready", stalling)
        for n in range(3):
            try:
                await slow.raft.propose(allocate(n))
            except (NotLeader, ProposalRejected):
                break  # the transfer has begun: proposals are refused meanwhile
        await until(lambda: cluster.leader() not in (None, slow))

    run(test)
