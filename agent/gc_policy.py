"""Keeping the cyclic garbage collector's full collections short on a big lease table.

Why
---
CPython runs a full (generation 2) collection whenever the objects that
survived the younger generations since the last one exceed a quarter of the
long-lived heap. A full collection walks *every* tracked object. On a leader
holding 8,000 leases, 10,000 waiters and their request records that is a
stop-the-world pause of 80–160 ms on the event loop (measured with
`tests/bench/bench_heartbeat.py`), and during a burst that grows the table
the pauses come every second or so: eight of them, 0.76 s in all, in one
10,000-request burst. The leader's heartbeats, the HTTP answers and gossip
all wait behind them.

What
----
After each full collection, its survivors are moved to the permanent
generation (`gc.freeze()`: a list splice, constant time). The next full
collection then walks only what was created since, so its pause is sized by
the recent allocations, not by the whole table. Objects alive at a full
collection are rarely garbage *in a cycle* later (leases, records and queue
entries are acyclic records freed by reference counting, frozen or not), but
such cycles would never be found while frozen. So every `UNFREEZE_EVERY_S`
the permanent generation is handed back (`gc.unfreeze()`), and the next full
collection walks the whole heap once: one long pause per period instead of
one per quarter of growth.

Installed once per process by the agent (agent/app.py) and by the benches
that stand in for it; `uninstall` is for tests.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

# How often the frozen survivors are handed back for one whole-heap collection.
UNFREEZE_EVERY_S = 900.0


class FreezeSurvivors:
    """The gc callback that freezes each full collection's survivors (see the module docstring)."""

    def __init__(self, unfreeze_every_s: float = UNFREEZE_EVERY_S) -> None:
        self.unfreeze_every_s = unfreeze_every_s
        self._unfrozen_at = time.monotonic()
        self.freezes = 0
        self.unfreezes = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info.get("generation") != 2:
            return
        now = time.monotonic()
        if now - self._unfrozen_at >= self.unfreeze_every_s:
            # This collection walked only the unfrozen part: give the frozen part back so
            # the next full collection finds cycles that died among it.
            self._unfrozen_at = now
            self.unfreezes += 1
            gc.unfreeze()
            return
        self.freezes += 1
        gc.freeze()


_installed: FreezeSurvivors | None = None


def install(unfreeze_every_s: float = UNFREEZE_EVERY_S) -> FreezeSurvivors:
    """Install the policy for this process (idempotent); returns the installed callback."""
    global _installed
    if _installed is None:
        _installed = FreezeSurvivors(unfreeze_every_s)
        gc.callbacks.append(_installed)
        log.debug("gc: freezing the survivors of full collections (unfreezing every %.0f s)", unfreeze_every_s)
    return _installed


def uninstall() -> None:
    """Remove the policy and hand every frozen object back to the collector."""
    global _installed
    if _installed is not None:
        gc.callbacks.remove(_installed)
        _installed = None
    gc.unfreeze()
