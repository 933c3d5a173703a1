"""The layering rule: coordinator/ is pure logic and never imports agent/ or any I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

COORDINATOR = Path(__file__).resolve().parents[2] / "coordinator"
# Anything that does I/O, reads a clock or schedules tasks belongs in agent/.
FORBIDDEN = {
    "agent", "trio", "asyncio", "socket", "selectors", "sqlite3", "threading", "subprocess",
    "quart", "quart_trio", "hypercorn", "httpx", "pynvml", "os", "time",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(COORDINATOR.glob("*.py")), ids=lambda p: p.name)
def test_coordinator_module_is_pure(path: Path) -> None:
    """No coordinator module imports the agent, an I/O library or the clock."""
    assert not (_imports(path) & FORBIDDEN), f"{path.name} imports {sorted(_imports(path) & FORBIDDEN)}"


def test_the_rule_sees_every_core() -> None:
    """The check above actually covers the cores (an empty glob would pass vacuously)."""
    names = {p.name for p in COORDINATOR.glob("*.py")}
    assert {"lease_table.py", "scheduler.py", "workload.py"} <= names
