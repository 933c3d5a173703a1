"""The workload analyzer against SPEC.md's table, its bug fixes, and the parameter estimates.

Figures are exact: each parameter-based case works its arithmetic out in the
comment beside it (MiB = 2**20 bytes; an assumed H100 80GB has 81559 MiB, of
which 90% = 73403.1 MiB is usable), so a changed constant fails a test.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from coordinator.errors import InvalidRequest, Unsatisfiable
from coordinator.workload import (
    WORKLOAD_TYPES,
    WorkloadEstimate,
    analyze_workload,
    parse_model_params_b,
    tensor_parallel_size,
)


def figures(estimate: WorkloadEstimate) -> tuple[int, int, int, float]:
    return (
        estimate.required_gpus,
        estimate.min_memory_mb,
        estimate.priority,
        estimate.max_utilization,
    )


def analyze(workload_type: str, gpu_memory_mb: int | None = None, **data: Any) -> WorkloadEstimate:
    return analyze_workload(workload_type, data, gpu_memory_mb=gpu_memory_mb)


def test_workload_types_are_the_specs_six() -> None:
    assert WORKLOAD_TYPES == (
        "training",
        "inference",
        "embedding",
        "ocr",
        "graph_processing",
        "generic",
    )


# --- the table's defaults ---------------------------------------------------


@pytest.mark.parametrize(
    ("workload_type", "expected"),
    [
        ("training", (1, 8192, 5, 90.0)),
        ("inference", (1, 4096, 7, 80.0)),
        ("embedding", (1, 2048, 6, 85.0)),
        ("ocr", (1, 4096, 6, 80.0)),
        ("graph_processing", (1, 4096, 5, 75.0)),
        ("generic", (1, 4096, 5, 80.0)),
    ],
)
def test_defaults_of_each_type(workload_type: str, expected: tuple[int, int, int, float]) -> None:
    estimate = analyze(workload_type)
    assert figures(estimate) == expected
    assert estimate.estimate["method"] == "table"
    assert estimate.estimate["workload_type"] == workload_type
    assert estimate.estimate["rules"][0].startswith(f"{workload_type} defaults:")


def test_unknown_keys_are_the_callers_own_and_ignored() -> None:
    estimate = analyze("inference", workflow_id="wf-42", note={"any": ["thing"]}, method=3)
    assert figures(estimate) == (1, 4096, 7, 80.0)


# --- training ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_size", "gpus", "memory"),
    [("small", 1, 4096), ("medium", 2, 8192), ("large", 4, 16384), ("xlarge", 8, 32768)],
)
def test_training_model_size(model_size: str, gpus: int, memory: int) -> None:
    assert figures(analyze("training", model_size=model_size)) == (gpus, memory, 5, 90.0)


@pytest.mark.parametrize(
    ("batch_size", "gpus"), [(1, 1), (64, 1), (65, 2), (128, 2), (129, 4), (10_000, 4)]
)
def test_training_batch_size_thresholds(batch_size: int, gpus: int) -> None:
    assert figures(analyze("training", batch_size=batch_size)) == (gpus, 8192, 5, 90.0)


def test_training_multi_gpu_means_at_least_two() -> None:
    assert analyze("training", multi_gpu=True).required_gpus == 2
    assert analyze("training", multi_gpu=False).required_gpus == 1


@pytest.mark.parametrize(
    ("data", "gpus", "memory"),
    [
        # Seed bug: batch_size > 64 set 2 GPUs after model_size xlarge had set 8.
        ({"model_size": "xlarge", "batch_size": 100}, 8, 32768),
        ({"model_size": "xlarge", "batch_size": 200}, 8, 32768),
        ({"model_size": "large", "batch_size": 100}, 4, 16384),
        ({"model_size": "large", "multi_gpu": True}, 4, 16384),
        # ...while raising still works.
        ({"model_size": "small", "batch_size": 200}, 4, 4096),
        ({"model_size": "medium", "batch_size": 129, "multi_gpu": True}, 4, 8192),
    ],
)
def test_batch_size_never_lowers_the_count_model_size_set(
    data: dict[str, Any], gpus: int, memory: int
) -> None:
    assert figures(analyze_workload("training", data)) == (gpus, memory, 5, 90.0)


# --- inference (table) -------------------------------------------------------


def test_vaultgemma_without_a_size_uses_its_table_row() -> None:
    estimate = analyze("inference", model_name="google/VaultGemma")
    assert figures(estimate) == (1, 2048, 6, 75.0)
    assert estimate.estimate["method"] == "table"


@pytest.mark.parametrize(
    ("model_size", "memory"),
    [("small", 2048), ("medium", 4096), ("large", 8192), ("xlarge", 16384), ("XLarge", 16384)],
)
def test_inference_model_size(model_size: str, memory: int) -> None:
    assert figures(analyze("inference", model_size=model_size)) == (1, memory, 7, 80.0)


@pytest.mark.parametrize(
    ("model_size", "memory"),
    # small/medium are caps ("<="): they never raise vaultgemma's 2048; large/xlarge raise it.
    [("small", 2048), ("medium", 2048), ("large", 8192), ("xlarge", 16384)],
)
def test_inference_model_size_caps_and_floors(model_size: str, memory: int) -> None:
    estimate = analyze("inference", model_name="vaultgemma", model_size=model_size)
    assert figures(estimate) == (1, memory, 6, 75.0)


def test_inference_min_memory_mb_sets_memory() -> None:
    assert figures(analyze("inference", min_memory_mb=12000)) == (1, 12000, 7, 80.0)
    assert analyze("inference", min_memory_mb=12000, model_size="xlarge").min_memory_mb == 12000
    assert analyze("inference", min_memory_mb=0).min_memory_mb == 0


def test_inference_dedicated() -> None:
    assert figures(analyze("inference", dedicated=True)) == (1, 8192, 8, 80.0)
    assert analyze("inference", dedicated=True, min_memory_mb=4096).min_memory_mb == 8192
    assert analyze("inference", dedicated=True, min_memory_mb=20000).min_memory_mb == 20000
    assert figures(analyze("inference", dedicated=False)) == (1, 4096, 7, 80.0)


@pytest.mark.parametrize(
    ("concurrent", "gpus"), [(0, 1), (10, 1), (11, 2), (20, 2), (21, 4), (500, 4)]
)
def test_inference_concurrent_requests(concurrent: int, gpus: int) -> None:
    estimate = analyze("inference", concurrent_requests=concurrent)
    assert figures(estimate) == (gpus, 4096, 7, 80.0)


# --- embedding, ocr, graph_processing, generic -------------------------------


@pytest.mark.parametrize(("batch_size", "gpus"), [(32, 1), (33, 2), (4096, 2)])
def test_embedding_batch_size(batch_size: int, gpus: int) -> None:
    assert figures(analyze("embedding", batch_size=batch_size)) == (gpus, 2048, 6, 85.0)


@pytest.mark.parametrize(("images", "gpus"), [(0, 1), (100, 1), (101, 2)])
def test_ocr_image_count(images: int, gpus: int) -> None:
    assert figures(analyze("ocr", image_count=images)) == (gpus, 4096, 6, 80.0)


@pytest.mark.parametrize(("nodes", "memory"), [(1_000_000, 4096), (1_000_001, 8192)])
def test_graph_processing_node_count(nodes: int, memory: int) -> None:
    assert figures(analyze("graph_processing", node_count=nodes)) == (1, memory, 5, 75.0)


def test_graph_processing_never_estimates_from_parameters() -> None:
    estimate = analyze("graph_processing", params_b=70, model_name="llama-3-70b")
    assert figures(estimate) == (1, 4096, 5, 75.0)
    assert estimate.estimate["method"] == "table"


def test_generic_takes_the_callers_figures_as_given() -> None:
    estimate = analyze("generic", required_gpus=4, min_memory_mb=40000, priority=9)
    assert figures(estimate) == (4, 40000, 9, 80.0)
    assert figures(analyze("generic", required_gpus=64, min_memory_mb=2_097_152, priority=1)) == (
        64,
        2_097_152,
        1,
        80.0,
    )
    assert figures(analyze("generic", min_memory_mb=0, priority=10)) == (1, 0, 10, 80.0)
    # generic never estimates: a model name is the caller's own business.
    assert analyze("generic", model_name="llama-3-70b").estimate["method"] == "table"


# --- model names -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params_b"),
    [
        ("llama-3-70b", 70.0),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", 8.0),
        ("qwen2.5-7b", 7.0),
        ("Qwen2-72B-Instruct", 72.0),
        ("mixtral-8x7b", 46.7),  # Mistral's published total, not 8 x 7 = 56
        ("Mixtral-8x22B-v0.1", 141.0),
        ("toy-moe-4x2b", 8.0),  # no published total: experts x size
        ("gemma-2b", 2.0),
        ("phi-3-mini-3.8b", 3.8),
        ("vaultgemma-1b", 1.0),
        ("bigscience/bloom-7b1", 7.1),
        ("facebook/opt-350m", 0.35),
        ("Qwen2.5-7B-Instruct-1M", 7.0),  # 1M is the context length
        ("Qwen3-30B-A3B", 30.0),  # A3B is the active count
        ("allenai/OLMoE-1B-7B", 7.0),  # the larger of two sizes
        ("llama3.1:8b", 8.0),
        ("vicuna-7b-v1.5", 7.0),
    ],
)
def test_parse_model_params(name: str, params_b: float) -> None:
    assert parse_model_params_b(name) == params_b


@pytest.mark.parametrize(
    "name", ["bert-base-uncased", "qwen2.5", "phi-3-mini", "mistral-8k", "model-0b", ""]
)
def test_names_without_a_size(name: str) -> None:
    assert parse_model_params_b(name) is None


def test_a_72b_model_is_not_2b_class() -> None:
    # Seed bug: "2b" in "qwen2-72b" matched. 72B bf16: 137329.1 MiB x 1.2 = 164794.9 MiB,
    # / 73403.1 = 2.25 -> 3 -> TP 4; ceil(164794.9 / 4) = 41199. Priority stays 7.
    estimate = analyze("inference", model_name="Qwen2-72B-Instruct")
    assert figures(estimate) == (4, 41199, 7, 80.0)
    assert estimate.estimate["params_b"] == 72.0
    assert not any("2B-class" in rule for rule in estimate.estimate["rules"])


def test_a_27b_model_is_not_7b_class() -> None:
    # Seed bug's twin: "7b" in "gemma-2-27b". 27B bf16: 51498.4 x 1.2 = 61798.1 -> 1 GPU.
    assert figures(analyze("inference", model_name="gemma-2-27b-it")) == (1, 61799, 7, 80.0)


# --- parameter estimates: inference ------------------------------------------


def test_llama_3_70b_bf16_on_80gb_needs_four_gpus() -> None:
    # 70e9 x 2 B = 133514.4 MiB; +20% = 160217.3; / 73403.1 = 2.18 -> 3 -> TP 4.
    estimate = analyze("inference", model_name="llama-3-70b")
    assert figures(estimate) == (4, 40055, 7, 80.0)
    e = estimate.estimate
    assert e["method"] == "parameters"
    assert (e["params_b"], e["precision"], e["bytes_per_param"]) == (70.0, "bf16", 2.0)
    assert (e["weights_mb"], e["overhead_mb"], e["kv_cache_mb"]) == (133514.4, 26702.9, 0.0)
    assert (e["total_mb"], e["usable_gpu_memory_mb"]) == (160217.3, 73403.1)
    assert (e["gpus_for_memory"], e["tensor_parallel"]) == (3, 4)
    assert (e["gpu_memory_mb"], e["gpu_memory_assumed"]) == (81559, True)
    assert any("assumed 80 GB" in rule for rule in e["rules"])
    json.dumps(e)  # the account is JSON as it stands


def test_7b_fp16_fits_one_gpu_and_is_7b_class() -> None:
    # 7e9 x 2 B = 13351.4 MiB; +20% = 16021.7 -> 1 GPU, 16022 MiB; 7B-class: priority 8, util 85.
    estimate = analyze("inference", model_name="mistral-7b-instruct", precision="fp16")
    assert figures(estimate) == (1, 16022, 8, 85.0)


def test_2b_class_keeps_the_inference_defaults() -> None:
    # 2e9 x 2 B = 3814.7 MiB; +20% = 4577.6 MiB.
    estimate = analyze("inference", model_name="gemma-2b")
    assert figures(estimate) == (1, 4578, 7, 80.0)
    assert any(rule.startswith("2B-class") for rule in estimate.estimate["rules"])


@pytest.mark.parametrize(
    ("params_b", "priority", "utilization"),
    [
        (1.49, 7, 80.0),
        (1.5, 7, 80.0),
        (3.99, 7, 80.0),
        (4.0, 8, 85.0),
        (9.99, 8, 85.0),
        (10.0, 7, 80.0),
    ],
)
def test_inference_class_bounds(params_b: float, priority: int, utilization: float) -> None:
    estimate = analyze("inference", params_b=params_b)
    assert (estimate.priority, estimate.max_utilization) == (priority, utilization)


def test_vaultgemma_1b_estimates_memory_but_keeps_its_priority() -> None:
    # 1e9 x 2 B = 1907.3 MiB; +20% = 2288.8 MiB.
    assert figures(analyze("inference", model_name="vaultgemma-1b")) == (1, 2289, 6, 75.0)
    # dedicated still lifts memory to 8192 and priority to 8.
    estimate = analyze("inference", model_name="vaultgemma-1b", dedicated=True)
    assert figures(estimate) == (1, 8192, 8, 75.0)


def test_params_b_wins_over_the_name() -> None:
    estimate = analyze("inference", params_b=7, model_name="llama-3-70b")
    assert estimate.estimate["params_b"] == 7.0
    assert estimate.required_gpus == 1


def test_precision_and_a_smaller_gpu() -> None:
    # 70e9 x 0.5 B = 33378.6 MiB; +20% = 40054.3; usable 0.9 x 24576 = 22118.4 -> 2 GPUs.
    estimate = analyze("inference", gpu_memory_mb=24576, params_b=70, precision="INT4")
    assert figures(estimate) == (2, 20028, 7, 80.0)
    assert (estimate.estimate["gpu_memory_mb"], estimate.estimate["gpu_memory_assumed"]) == (
        24576,
        False,
    )
    assert not any("assumed" in rule for rule in estimate.estimate["rules"])


@pytest.mark.parametrize(
    ("precision", "bytes_per_param", "weights_mb"),
    [
        ("fp32", 4.0, 26702.9),
        ("bf16", 2.0, 13351.4),
        ("fp16", 2.0, 13351.4),
        ("fp8", 1.0, 6675.7),
        ("int8", 1.0, 6675.7),
        ("int4", 0.5, 3337.9),
    ],
)
def test_bytes_per_param(precision: str, bytes_per_param: float, weights_mb: float) -> None:
    estimate = analyze("inference", params_b=7, precision=precision)
    assert estimate.estimate["bytes_per_param"] == bytes_per_param
    assert estimate.estimate["weights_mb"] == weights_mb


def test_mixtral_uses_its_published_total() -> None:
    # 46.7e9 x 2 B = 89073.2 MiB; +20% = 106887.8 -> 2 GPUs, ceil(106887.8 / 2) = 53444.
    assert figures(analyze("inference", model_name="mixtral-8x7b")) == (2, 53444, 7, 80.0)


def test_just_over_one_gpu_takes_two() -> None:
    # 34B bf16: 64849.9 x 1.2 = 77819.8 MiB > 73403.1 -> 2 GPUs.
    assert figures(analyze("inference", params_b=34)) == (2, 38910, 7, 80.0)


def test_five_gpus_round_up_to_tensor_parallel_eight() -> None:
    # 140B bf16: 267028.8 x 1.2 = 320434.6 MiB / 73403.1 = 4.37 -> 5 -> TP 8.
    estimate = analyze("inference", params_b=140)
    assert figures(estimate) == (8, 40055, 7, 80.0)
    assert (estimate.estimate["gpus_for_memory"], estimate.estimate["tensor_parallel"]) == (5, 8)


def test_kv_cache_given() -> None:
    # 8B bf16: 15258.8 x 1.2 = 18310.5 MiB, + 10 GiB = 28550.5 MiB.
    estimate = analyze("inference", params_b=8, kv_cache_gb=10)
    assert figures(estimate) == (1, 28551, 8, 85.0)
    assert estimate.estimate["kv_cache_mb"] == 10240.0


def test_kv_cache_from_model_dimensions() -> None:
    # Llama-3-8B: 2 x 32 layers x 8 kv heads x 128 x 8192 tokens x 4 sequences x 2 B
    # = 4 GiB = 4096 MiB exactly; 18310.5 + 4096 = 22406.5 MiB.
    estimate = analyze(
        "inference",
        model_name="llama-3-8b",
        context_length=8192,
        batch_size=4,
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
    )
    assert figures(estimate) == (1, 22407, 8, 85.0)
    assert estimate.estimate["kv_cache_mb"] == 4096.0
    # batch_size defaults to one sequence.
    one = analyze(
        "inference", params_b=8, context_length=8192, num_layers=32, num_kv_heads=8, head_dim=128
    )
    assert one.estimate["kv_cache_mb"] == 1024.0


def test_context_length_alone_is_left_to_the_overhead() -> None:
    estimate = analyze("inference", params_b=8, context_length=8192)
    assert estimate.estimate["kv_cache_mb"] == 0.0
    assert "left to the overhead" in estimate.estimate["kv_cache_rule"]


def test_concurrency_splits_the_estimate_over_more_gpus() -> None:
    # 16021.7 MiB over 4 GPUs: ceil(4005.4) = 4006.
    assert figures(analyze("inference", params_b=7, concurrent_requests=25)) == (4, 4006, 8, 85.0)


def test_given_min_memory_mb_overrides_the_estimate() -> None:
    estimate = analyze("inference", model_name="llama-3-70b", min_memory_mb=70000)
    assert figures(estimate) == (4, 70000, 7, 80.0)


def test_model_size_is_ignored_when_parameters_are_known() -> None:
    assert analyze("inference", params_b=7, model_size="small").min_memory_mb == 16022
    assert figures(analyze("training", params_b=7, model_size="xlarge", method="lora")) == (
        1,
        17304,
        5,
        90.0,
    )


def test_embedding_and_ocr_use_the_serving_estimate() -> None:
    # 7B bf16 = 16021.7 MiB; embedding batch_size > 32 still asks 2 GPUs.
    embedding = analyze("embedding", model_name="e5-mistral-7b-instruct", batch_size=64)
    assert figures(embedding) == (2, 8011, 6, 85.0)
    assert figures(analyze("ocr", model_name="olmOCR-7B-0225-preview")) == (1, 16022, 6, 80.0)


# --- parameter estimates: training -------------------------------------------


def test_70b_full_training_needs_a_multiple_of_eight() -> None:
    # 70e9 x 16 B = 1068115.2 MiB; activations 20% = 213623.0; total 1281738.3 MiB
    # / 73403.1 = 17.46 -> 18 -> 24 (beyond 8: multiples of 8).
    estimate = analyze("training", model_name="llama-3-70b")
    assert figures(estimate) == (24, 53406, 5, 90.0)
    e = estimate.estimate
    assert (e["training_method"], e["bytes_per_param"]) == ("full", 16)
    assert (e["model_states_mb"], e["activations_mb"], e["total_mb"]) == (
        1068115.2,
        213623.0,
        1281738.3,
    )
    assert (e["gpus_for_memory"], e["tensor_parallel"]) == (18, 24)
    assert estimate.required_gpus % 8 == 0
    json.dumps(e)


def test_full_training_is_16_bytes_per_param_whatever_the_precision() -> None:
    # 7e9 x 16 B = 106811.5 MiB x 1.2 = 128173.8 -> 2 GPUs.
    for precision in ("fp32", "bf16"):
        estimate = analyze("training", params_b=7, precision=precision, method="full")
        assert figures(estimate) == (2, 64087, 5, 90.0)


def test_activations_given() -> None:
    # 1068115.2 + 100 GiB (102400) = 1170515.2 MiB / 73403.1 = 15.95 -> 16.
    estimate = analyze("training", params_b=70, activations_gb=100)
    assert figures(estimate) == (16, 73158, 5, 90.0)


def test_lora() -> None:
    # weights 13351.4 + adapters 7e9 x 1% x 16 B = 1068.1 -> 14419.6; +20% = 17303.5 MiB.
    estimate = analyze("training", params_b=7, method="lora")
    assert figures(estimate) == (1, 17304, 5, 90.0)
    e = estimate.estimate
    assert (e["weights_mb"], e["adapters_mb"], e["activations_mb"]) == (13351.4, 1068.1, 2883.9)


def test_qlora_defaults_to_int4() -> None:
    # 65e9 x 0.5 B = 30994.0 + 65e9 x 1% x 16 B = 9918.2 -> 40912.2; +20% = 49095.2 MiB.
    estimate = analyze("training", params_b=65, method="qlora")
    assert figures(estimate) == (1, 49096, 5, 90.0)
    assert estimate.estimate["precision"] == "int4"


def test_training_gpu_rules_still_raise_the_estimate() -> None:
    # 17303.5 MiB over 4 GPUs (batch_size > 128): ceil(4325.9) = 4326.
    estimate = analyze("training", params_b=7, method="lora", batch_size=200)
    assert figures(estimate) == (4, 4326, 5, 90.0)
    assert analyze("training", params_b=7, method="lora", multi_gpu=True).required_gpus == 2


# --- tensor-parallel rounding ------------------------------------------------


@pytest.mark.parametrize(
    ("needed", "size"),
    [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16), (16, 16), (17, 24), (65, 72)],
)
def test_tensor_parallel_sizes(needed: int, size: int) -> None:
    assert tensor_parallel_size(needed) == size


def test_min_memory_is_the_total_split_evenly() -> None:
    estimate = analyze("inference", params_b=70)
    assert estimate.min_memory_mb == math.ceil(estimate.estimate["total_mb"] / 4) == 40055
    assert estimate.estimate["rules"][-1] == "min_memory_mb = ceil(160217.3 MB / 4 GPUs)"


# --- errors ------------------------------------------------------------------


def test_unknown_workload_type_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidRequest) as raised:
        analyze_workload("rendering", {})
    assert raised.value.code == "unknown_workload_type"
    for name in WORKLOAD_TYPES:
        assert name in raised.value.message


def test_an_integral_float_counts_as_an_integer() -> None:
    """The API's integer rule holds inside workload_data too: 128.0 is 128 (docs/api.md, Conventions)."""
    assert figures(analyze("training", batch_size=128.0)) == figures(analyze("training", batch_size=128))
    assert analyze("graph_processing", node_count=2e6).min_memory_mb == 8192


