"""Which nodes changed since a version: how the scheduler's indexes catch up without a walk.

The inventory (GPUs, wiring) and the live leases (held GPUs) each keep one.
Every change to a node bumps the version and moves the node to the journal's
end, so `changed_since(v)` reads only the nodes changed after `v`, newest
first, however large the cluster: an index that remembers the version it was
built at rebuilds those nodes and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict


class ChangeJournal:
    """A version counter and the last version at which each node changed."""

    def __init__(self) -> None:
        self._journal: OrderedDict[str, int] = OrderedDict()
        self._version = 0

    @property
    def version(self) -> int:
        """Bumped by every change; 0 where none ever was."""
        return self._version

    def changed(self, node: str) -> None:
        self._version += 1
        self._journal[node] = self._version
        self._journal.move_to_end(node)

    def changed_since(self, version: int) -> list[str]:
        """Nodes changed after the version was `version`, latest first."""
        changed: list[str] = []
        for node in reversed(self._journal):
            if self._journal[node] <= version:
                break
            changed.append(node)
        return changed
