"""A deterministic, seeded network that drives many SwimCores in one process.

A discrete-event loop: a heap of (time, seq, kind, ...) events and no wall
clock. Each node's `next_deadline()` is honoured by a tick event (stale ticks
are skipped by generation number). Datagrams pass through a route function
that applies, per directed link, loss, a delay distribution, duplication and
partitions (asymmetric when only one direction is cut).

Node fates:
- pause(name, seconds): the process is frozen - it neither receives nor ticks;
  datagrams to it queue (up to `backlog_limit`, like a socket buffer) and on
  resume its overdue timers fire first, then the backlog is read (the worst
  case for a frozen process: it sees its timeouts before the acks).
- crash(name): silently gone; datagrams to it vanish.
- restart(name): a fresh core, same name and address, incarnation 0, joining
  through `seeds` by UDP and a TCP push-pull with the first reachable seed.

Every membership event lands in `trace` as (time, observer, kind, member,
incarnation); `trace_digest()` hashes it, so a seed reproduces a run bit for bit.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field
from typing import Callable

from coordinator.swim import MemberEvent, SwimCore
from coordinator.swim_config import SwimConfig
from coordinator.swim_messages import Address

_DELIVER, _TICK, _RESUME, _CALL = 0, 1, 2, 3

UP, PAUSED, CRASHED = "up", "paused", "crashed"


@dataclass
class SimNode:
    name: str
    address: Address
    core: SwimCore
    state: str = UP
    tick_gen: int = 0
    tick_at: float = float("inf")
    backlog: list[tuple[Address, bytes]] = field(default_factory=list)


@dataclass
class LinkRule:
    """Faults on the directed link a → b (both None = any)."""

    loss: float = 0.0
    extra_delay: float = 0.0


class SwimNetwork:
    def __init__(
        self,
        config: SwimConfig,
        seed: int,
        *,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.0005, 0.003),
        duplicate: float = 0.0,
        backlog_limit: int = 512,
        meta: Callable[[str], bytes] = lambda name: b"",
        periodic_push_pull: bool = False,
    ) -> None:
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.loss = loss
        self.delay = delay
        self.duplicate = duplicate
        self.backlog_limit = backlog_limit
        self.meta = meta
        self.nodes: dict[str, SimNode] = {}
        self.by_address: dict[Address, str] = {}
        self.links: dict[tuple[str, str], LinkRule] = {}
        self.cut: set[tuple[str, str]] = set()
        self.trace: list[tuple[float, str, str, str, int]] = []
        self.listeners: list[Callable[[str, MemberEvent], None]] = []
        self._heap: list[tuple[float, int, int, str, object]] = []
        self._seq = 0
        self.datagrams = 0
        self.bytes = 0
        self.tcp_bytes = 0
        self.periodic_push_pull = periodic_push_pull

    # --- building -------------------------------------------------------------------------

    def _new_core(self, name: str, address: Address, incarnation: int = 0) -> SwimCore:
        rng = random.Random(f"{self.seed}/{name}/{self.now}")
        return SwimCore(self.config, name, address, self.meta(name), rng, self.now, incarnation)

    def add_node(self, name: str) -> SimNode:
        address = (f"10.{len(self.nodes) // 65536}.{len(self.nodes) // 256 % 256}.{len(self.nodes) % 256}", 7946)
        node = SimNode(name, address, self._new_core(name, address))
        self.nodes[name] = node
        self.by_address[address] = name
        self._after(node)
        if self.periodic_push_pull:
            self.call_at(self.now + self.rng.uniform(0, self._push_pull_period()), lambda: self._periodic(name))
        return node

    def _push_pull_period(self) -> float:
        return self.config.push_pull_interval * self.config.push_pull_scale(len(self.nodes))

    def _periodic(self, name: str) -> None:
        """The shell's periodic TCP anti-entropy: push-pull with a random alive member."""
        node = self.nodes[name]
        if node.state == UP:
            peer = node.core.push_pull_peer()
            if peer is not None:
                self.push_pull(name, self.by_address[peer])
        self.call_at(self.now + self._push_pull_period(), lambda: self._periodic(name))

    def bootstrap(self, count: int, prefix: str = "n") -> list[str]:
        """`count` nodes that already know each other (a settled cluster), quietly."""
        names = [f"{prefix}{i:04d}" for i in range(count)]
        for name in names:
            self.add_node(name)
        state = self.nodes[names[0]].core
        for name in names[1:]:
            state.merge_remote_state(self.nodes[name].core.local_state(), self.now, rebroadcast=False)
        snapshot = state.local_state()
        for name in names:
            core = self.nodes[name].core
            core.merge_remote_state(snapshot, self.now, rebroadcast=False)
            core.take_events()
            self._after(self.nodes[name])
        return names

    def join(self, name: str, seeds: list[str], *, push_pull: bool = True) -> None:
        """UDP join through `seeds`, plus a TCP push-pull with the first (as the shell does)."""
        node = self.nodes[name]
        node.core.join([self.nodes[s].address for s in seeds], self.now)
        self._after(node)
        if push_pull and seeds:
            self.push_pull(name, seeds[0])

    def push_pull(self, a: str, b: str) -> None:
        """A TCP state exchange a ⇄ b after a round trip, if both are up and the link works."""
        rtt = 2 * self.rng.uniform(*self.delay)

        def exchange() -> None:
            na, nb = self.nodes[a], self.nodes[b]
            if na.state != UP or nb.state != UP or (a, b) in self.cut or (b, a) in self.cut:
                return
            sa, sb = na.core.local_state(), nb.core.local_state()
            self.tcp_bytes += len(sa) + len(sb)
            nb.core.merge_remote_state(sa, self.now)
            na.core.merge_remote_state(sb, self.now)
            self._after(na)
            self._after(nb)

        self.call_at(self.now + rtt, exchange)

    # --- faults ---------------------------------------------------------------------------

    def crash(self, name: str) -> None:
        self.nodes[name].state = CRASHED
        self.nodes[name].backlog.clear()

    def pause(self, name: str, seconds: float) -> None:
        self.nodes[name].state = PAUSED
        self._push(self.now + seconds, _RESUME, name, None)

    def restart(self, name: str, seeds: list[str]) -> None:
        node = self.nodes[name]
        node.core = self._new_core(name, node.address)
        node.state = UP
        node.backlog.clear()
        node.tick_at = float("inf")
        self._after(node)
        self.join(name, seeds)

    def partition(self, group_a: list[str], group_b: list[str], *, one_way: bool = False) -> None:
        """Cut a → b for every pair (and b → a unless one_way)."""
        for a in group_a:
            for b in group_b:
                self.cut.add((a, b))
                if not one_way:
                    self.cut.add((b, a))

    def heal(self) -> None:
        self.cut.clear()

    def set_link(self, a: str, b: str, rule: LinkRule, *, both_ways: bool = True) -> None:
        self.links[(a, b)] = rule
        if both_ways:
            self.links[(b, a)] = rule

    # --- the loop -------------------------------------------------------------------------

    def call_at(self, at: float, fn: Callable[[], None]) -> None:
        self._push(at, _CALL, "", fn)

    def run_until(self, until: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= until:
            at, _, kind, name, payload = heapq.heappop(heap)
            self.now = at
            if kind == _CALL:
                assert callable(payload)
                payload()
                continue
            node = self.nodes[name]
            if kind == _DELIVER:
                if node.state == UP:
                    self._deliver(node, payload)  # type: ignore[arg-type]
                elif node.state == PAUSED and len(node.backlog) < self.backlog_limit:
                    node.backlog.append(payload)  # type: ignore[arg-type]
            elif kind == _TICK:
                if payload == node.tick_gen:
                    node.tick_at = float("inf")
                    if node.state == UP:
                        node.core.tick(at)
                        self._after(node)
            elif kind == _RESUME and node.state == PAUSED:
                node.state = UP
                node.core.tick(at)
                backlog, node.backlog = node.backlog, []
                for item in backlog:
                    self._deliver(node, item, collect=False)
                self._after(node)
        self.now = max(self.now, until)

    def _deliver(self, node: SimNode, item: tuple[Address, bytes], *, collect: bool = True) -> None:
        source, data = item
        node.core.receive(data, source, self.now)
        if collect:
            self._after(node)

    def _after(self, node: SimNode) -> None:
        """Collect a node's output and (re)schedule its next tick."""
        core = node.core
        for dest, data in core.take_datagrams():
            self._route(node.name, dest, data)
        events = core.take_events()
        if events:
            for ev in events:
                self.trace.append((ev.at, node.name, ev.kind, ev.member.name, ev.member.incarnation))
                for listener in self.listeners:
                    listener(node.name, ev)
        deadline = max(core.next_deadline(), self.now)
        if deadline < node.tick_at:
            node.tick_gen += 1
            node.tick_at = deadline
            self._push(deadline, _TICK, node.name, node.tick_gen)

    def _route(self, src: str, dest: Address, data: bytes) -> None:
        self.datagrams += 1
        self.bytes += len(data)
        dst = self.by_address.get(dest)
        if dst is None or (src, dst) in self.cut:
            return
        rule = self.links.get((src, dst))
        rng = self.rng
        loss = self.loss if rule is None else max(self.loss, rule.loss)
        if loss and rng.random() < loss:
            return
        copies = 2 if self.duplicate and rng.random() < self.duplicate else 1
        for _ in range(copies):
            lag = rng.uniform(*self.delay) + (0.0 if rule is None else rule.extra_delay)
            self._push(self.now + lag, _DELIVER, dst, (self.nodes[src].address, data))

    def _push(self, at: float, kind: int, name: str, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, name, payload))

    # --- observation ----------------------------------------------------------------------

    def status(self, observer: str, member: str) -> str | None:
        view = self.nodes[observer].core.member(member)
        return None if view is None else view.status

    def live(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.state != CRASHED]

    def trace_digest(self) -> str:
        h = hashlib.sha256()
        for row in self.trace:
            h.update(repr((round(row[0], 9),) + row[1:]).encode())
        return h.hexdigest()

    def repro(self, test: str) -> str:
        return f"seed={self.seed}; reproduce: SWIM_SIM_SEED={self.seed} python -m pytest -q {test}"
