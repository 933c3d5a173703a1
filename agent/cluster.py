"""The cluster as this agent's gossip shows it, and the way to its leader.

Any agent answers the whole API: a server that does not lead and a client
(which holds no replica) send lease writes and linearizable reads to the
leader. `ClusterRuntime` knows where each member's HTTP API is (gossip
metadata) and which servers are alive; who leads and the forwarding itself are
its `proxy` (agent/leader_proxy.py), over a shared keep-alive httpx client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx

from agent.config import AgentConfig
from agent.leader_proxy import LeaderInfo, LeaderProxy
from agent.membership import MembershipService
from agent.node_meta import ROLE_SERVER
from agent.raft_log import RaftLog

log = logging.getLogger(__name__)


class ClusterRuntime:
    """Members' addresses and alive servers from gossip, and the proxy to the leader."""

    def __init__(
        self,
        config: AgentConfig,
        membership: MembershipService,
        replica: Callable[[], RaftLog | None],
        client: httpx.AsyncClient,
    ) -> None:
        """`replica` gives this server's Raft log once it has recovered (always None on a client)."""
        self.config = config
        self.node = config.agent.node_name
        self.membership = membership
        self._replica = replica
        self.proxy = LeaderProxy(self, client)

    @property
    def raft(self) -> RaftLog | None:
        return self._replica()

    def alive_servers(self) -> list[str]:
        """Names of alive members whose metadata says server (this one included when it is one)."""
        return sorted(
            m.view.name
            for m in self.membership.members()
            if m.view.status == "alive" and m.meta is not None and m.meta.role == ROLE_SERVER
        )

    def http_address(self, node: str) -> str | None:
        for m in self.membership.members():
            if m.view.name == node and m.meta is not None and m.view.status in ("alive", "suspect"):
                return m.meta.http_url  # https:// when that member serves TLS
        return None

    def learnt_leader(self) -> LeaderInfo | None:
        """The leader a client or non-voter learnt by asking the servers (None: none yet)."""
        return self.proxy.cached_leader
