"""The short nemesis run: one fault of each kind against five real agents, checked for safety.

About a minute on a quiet machine (bounded by the run's recovery bound on a busy one).
Fails on any safety violation, or when the cluster does not recover from a fault within
the generous bound; the liveness figures are printed (`-s`), never asserted. The seed is
fixed so the suite runs the same schedule every time; `NEMESIS_SEED` picks another.
Whatever happens, no agent and no nftables table is left behind (checked after the run).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.nftables import nft_unavailable
from tests.nemesis.run import RunConfig, run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(nft_unavailable() is not None, reason=str(nft_unavailable())),
]


def running_under(root: Path) -> list[int]:
    """Processes whose command line names `root` (the agents' --data-dir and --config live there)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        if cmdline.parent.name == str(os.getpid()):
            continue
        try:
            if str(root).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def test_short_nemesis_run_is_safe_and_recovers(tmp_path: Path) -> None:
    config = RunConfig.short(int(os.environ.get("NEMESIS_SEED", "11")))
    outcome = run(config, tmp_path, say=lambda line: None)
    print(outcome.table)
    table = f"nemesis_{os.getpid()}"
    assert table not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert running_under(tmp_path) == [], "agents left running"
    (tmp_path / "history.json").write_text(outcome.history.dump())
    assert outcome.ok, (
        f"{outcome.table}\n\nnemesis failed with seed {config.seed}; replay: {config.replay}\n"
        f"agents' logs and history.json in {tmp_path}"
    )
