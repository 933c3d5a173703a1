"""What an advisor may and may not tell the scheduler."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.advice import MAX_MEMORY_MB, MAX_REASONING_CHARS, bound_advice
from coordinator.workload import WorkloadEstimate

FALLBACK = WorkloadEstimate(
    required_gpus=1,
    min_memory_mb=4096,
    priority=7,
    max_utilization=80.0,
    estimate={"method": "defaults", "workload_type": "inference"},
)


def test_a_valid_answer_becomes_the_estimate_with_the_analyzers_account_beside_it() -> None:
    output = {"required_gpus": 2, "min_memory_mb": 40_000, "priority": 8, "reasoning": "70B in bf16"}
    estimate, why = bound_advice(output, FALLBACK, max_gpus_per_node=8)
    assert why == ""
    assert estimate == WorkloadEstimate(
        required_gpus=2,
        min_memory_mb=40_000,
        priority=8,
        max_utilization=80.0,
        estimate={
            "method": "advisor",
            "reasoning": "70B in bf16",
            "advisor_raw": {"required_gpus": 2, "min_memory_mb": 40_000, "priority": 8},
            "analyzer": {"method": "defaults", "workload_type": "inference"},
        },
    )


def test_figures_are_clamped_to_what_a_node_holds_and_the_raw_figures_kept() -> None:
    output = {"required_gpus": 64, "min_memory_mb": 10**12, "priority": 1}
    estimate, why = bound_advice(output, FALLBACK, max_gpus_per_node=4)
    assert why == ""
    assert estimate is not None
    assert (estimate.required_gpus, estimate.min_memory_mb, estimate.priority) == (4, MAX_MEMORY_MB, 1)
    assert estimate.estimate["advisor_raw"] == {"required_gpus": 64, "min_memory_mb": 10**12, "priority": 1}
    assert estimate.estimate["reasoning"] == ""


def test_a_cluster_without_gpus_still_gets_one_gpu() -> None:
    estimate, _ = bound_advice({"required_gpus": 3, "min_memory_mb": 0, "priority": 5}, FALLBACK, max_gpus_per_node=0)
    assert estimate is not None and estimate.required_gpus == 1


def test_extra_keys_are_ignored_and_null_reasoning_is_no_reasoning() -> None:
    output = {"required_gpus": 1, "min_memory_mb": 0, "priority": 10, "reasoning": None, "confidence": "high"}
    estimate, why = bound_advice(output, FALLBACK, max_gpus_per_node=8)
    assert why == "" and estimate is not None
    assert estimate.estimate["reasoning"] == ""
    assert set(estimate.estimate["advisor_raw"]) == {"required_gpus", "min_memory_mb", "priority"}


def test_long_reasoning_is_cut_to_its_bound() -> None:
    output = {"required_gpus": 1, "min_memory_mb": 0, "priority": 5, "reasoning": "x" * 10_000}
    estimate, _ = bound_advice(output, FALLBACK, max_gpus_per_node=8)
    assert estimate is not None and estimate.estimate["reasoning"] == "x" * MAX_REASONING_CHARS


GOOD: dict[str, Any] = {"required_gpus": 2, "min_memory_mb": 8192, "priority": 5}


@pytest.mark.parametrize(
    ("output", "why"),
    [
        (None, "structured output must be an object, got NoneType"),
        ([2, 8192, 5], "structured output must be an object, got list"),
        ("required_gpus: 2", "structured output must be an object, got str"),
        ({"min_memory_mb": 8192, "priority": 5}, "missing required_gpus"),
        ({**GOOD, "min_memory_mb": None}, "min_memory_mb must be an integer, got NoneType"),
        ({"required_gpus": 2, "min_memory_mb": 8192}, "missing priority"),
        ({**GOOD, "required_gpus": "2"}, "required_gpus must be an integer, got str"),
        ({**GOOD, "required_gpus": 2.0}, "required_gpus must be an integer, got float"),
        ({**GOOD, "required_gpus": True}, "required_gpus must be an integer, got bool"),
        ({**GOOD, "priority": False}, "priority must be an integer, got bool"),
        ({**GOOD, "required_gpus": 0}, "required_gpus must be >= 1, got 0"),
        ({**GOOD, "min_memory_mb": -1}, "min_memory_mb must be >= 0, got -1"),
        ({**GOOD, "priority": 99}, "priority must be in 1..10, got 99"),
        ({**GOOD, "priority": 0}, "priority must be in 1..10, got 0"),
        ({**GOOD, "min_memory_mb": 2**53}, "min_memory_mb is out of range"),
        ({**GOOD, "reasoning": ["because"]}, "reasoning must be a string, got list"),
    ],
)
def test_invalid_answers_are_rejected_with_the_reason(output: object, why: str) -> None:
    assert bound_advice(output, FALLBACK, max_gpus_per_node=8) == (None, why)