def test_a_model_name_is_capped_like_params_b() -> None:
    """A size parsed from model_name obeys params_b's bound, so no name sizes billions of GPUs."""
    with pytest.raises(InvalidRequest, match="model_name") as raised:
        analyze("inference", model_name="llama-999999999999b")
    assert "10000" in raised.value.message
    with pytest.raises(Unsatisfiable):  # at the bound the name parses; the GPUs are what is too many
        analyze("inference", model_name="llama-10000b")


def test_an_estimate_above_64_gpus_is_unsatisfiable() -> None:
    """No allocation can hold more than 64 GPUs, so a bigger estimate is a 400, never a figure."""
    with pytest.raises(Unsatisfiable, match="2496 GPUs"):
        analyze("training", params_b=10000)
    with pytest.raises(Unsatisfiable):
        analyze("inference", params_b=7, kv_cache_gb=1_000_000)


def test_workload_data_must_be_a_mapping() -> None:
    with pytest.raises(InvalidRequest, match="workload_data"):
        analyze_workload("inference", ["model_name"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("workload_type", "data", "field"),
    [
        ("training", {"batch_size": 0}, "batch_size"),
        ("training", {"batch_size": -8}, "batch_size"),
        ("training", {"batch_size": "8"}, "batch_size"),
        ("training", {"batch_size": True}, "batch_size"),
        ("training", {"batch_size": 8.5}, "batch_size"),
        ("embedding", {"batch_size": 0}, "batch_size"),
        ("training", {"model_size": "huge"}, "model_size"),
        ("training", {"model_size": 3}, "model_size"),
        ("inference", {"model_size": "tiny"}, "model_size"),
        ("training", {"multi_gpu": "yes"}, "multi_gpu"),
        ("inference", {"dedicated": 1}, "dedicated"),
        ("inference", {"precision": "fp64", "params_b": 7}, "precision"),
        ("inference", {"precision": "fp64"}, "precision"),  # checked even without parameters
        ("training", {"precision": 16}, "precision"),
        ("training", {"method": "dpo", "params_b": 7}, "method"),
        ("training", {"method": "dpo"}, "method"),
        ("training", {"method": "qlora", "precision": "bf16", "params_b": 7}, "precision"),
        ("inference", {"params_b": 0}, "params_b"),
        ("inference", {"params_b": -7}, "params_b"),
        ("inference", {"params_b": True}, "params_b"),
        ("inference", {"params_b": "70"}, "params_b"),
        ("inference", {"params_b": float("nan")}, "params_b"),
        ("inference", {"params_b": float("inf")}, "params_b"),
        ("inference", {"params_b": 10_001}, "params_b"),
        ("training", {"params_b": False}, "params_b"),
        ("inference", {"model_name": 7}, "model_name"),
        ("training", {"model_name": ["llama"]}, "model_name"),
        ("inference", {"min_memory_mb": -1}, "min_memory_mb"),
        ("inference", {"min_memory_mb": 2_097_153}, "min_memory_mb"),
        ("inference", {"concurrent_requests": -1}, "concurrent_requests"),
        ("inference", {"concurrent_requests": False}, "concurrent_requests"),
        ("inference", {"kv_cache_gb": -1, "params_b": 7}, "kv_cache_gb"),
        ("inference", {"kv_cache_gb": True, "params_b": 7}, "kv_cache_gb"),
        ("inference", {"context_length": 0, "params_b": 7}, "context_length"),
        (
            "inference",
            {"params_b": 7, "context_length": 4096, "num_layers": 32, "num_kv_heads": 8},
            "head_dim",
        ),
        (
            "inference",
            {"params_b": 7, "num_layers": 32, "num_kv_heads": 8, "head_dim": 128},
            "context_length",
        ),
        ("inference", {"num_layers": 32, "context_length": 4096}, "num_kv_heads"),
        ("training", {"activations_gb": "lots", "params_b": 7}, "activations_gb"),
        ("ocr", {"image_count": "many"}, "image_count"),
        ("graph_processing", {"node_count": 1.5}, "node_count"),
        ("graph_processing", {"node_count": -1}, "node_count"),
        ("generic", {"required_gpus": 0}, "required_gpus"),
        ("generic", {"required_gpus": 65}, "required_gpus"),
        ("generic", {"required_gpus": True}, "required_gpus"),
        ("generic", {"min_memory_mb": -1}, "min_memory_mb"),
        ("generic", {"min_memory_mb": 2_097_153}, "min_memory_mb"),
        ("generic", {"priority": 0}, "priority"),
        ("generic", {"priority": 11}, "priority"),
        ("generic", {"priority": 5.5}, "priority"),
    ],
)
def test_bad_fields_are_named(workload_type: str, data: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        analyze_workload(workload_type, data)
    assert raised.value.code == "invalid_request"
    assert f"workload_data.{field} " in raised.value.message


@pytest.mark.parametrize("gpu_memory_mb", [0, -1, True])
def test_gpu_memory_must_be_a_positive_integer(gpu_memory_mb: int) -> None:
    with pytest.raises(InvalidRequest, match="gpu_memory_mb"):
        analyze_workload("inference", {"params_b": 7}, gpu_memory_mb=gpu_memory_mb)


def test_null_fields_count_as_absent() -> None:
    estimate = analyze_workload("training", {"model_size": None, "batch_size": None})
    assert figures(estimate) == (1, 8192, 5, 90.0)


def test_same_input_same_answer() -> None:
    data = {"model_name": "llama-3-70b", "kv_cache_gb": 20, "concurrent_requests": 12}
    assert analyze_workload("inference", data) == analyze_workload("inference", dict(data))
