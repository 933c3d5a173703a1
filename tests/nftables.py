"""nftables for the network-fault tests: a table of our own on the input hook, always deleted.

On loopback every packet passes the input hook once, at its receiver, so a rule
there cuts one direction of one pair; the agents bind their outbound sockets to
their own 127.0.0.x address, so `ip saddr` names the sender. Tests talk from
127.0.0.1, which no rule names. Used by the Raft partition and heal tests and the
nemesis (tests/nemesis).
"""

from __future__ import annotations

import os
import subprocess


class Firewall:
    """One nftables table of our own (`inet <prefix>_<pid>`), input hook only; `delete()` always removes it."""

    def __init__(self, prefix: str = "nemesis") -> None:
        self.table = f"{prefix}_{os.getpid()}"
        self.created = False

    def _nft(self, script: str) -> None:
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)

    def create(self) -> None:
        self._nft(
            f"add table inet {self.table}\n"
            f"add chain inet {self.table} input {{ type filter hook input priority -10; policy accept; }}\n"
        )
        self.created = True

    def drop(self, sources: list[str], destinations: list[str], *, percent: int | None = None) -> None:
        """Drop packets from any of `sources` arriving at any of `destinations` (all, or `percent`% at random)."""
        chance = "" if percent is None else f"numgen random mod 100 < {percent} "
        self._nft(
            f"add rule inet {self.table} input ip saddr {{ {', '.join(sources)} }} "
            f"ip daddr {{ {', '.join(destinations)} }} {chance}drop\n"
        )

    def heal(self) -> None:
        if self.created:
            self._nft(f"flush chain inet {self.table} input\n")

    def delete(self) -> None:
        """Delete the table (and every rule in it). Safe to call more than once."""
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, check=False)
        self.created = False

    def cut(self, isolated: str, others: list[str]) -> None:
        """Drop every packet between `isolated` and `others`, both ways."""
        self.drop([isolated], others)
        self.drop(others, [isolated])

    def rules(self) -> str:
        listed = subprocess.run(["nft", "list", "table", "inet", self.table], capture_output=True, text=True, check=False)
        return listed.stdout


def nft_unavailable() -> str | None:
    """Why nftables rules cannot be loaded here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to load nftables rules"
    try:
        probe = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "needs the nft tool (apt-get install nftables)"
    if probe.returncode != 0:
        return f"nft cannot read the ruleset here: {probe.stderr.strip()}"
    return None
