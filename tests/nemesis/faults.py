"""The faults: what each kind does, the seeded schedule, and heal-then-settle.

Kinds (each heals, then the run waits until every node serves again):

- `kill_leader`, `kill_follower`, `kill_client`: kill -9, then restart it on the same
  data dir and ports;
- `isolate_leader`: nftables drops everything between the leader and the other four,
  both directions (the harness, on 127.0.0.1, still reaches it);
- `cut_to_leader`: a one-way cut: the leader's packets reach the other servers, theirs
  never reach it;
- `loss`: each packet between two servers is dropped with probability P
  (`numgen random mod 100 < P`);
- `pause`: SIGSTOP the leader or a follower, SIGCONT at heal;
- `disk_stall`: the leader's disk failpoint stalls every transaction (agent/storage.py);
- `restart_all`: kill -9 all five, then start them together.

"Settled" means every node answers a linearizable read (`GET /gpu/list`, forwarded to
the leader by clients) with 200. Settling has a generous bound (`settle_timeout_s`):
past it the run fails, as the cluster did not recover at all.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import httpx

from tests.nemesis.cluster import CLIENTS, SERVERS, NemesisCluster, NotRecovered
from tests.nftables import Firewall
from tests.nemesis.history import Fault

KINDS = (
    "kill_leader", "kill_follower", "kill_client", "isolate_leader", "cut_to_leader",
    "loss", "pause", "disk_stall", "restart_all",
)
LOSS_PERCENT = 30
DISK_STALL_S = 1.0  # per transaction while the failpoint is on


def schedule(rng: random.Random, rounds: int, only: tuple[str, ...] = KINDS) -> list[str]:
    """`rounds` of every kind in `only` (default: all), shuffled by the seeded `rng`."""
    kinds = [k for _ in range(rounds) for k in only]
    rng.shuffle(kinds)
    return kinds


@dataclass
class Nemesis:
    cluster: NemesisCluster
    firewall: Firewall
    rng: random.Random
    hold_s: tuple[float, float]  # how long a fault lasts: uniform in this range
    faults: list[Fault]  # each fault is appended as it begins, so a run that stops midway still shows it
    settle_timeout_s: float = 90.0

    def run(self, kind: str) -> Fault:
        """Inject one fault of `kind`, hold it, heal it and wait until every node serves."""
        c, rng = self.cluster, self.rng
        leader = c.wait_leader(self.settle_timeout_s)
        followers = [s for s in SERVERS if s != leader]
        hosts = {n: node.host for n, node in c.nodes.items()}
        if kind == "kill_leader":
            fault = self._begin(kind, (leader,), (leader,), leader, f"{leader} (leader)")
            c.kill(leader)
        elif kind == "kill_follower":
            target = rng.choice(followers)
            fault = self._begin(kind, (target,), (target,), leader, target)
            c.kill(target)
        elif kind == "kill_client":
            target = rng.choice(CLIENTS)
            fault = self._begin(kind, (target,), (target,), leader, target)
            c.kill(target)
        elif kind == "isolate_leader":
            fault = self._begin(kind, (leader,), (), leader, f"{leader} (leader)")
            others = [h for n, h in hosts.items() if n != leader]
            self.firewall.drop([hosts[leader]], others)
            self.firewall.drop(others, [hosts[leader]])
        elif kind == "cut_to_leader":
            fault = self._begin(kind, (leader,), (), leader, f"servers -> {leader}")
            self.firewall.drop([hosts[f] for f in followers], [hosts[leader]])
        elif kind == "loss":
            fault = self._begin(kind, (), (), leader, f"servers, {LOSS_PERCENT}%")
            servers = [hosts[s] for s in SERVERS]
            self.firewall.drop(servers, servers, percent=LOSS_PERCENT)
        elif kind == "pause":
            target = rng.choice([leader, *followers])
            fault = self._begin(kind, (target,), (target,), leader, target + (" (leader)" if target == leader else ""))
            c.pause(target)
        elif kind == "disk_stall":
            fault = self._begin(kind, (leader,), (), leader, f"{leader} (leader), {DISK_STALL_S:g} s/tx")
            c.stall_disk(leader, DISK_STALL_S)
        elif kind == "restart_all":
            fault = self._begin(kind, tuple(c.nodes), tuple(c.nodes), leader, "all five")
            for name in c.nodes:
                c.kill(name)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        time.sleep(rng.uniform(*self.hold_s))
        self.heal(fault)
        self.settle(fault)
        return fault

    def _begin(self, kind: str, targets: tuple[str, ...], down: tuple[str, ...], leader: str, note: str) -> Fault:
        fault = Fault(kind=kind, targets=targets, down=down, old_leader=leader, start=time.time(), note=note)
        self.faults.append(fault)
        return fault

    def heal(self, fault: Fault) -> None:
        """Undo the fault: rules flushed, disks unstalled, paused agents continued, killed ones restarted."""
        self.firewall.heal()
        for name in self.cluster.nodes:
            self.cluster.unstall_disk(name)
            self.cluster.resume(name)
        fault.heal = time.time()
        dead = tuple(n for n, node in self.cluster.nodes.items() if not node.running)
        # An agent that exited by itself is a finding (the checker fails the run); restart it all the same.
        fault.crashed = tuple(n for n in dead if n not in fault.down)
        if dead:
            self.cluster.start(dead)

    def settle(self, fault: Fault) -> None:
        """Wait until every node answers a linearizable read with 200; record when each first did."""
        deadline = time.monotonic() + self.settle_timeout_s
        waiting = set(self.cluster.nodes)
        while waiting:
            for name in sorted(waiting):
                try:
                    resp = self.cluster.http.get(self.cluster.nodes[name].url + "/gpu/list", timeout=5.0)
                except httpx.HTTPError:
                    continue
                if resp.status_code == 200:
                    fault.serving_after_heal[name] = time.time()
                    waiting.discard(name)
            if waiting and time.monotonic() > deadline:
                raise NotRecovered(
                    f"{fault.kind} ({fault.note}): {sorted(waiting)} not serving {self.settle_timeout_s:g}s after the heal"
                )
            if waiting:
                time.sleep(0.1)
        fault.settled = time.time()
