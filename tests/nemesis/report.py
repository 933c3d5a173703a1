"""The nemesis table: one row per fault, a summary per kind, the headline figures, the violations."""

from __future__ import annotations

from typing import Iterable

from tests.nemesis.checker import FaultFigures, Verdict, median_max
from tests.nemesis.faults import KINDS
from tests.nemesis.history import History


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def spread(values: Iterable[float | None]) -> str:
    """'median / max' of the observed values, with '(k unseen)' for faults where it never happened."""
    med, top, unseen = median_max(values)
    text = "-" if med is None else f"{med:.2f} / {top:.2f}"
    return text + (f" ({unseen} unseen)" if unseen and med is not None else "")


def survivor_200(f: FaultFigures) -> float | None:
    seen = [v for v in (f.first_200_server, f.first_200_client) if v is not None]
    return min(seen) if seen else None


def fault_rows(verdict: Verdict) -> str:
    head = f"{'#':>3}  {'kind':<15} {'target':<28} {'200 srv':>7} {'200 cli':>7} {'heal→all':>8} {'old ldr':>7} {'longest':>7} {'503s':>5} {'no ans':>6}"
    lines = [head]
    for i, f in enumerate(verdict.figures, 1):
        lines.append(
            f"{i:>3}  {f.fault.kind:<15} {f.fault.note:<28} {seconds(f.first_200_server):>7} {seconds(f.first_200_client):>7} "
            f"{seconds(f.heal_all_serving):>8} {seconds(f.old_leader_serving):>7} {seconds(f.longest_call):>7} "
            f"{f.answers_503:>5} {f.no_answer:>6}"
        )
    return "\n".join(lines)


def kind_summary(verdict: Verdict) -> str:
    """Markdown: per kind, median / max seconds over its faults."""
    lines = [
        "| fault | n | start → 200 via a surviving server | start → 200 via a client | heal → every node serving | heal → old leader serving | longest call (up nodes) | 503s | no answer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        rows = [f for f in verdict.figures if f.fault.kind == kind]
        if not rows:
            continue
        lines.append(
            f"| {kind} | {len(rows)} | {spread(f.first_200_server for f in rows)} | {spread(f.first_200_client for f in rows)} "
            f"| {spread(f.heal_all_serving for f in rows)} | {spread(f.old_leader_serving for f in rows)} "
            f"| {seconds(max((f.longest_call for f in rows if f.longest_call is not None), default=None))} "
            f"| {sum(f.answers_503 for f in rows)} | {sum(f.no_answer for f in rows)} |"
        )
    return "\n".join(lines)


def headline(verdict: Verdict) -> str:
    """The figures the issue asks for, each median / max in seconds."""

    def by_kind(kind: str) -> list[FaultFigures]:
        return [f for f in verdict.figures if f.fault.kind == kind]

    leader_hit = [f for f in verdict.figures if f.fault.old_leader in f.fault.targets and f.fault.kind != "restart_all"]
    lines = [
        f"leader kill -9 → first 200 through a survivor:        {spread(survivor_200(f) for f in by_kind('kill_leader'))}",
        f"leader isolated → first 200 through the majority:     {spread(f.first_200_server for f in by_kind('isolate_leader'))}",
        f"heal → old leader serving again (leader faults):      {spread(f.old_leader_serving for f in leader_hit)}",
        f"longest call through a node not paused or killed:     {seconds(verdict.longest_call)}",
        f"503 no_leader answers to writes that were applied:    {len(verdict.no_leader_applied)}",
        f"calls: {verdict.calls}, of them 200: {verdict.ok}",
        f"safety violations:                                    {len(verdict.violations)}",
    ]
    return "\n".join(lines)


def report(history: History, verdict: Verdict, *, rows: bool = True) -> str:
    parts = [f"nemesis run, seed {history.seed}: {len(history.faults)} faults, times in seconds (median / max)"]
    if rows:
        parts.append(fault_rows(verdict))
    parts += [kind_summary(verdict), headline(verdict)]
    if verdict.violations:
        parts.append("SAFETY VIOLATIONS:\n" + "\n".join(f"  {v.kind}: {v.detail}" for v in verdict.violations[:50]))
    return "\n\n".join(parts)
