"""This agent's replica of the lease table: the Raft log on a server, nothing on a client.

Every server runs the same path, alone or not: a lone agent is a Raft cluster
of one voter (`[cluster] bootstrap_expect = 1`), a server of a cluster one of 3
or 5. A client (`server = false`) holds no replica; it forwards every lease
call to the leader (agent/cluster.py).

Theory of operation
-------------------
A server gets its log in two steps:

1. `open()`, before HTTP serves: a pre-Raft lone agent's log is adopted as Raft
   state (agent/state_migration.py) and the Raft state is loaded. A server that
   holds Raft state gossips so from its first packet (metadata `b`), so a blank
   server never takes it for a founder still to bootstrap. When the state is
   not empty, or the server is alone (`bootstrap_expect = 1`, bootstrapped on
   the spot), the log is built and recovers (snapshot + committed entries) here,
   so the first answer HTTP gives reflects every write acknowledged before.
2. `run()`, beside HTTP: the Raft transport binds `[cluster] raft_port` and
   follows the servers gossip knows (`raft_peers`, refreshed at every
   membership change). A server with no Raft state that waits for peers does so
   here, while HTTP serves (`/healthz`, `/metrics`, `/cluster/members` answer;
   writes get `503 no_leader`), and `waiting_for` says what it waits for
   ("bootstrap: 2 of 3 servers seen"): once gossip shows exactly
   `bootstrap_expect` alive servers it bootstraps with them, or, when an alive
   server already holds Raft state, it starts blank and waits to be added. Then
   the log recovers and runs.

Whenever the log has recovered, `log` is set and the `on_log` listeners hear of
it before it runs, so leadership follows it from its first role event.

Resource handling: the transport and the log run in `run`'s nursery; the
storage is closed by `close()` after the nursery ends.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Awaitable

import trio

from coordinator.raft import NotLeader, RaftState
from coordinator.raft_config import RaftConfig

from agent.config import AgentConfig
from agent.membership import MembershipService
from agent.node_meta import ROLE_SERVER
from agent.raft_log import OnApplied, RaftLog
from agent.raft_storage import AsyncRaftStorage, RaftStorage
from agent.raft_transport import RaftTransport
from agent.state_migration import adopt_lone_agent_log

log = logging.getLogger(__name__)

STATE_FILE = "state.db"
# How often a waiting server logs what it waits for (it says so in /healthz at once).
_WAIT_LOG_S = 5.0


def server_problem(membership: MembershipService, name: str) -> str | None:
    """Why gossip says `name` cannot become a voter now — "unknown", "not_a_server", "not_alive" — or None."""
    member = membership.member(name)
    if member is None:
        return "unknown"
    if member.meta is None or member.meta.role != ROLE_SERVER:
        return "not_a_server"
    return None if member.view.status == "alive" else "not_alive"


class Replication:
    """The Raft log of a server, built once it may start (see the module docstring)."""

    def __init__(
        self,
        config: AgentConfig,
        membership: MembershipService,
        *,
        raft_config: RaftConfig,
        on_applied: OnApplied,
        on_restored: Callable[[], Awaitable[None]],
        on_compacted: Callable[[int], Awaitable[object]],
        rng: random.Random,
    ) -> None:
        self.config = config
        self.node = config.agent.node_name
        self.membership = membership
        self.is_server = config.cluster.server
        self._raft_config = raft_config
        self._on_applied = on_applied
        self._on_restored = on_restored
        self._on_compacted = on_compacted
        self._rng = rng
        self._storage: RaftStorage | None = None
        self.transport: RaftTransport | None = None
        # Set once recovered (in open(), or after the bootstrap wait); it runs from run() on.
        self.log: RaftLog | None = None
        self.replayed = 0
        # What a server waits for before its log runs ("" once it runs; None on a client).
        self.waiting_for: str | None = "the state file" if self.is_server else None
        self._log_listeners: list[Callable[[RaftLog], None]] = []
        self._members_changed = trio.Event()
        membership.on_change(self._note_change)

    def on_log(self, listener: Callable[[RaftLog], None]) -> None:
        """Call `listener(log)` once the log has recovered, before it runs (a server only)."""
        self._log_listeners.append(listener)

    # --- start-up -----------------------------------------------------------------------

    async def open(self) -> None:
        """Step 1 (before gossip and HTTP start). Raises StorageError, OSError (the Raft port)."""
        if not self.is_server:
            return
        storage = self._storage = RaftStorage(Path(self.config.agent.data_dir) / STATE_FILE)
        await trio.to_thread.run_sync(adopt_lone_agent_log, storage, self.node)
        state = await trio.to_thread.run_sync(storage.load)
        self.transport = RaftTransport(
            self.node,
            self.config.cluster.bind,
            self.config.cluster.raft_port,
            self.membership.keyring,
            rng=random.Random(self._rng.getrandbits(64)),
        )
        await self.transport.open()
        if state != RaftState():
            self.membership.set_bootstrapped()
            await self._recover(None)
        elif self.config.cluster.bootstrap_expect == 1:
            log.info("raft: bootstrapping a cluster of one voter (%s)", self.node)
            await self._recover([self.node])
        else:
            self.waiting_for = "bootstrap: waiting for gossip"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Step 2: run the transport and the log until cancelled. Reports started at once (HTTP must not wait).

        Raises StorageError when the state file fails.
        """
        task_status.started()
        transport = self.transport
        if transport is None:
            return  # a client: no replica
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed_peers, transport)
            raft_log = self.log
            if raft_log is None:
                raft_log = await self._recover(await self._wait_for_bootstrap(self.config.cluster.bootstrap_expect))
            await nursery.start(transport.run, raft_log.receive)
            await nursery.start(raft_log.run)
            if raft_log.last_index == 0:
                # A blank server: gossip "holds Raft state" once the leader's first entries arrive.
                nursery.start_soon(self._advertise_raft_state, raft_log)
            else:
                self.membership.set_bootstrapped()

    async def _recover(self, bootstrap_voters: list[str] | None) -> RaftLog:
        assert self._storage is not None and self.transport is not None
        raft_log = RaftLog(
            AsyncRaftStorage(self._storage),
            self.transport,
            node_id=self.node,
            on_applied=self._on_applied,
            config=self._raft_config,
            rng=random.Random(self._rng.getrandbits(64)),
            bootstrap_voters=bootstrap_voters,
            on_restored=self._on_restored,
            on_compacted=self._on_compacted,
        )
        self.waiting_for = "recovering the log"
        self.replayed = await raft_log.recover()
        self.log = raft_log
        self.waiting_for = ""
        for listener in self._log_listeners:
            listener(raft_log)
        return raft_log

    def close(self) -> None:
        if self._storage is not None:
            self._storage.close()

    async def _advertise_raft_state(self, raft_log: RaftLog) -> None:
        """Raft state is never deleted, so the flag, once set, is never withdrawn."""
        while raft_log.last_index == 0:
            await trio.sleep(0.2)
        self.membership.set_bootstrapped()

    def _note_change(self, name: str) -> None:
        # Wake every task waiting on this change, and give later waiters a fresh event.
        changed, self._members_changed = self._members_changed, trio.Event()
        changed.set()

    async def _members_change(self) -> None:
        """Return at the next membership change (join, status, metadata, leave)."""
        await self._members_changed.wait()

    async def _feed_peers(self, transport: RaftTransport) -> None:
        """Keep the transport's peer map equal to the servers gossip knows."""
        current: dict[str, tuple[str, int]] | None = None
        while True:
            peers = self.raft_peers()
            if peers != current:
                transport.set_peers(peers)
                current = peers
            await self._members_change()

    async def _wait_for_bootstrap(self, expect: int) -> list[str] | None:
        """For a server with no Raft state: the founders to bootstrap with, or None to start blank.

        None as soon as
        gossip shows an alive server that holds Raft state: a cluster already
        runs, and this server waits (never campaigning) until its leader adds it
        (`POST /cluster/servers`). That check comes first, so a replacement never
        founds a second cluster even when it makes the alive count equal
        `expect` again. Otherwise wait until gossip shows exactly `expect` alive
        servers (this one included) and return their sorted names: every founder
        computes the same list.
        """
        logged = -_WAIT_LOG_S
        while True:
            running = self.bootstrapped_servers()
            if running:
                log.info(
                    "raft: %s already hold Raft state; starting as a blank server that waits to be added "
                    "(gpuctl servers add %s)",
                    ", ".join(running),
                    self.node,
                )
                return None
            servers = self.alive_servers()
            if len(servers) == expect and self.node in servers:
                log.info("raft: %d servers alive (%s); bootstrapping", expect, ", ".join(servers))
                return servers
            self.waiting_for = f"bootstrap: {len(servers)} of {expect} servers seen"
            if len(servers) > expect:
                self.waiting_for += f" (more than bootstrap_expect = {expect}: not bootstrapping, ambiguous founders)"
            now = trio.current_time()
            if now - logged >= _WAIT_LOG_S:
                logged = now
                log.info("raft: waiting to bootstrap: %s (alive: %s)", self.waiting_for, ", ".join(servers) or "none")
            with trio.move_on_after(_WAIT_LOG_S):
                await self._members_change()

    async def change_voters(self, add: str | None = None, remove: str | None = None) -> tuple[str, ...]:
        """Add or remove one voter through the log (RaftLog.change_voters); NotLeader when no log runs here."""
        if self.log is None:
            raise NotLeader(None, "this agent's Raft log does not run")
        return await self.log.change_voters(add=add, remove=remove)

    # --- what gossip says about the servers ---------------------------------------------

    def alive_servers(self) -> list[str]:
        """Names of alive members whose metadata says server (this one included when it is one)."""
        return sorted(
            m.view.name
            for m in self.membership.members()
            if m.view.status == "alive" and m.meta is not None and m.meta.role == ROLE_SERVER
        )

    def bootstrapped_servers(self) -> list[str]:
        """Alive servers other than this one whose metadata says they hold Raft state (a running cluster)."""
        return sorted(
            m.view.name
            for m in self.membership.members()
            if m.view.status == "alive"
            and m.view.name != self.node
            and m.meta is not None
            and m.meta.role == ROLE_SERVER
            and m.meta.bootstrapped
        )

    def raft_peers(self) -> dict[str, tuple[str, int]]:
        """Raft addresses of every server gossip knows (not left), keyed by node name."""
        return {
            m.view.name: (m.meta.advertise_ip, m.meta.raft_port)
            for m in self.membership.members()
            if m.meta is not None and m.meta.role == ROLE_SERVER and m.view.status != "left" and m.view.name != self.node
        }

    # --- views --------------------------------------------------------------------------

    def voters(self) -> tuple[str, ...] | None:
        """The voters of this server's latest configuration (None: no log runs here)."""
        return None if self.log is None else self.log.voters

    def health(self) -> dict[str, Any]:
        """The /healthz `raft` object.

        `role` is the core's, except `non_voter` for a server outside its latest
        configuration that does not lead, `waiting` for a server whose log does
        not run yet (with `waiting_for`), and `client` for a client.
        """
        r = self.log
        if r is None:
            if not self.is_server:
                return {"role": "client"}
            return {"role": "waiting", "waiting_for": self.waiting_for, "voter": False, "term": 0, "leader": None}
        role = r.role.value
        if not r.is_voter and not r.is_leader:
            role = "non_voter"
        return {
            "role": role,
            "voter": r.is_voter,
            "term": r.term,
            "leader": r.leader_id,
            "voters": list(r.voters),
            "commit_index": r.commit_index,
            "applied_index": r.applied_index,
            "last_persist_seconds": round(r.last_append_seconds, 6),
        }

    def servers(self) -> list[dict[str, Any]]:
        """GET /cluster/servers rows: the latest configuration, plus the non-voter servers gossip knows.

        Voters first, in configuration order, then non-voters by name. `alive` and
        `status` are gossip's view; `address` is the Raft address the member
        advertises (None when gossip does not know it).
        """
        voters: Sequence[str] = self.log.voters if self.log is not None else ()
        leader = self.log.leader_id if self.log is not None else None
        members = {m.view.name: m for m in self.membership.members()}

        def row(name: str, voter: bool) -> dict[str, Any]:
            member = members.get(name)
            meta = member.meta if member is not None else None
            return {
                "name": name,
                "voter": voter,
                "alive": member is not None and member.view.status == "alive",
                "status": member.view.status if member is not None else "unknown",
                "leader": name == leader,
                "address": meta.raft_address if meta is not None else None,
            }

        rows = [row(name, True) for name in voters]
        rows += [
            row(name, False)
            for name, m in sorted(members.items())
            if name not in voters and m.meta is not None and m.meta.role == ROLE_SERVER and m.view.status in ("alive", "suspect")
        ]
        return rows
