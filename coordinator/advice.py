"""Checking and bounding what the DeepAgents advisor proposes.

The advisor is a language model behind HTTP: its answer is untrusted input.
`bound_advice` accepts it only when every required figure is present and of
the right type and range, and then clamps the figures to what a node can
hold, so an advisor can shape a request but never make it unschedulable or
absurd. Anything else is rejected with a reason and the caller keeps the
built-in analyzer's estimate.
"""

from __future__ import annotations

from typing import Any, Mapping

from coordinator.workload import WorkloadEstimate

# Largest per-GPU memory requirement we accept: 2 TiB in MiB, well above any
# GPU made, so it only stops nonsense figures, not real hardware.
MAX_MEMORY_MB = 2_097_152
MIN_PRIORITY = 1
MAX_PRIORITY = 10
# Figures beyond JSON's exactly representable integers (2**53 - 1) are nonsense
# rather than large, and would not survive msgpack or JavaScript clients in the
# raw record we keep; they are rejected, not clamped.
MAX_SAFE_INT = 2**53 - 1
# The advisor's reasoning is kept in the request's estimate, which travels in
# every log entry and API response for the lease: bounded, not a whole essay.
MAX_REASONING_CHARS = 2000


def _int_field(output: Mapping[str, Any], key: str) -> int | str:
    """The integer at `key`, or why there is none. JSON booleans are not integers."""
    if key not in output:
        return f"missing {key}"
    value = output[key]
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{key} must be an integer, got {type(value).__name__}"
    if abs(value) > MAX_SAFE_INT:
        return f"{key} is out of range"
    return value


def bound_advice(
    structured_output: object, fallback: WorkloadEstimate, *, max_gpus_per_node: int
) -> tuple[WorkloadEstimate | None, str]:
    """Validate and bound an advisor's structured output.

    Returns (estimate, "") when `structured_output` is an object with integer
    `required_gpus` >= 1, `min_memory_mb` >= 0 and `priority` in 1..10 (and, if
    present and not null, a string `reasoning`, kept up to MAX_REASONING_CHARS;
    other keys are ignored; integers beyond MAX_SAFE_INT are rejected). The
    estimate's GPU count is clamped to [1, max_gpus_per_node] (at least 1 even
    if the cluster reports no GPUs yet), its memory to [0, MAX_MEMORY_MB], its
    max_utilization is the fallback's, and its `estimate` records the advisor's
    raw figures next to the analyzer's account. Returns (None, reason) when the
    output is rejected. Never raises.
    """
    if not isinstance(structured_output, Mapping):
        return None, f"structured output must be an object, got {type(structured_output).__name__}"
    figures: dict[str, int] = {}
    for key in ("required_gpus", "min_memory_mb", "priority"):
        value = _int_field(structured_output, key)
        if isinstance(value, str):
            return None, value
        figures[key] = value
    if figures["required_gpus"] < 1:
        return None, f"required_gpus must be >= 1, got {figures['required_gpus']}"
    if figures["min_memory_mb"] < 0:
        return None, f"min_memory_mb must be >= 0, got {figures['min_memory_mb']}"
    if not MIN_PRIORITY <= figures["priority"] <= MAX_PRIORITY:
        return None, f"priority must be in {MIN_PRIORITY}..{MAX_PRIORITY}, got {figures['priority']}"
    reasoning = structured_output.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        return None, f"reasoning must be a string, got {type(reasoning).__name__}"

    estimate = WorkloadEstimate(
        required_gpus=min(figures["required_gpus"], max(1, max_gpus_per_node)),
        min_memory_mb=min(figures["min_memory_mb"], MAX_MEMORY_MB),
        priority=figures["priority"],
        max_utilization=fallback.max_utilization,
        estimate={
            "method": "advisor",
            "reasoning": (reasoning or "")[:MAX_REASONING_CHARS],
            "advisor_raw": figures,
            "analyzer": fallback.estimate,
        },
    )
    return estimate, ""
