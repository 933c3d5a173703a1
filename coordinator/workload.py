"""The workload analyzer: from a workload description to GPU requirements.

Theory of operation
-------------------
A request names a `workload_type` and carries free-form `workload_data`. The
analyzer answers how many GPUs (on one node), how much free memory on each,
which priority, and how busy a GPU may already be. It is pure: same inputs,
same answer, no I/O. Every figure is explained in `WorkloadEstimate.estimate`.

There are two ways to a memory figure, tried in this order:

1. *Parameters.* For the model-running types (training, inference, embedding,
   ocr), when the parameter count is known, from `params_b` or parsed from
   `model_name` ("llama-3-70b" is 70 billion), memory is computed from bytes
   per parameter, split over a tensor-parallel group of GPUs of the model the
   job will run on. The table's memory figures are then not used.
2. *Table.* Otherwise the seed's per-type table gives fixed figures.

In both, the type's rules are then applied in the table's order. A rule only
ever raises a GPU count (the seed let `batch_size` lower the count that
`model_size` had set; that was a bug), and priority and max_utilization come
from the table's rules whichever way memory was found.

Every constant below is documented, with its source, in
docs/workload-analyzer.md; keep the two in step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from coordinator.errors import InvalidRequest, Unsatisfiable, brief

WORKLOAD_TYPES: tuple[str, ...] = (
    "training",
    "inference",
    "embedding",
    "ocr",
    "graph_processing",
    "generic",
)

# Types that run a model whose parameter count decides its memory. Graph
# processing is sized by the graph, generic by the caller, so both stay on the table.
_PARAMETER_TYPES: Final = frozenset({"training", "inference", "embedding", "ocr"})

# When the caller does not know the GPU model: H100 80GB, whose NVML total is 81559 MiB.
ASSUMED_GPU_MEMORY_MB: Final = 81559
# Share of a GPU's memory a job may plan to fill: vLLM's default gpu_memory_utilization.
# The rest is the CUDA context, NCCL buffers and allocator fragmentation.
USABLE_GPU_FRACTION: Final = 0.90
# Serving overhead on top of the weights (activation buffers, fragmentation, a modest
# KV cache): the 1.2 factor of the common sizing formula M = P * (Q / 8) * 1.2.
SERVING_OVERHEAD_FRACTION: Final = 0.20
# Full training with Adam in mixed precision: 2 (fp16 weights) + 2 (fp16 gradients)
# + 12 (fp32 master weights, momentum, variance) bytes; ZeRO paper section 3.1.
FULL_TRAINING_BYTES_PER_PARAM: Final = 16
# Activations when training, as a share of the model states: a planning margin that
# assumes activation checkpointing; the caller's `activations_gb` replaces it.
ACTIVATION_FRACTION: Final = 0.20
# LoRA: share of parameters that are trainable adapters (rank 64 on every linear
# layer of a LLaMA-class model is about 1.2%), each carrying the full 16 bytes.
LORA_TRAINABLE_FRACTION: Final = 0.01
# KV cache element size when computed from model dimensions: bf16/fp16.
KV_CACHE_BYTES_PER_ELEMENT: Final = 2

BYTES_PER_PARAM: Final[Mapping[str, float]] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}
DEFAULT_PRECISION: Final = "bf16"
TRAINING_METHODS: Final = ("full", "lora", "qlora")
MODEL_SIZES: Final = ("small", "medium", "large", "xlarge")

# Mixture-of-experts names give experts x expert size; experts share attention and
# embeddings, so the true total is below the product. Published totals:
# Mixtral 8x7B 46.7B and 8x22B 141B (Mistral AI announcements).
MOE_TOTAL_PARAMS_B: Final[Mapping[tuple[int, float], float]] = {
    (8, 7.0): 46.7,
    (8, 22.0): 141.0,
}

# The inference table's model classes, by parameter count in billions: [low, high).
CLASS_2B: Final = (1.5, 4.0)
CLASS_7B: Final = (4.0, 10.0)

# Bounds: the same as the allocate body's, and beyond any real model or graph.
MAX_GPUS: Final = 64
MAX_MEMORY_MB: Final = 2_097_152
MAX_PARAMS_B: Final = 10_000.0
MAX_GB: Final = 1_000_000.0
MAX_COUNT: Final = 10**12

_MIB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class WorkloadEstimate:
    """What a workload needs, and how that was worked out."""

    required_gpus: int  # GPUs on one node
    min_memory_mb: int  # free memory (MiB) needed on EACH chosen GPU
    priority: int  # 1..10, higher first
    max_utilization: float  # percent 0..100; a GPU busier than this is not chosen
    estimate: dict[str, Any]  # JSON-serialisable account: method, rules, and every term


@dataclass(frozen=True, slots=True)
class _Defaults:
    gpus: int
    memory_mb: int
    priority: int
    max_utilization: float


# The seed's defaults per type: required_gpus / min_memory_mb / priority / max_utilization.
_DEFAULTS: Final[Mapping[str, _Defaults]] = {
    "training": _Defaults(1, 8192, 5, 90.0),
    "inference": _Defaults(1, 4096, 7, 80.0),
    "embedding": _Defaults(1, 2048, 6, 85.0),
    "ocr": _Defaults(1, 4096, 6, 80.0),
    "graph_processing": _Defaults(1, 4096, 5, 75.0),
    "generic": _Defaults(1, 4096, 5, 80.0),
}

# training `model_size`: GPUs and MiB per GPU.
_TRAINING_SIZES: Final[Mapping[str, tuple[int, int]]] = {
    "small": (1, 4096),
    "medium": (2, 8192),
    "large": (4, 16384),
    "xlarge": (8, 32768),
}
# inference `model_size`: small and medium cap the memory, large and xlarge raise it.
_INFERENCE_SIZE_CAPS: Final[Mapping[str, int]] = {"small": 2048, "medium": 4096}
_INFERENCE_SIZE_FLOORS: Final[Mapping[str, int]] = {"large": 8192, "xlarge": 16384}


class _Fields:
    """Typed, validated reads of workload_data; a missing or null key is None."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def _get(self, key: str) -> Any:
        return self._data.get(key)

    def has(self, key: str) -> bool:
        return self._get(key) is not None

    def raw(self, key: str) -> Any:
        """The value as given (None when missing or null), for fields with a shape of their own."""
        return self._get(key)

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self._get(key)
        if value is None:
            return None
        if not _is_int(value) or not low <= value <= high:
            raise InvalidRequest(
                f"workload_data.{key} must be an integer from {low} to {high}, got {_quote(value)}"
            )
        return int(value)

    def number(self, key: str, *, positive: bool, high: float) -> float | None:
        value = self._get(key)
        if value is None:
            return None
        ok = (
            _is_number(value)
            and math.isfinite(value)
            and (value > 0 if positive else value >= 0)
            and value <= high
        )
        if not ok:
            kind = "a positive number" if positive else "a non-negative number"
            raise InvalidRequest(
                f"workload_data.{key} must be {kind} of at most {high:g}, got {_quote(value)}"
            )
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise InvalidRequest(f"workload_data.{key} must be true or false, got {_quote(value)}")
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, str) or value.lower() not in options:
            raise InvalidRequest(
                f"workload_data.{key} must be one of {', '.join(options)}, got {_quote(value)}"
            )
        return value.lower()

    def string(self, key: str) -> str | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InvalidRequest(f"workload_data.{key} must be a string, got {_quote(value)}")
        return value


def _quote(value: object) -> str:
    return brief(repr(value))


def _is_int(value: object) -> bool:
    """An integer, or a float with an integral value: the API's rule, so 128.0 counts as 128."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(slots=True)
class _Draft:
    """The figures while rules are applied, and the record of which rules fired.

    Per-GPU memory is fixed (`memory_mb`, the table's way) or split from a total
    (`total_mb`, the parameter way) once the GPU count is final; then the caller's
    `memory_override` replaces it and `memory_floor` raises it.
    """

    gpus: int
    memory_mb: int
    priority: int
    max_utilization: float
    total_mb: float | None = None
    memory_override: int | None = None
    memory_floor: int = 0
    rules: list[str] = field(default_factory=list)

    def at_least_gpus(self, gpus: int, why: str) -> None:
        if gpus > self.gpus:
            self.gpus = gpus
            self.rules.append(f"{why} -> at least {gpus} GPUs")
        else:
            self.rules.append(f"{why} -> at least {gpus} GPUs (already {self.gpus})")

    def per_gpu_memory_mb(self) -> int:
        memory = self.memory_mb if self.total_mb is None else math.ceil(self.total_mb / self.gpus)
        if self.memory_override is not None:
            memory = self.memory_override
        return max(memory, self.memory_floor)


def analyze_workload(
    workload_type: str,
    workload_data: Mapping[str, Any],
    *,
    gpu_memory_mb: int | None = None,
) -> WorkloadEstimate:
    """Estimate what a workload needs.

    `gpu_memory_mb` is the total memory (MiB) of the GPU model the job will run on;
    None means unknown, and an H100 80GB (81559 MiB) is assumed and said so.

    Returns a WorkloadEstimate. Raises InvalidRequest, naming the field, for an
    unknown workload_type, for ill-typed or out-of-range fields of workload_data
    (booleans are not numbers; a model_name stating more than MAX_PARAMS_B billion
    parameters is out of range like params_b), and for a gpu_memory_mb that is not a
    positive integer. Raises Unsatisfiable when the estimate needs more than MAX_GPUS
    GPUs, which no allocation can have. Keys the analyzer does not read are ignored.
    """
    if workload_type not in WORKLOAD_TYPES:
        raise InvalidRequest(
            f"workload_type must be one of {', '.join(WORKLOAD_TYPES)}, got {workload_type!r}",
            code="unknown_workload_type",
        )
    if not isinstance(workload_data, Mapping):
        raise InvalidRequest("workload_data must be a JSON object")
    if gpu_memory_mb is not None and (not _is_int(gpu_memory_mb) or gpu_memory_mb <= 0):
        raise InvalidRequest(f"gpu_memory_mb must be a positive integer, got {gpu_memory_mb!r}")

    fields = _Fields(workload_data)
    defaults = _DEFAULTS[workload_type]
    draft = _Draft(defaults.gpus, defaults.memory_mb, defaults.priority, defaults.max_utilization)
    estimate: dict[str, Any] = {"workload_type": workload_type}

    params = _parameter_count(fields) if workload_type in _PARAMETER_TYPES else None
    if params is None:
        estimate["method"] = "table"
        draft.rules.append(
            f"{workload_type} defaults: {defaults.gpus} GPU(s), {defaults.memory_mb} MB, "
            f"priority {defaults.priority}, max_utilization {defaults.max_utilization:g}"
        )
        if workload_type in _PARAMETER_TYPES:
            _check_unused_sizing_fields(fields, workload_type, draft)
    else:
        params_b, source = params
        estimate["method"] = "parameters"
        draft.rules.append(source)
        draft.rules.append(
            f"{workload_type} defaults: priority {defaults.priority}, "
            f"max_utilization {defaults.max_utilization:g}"
        )
        if workload_type == "training":
            terms = _training_terms(fields, params_b)
        else:
            terms = _serving_terms(fields, params_b)
        estimate.update(terms)
        estimate.update(_split_over_gpus(draft, terms["total_mb"], gpu_memory_mb))

    _RULES[workload_type](draft, fields, None if params is None else params[0])
    _workflow_rules(draft, fields, estimate)

    if draft.gpus > MAX_GPUS:
        raise Unsatisfiable(
            f"by the estimate this {workload_type} workload needs {draft.gpus} GPUs on one node; "
            f"one allocation has at most {MAX_GPUS}"
        )
    if draft.total_mb is not None and draft.memory_override is None:
        draft.rules.append(f"min_memory_mb = ceil({_mb(draft.total_mb)} MB / {draft.gpus} GPUs)")
    estimate["rules"] = draft.rules
    return WorkloadEstimate(
        required_gpus=draft.gpus,
        min_memory_mb=draft.per_gpu_memory_mb(),
        priority=draft.priority,
        max_utilization=draft.max_utilization,
        estimate=estimate,
    )


# --- the parameter count ---------------------------------------------------

_MOE_TOKEN: Final = re.compile(r"(\d+)x(\d+(?:\.\d+)?)b")
_BILLIONS_TOKEN: Final = re.compile(r"(\d+(?:\.\d+)?)b")
_BLOOM_TOKEN: Final = re.compile(r"(\d+)b(\d)")  # BLOOM's "7b1" = 7.1B
_MILLIONS_TOKEN: Final = re.compile(r"(\d+(?:\.\d+)?)m")


def _parameter_count(fields: _Fields) -> tuple[float, str] | None:
    """(billions of parameters, the rule that found them), or None when unknown."""
    params_b = fields.number("params_b", positive=True, high=MAX_PARAMS_B)
    if params_b is not None:
        return params_b, f"params_b = {params_b:g} (given)"
    name = fields.string("model_name")
    if name is None:
        return None
    parsed = parse_model_params_b(name)
    if parsed is None:
        return None
    if parsed > MAX_PARAMS_B:
        raise InvalidRequest(
            f"workload_data.model_name {_quote(name)} states {parsed:g}B parameters, "
            f"more than the {MAX_PARAMS_B:g}B that params_b allows"
        )
    return parsed, f"model_name {_quote(name)} -> {parsed:g}B parameters"


def parse_model_params_b(model_name: str) -> float | None:
    """The parameter count, in billions, that a model name states; None if it states none.

    The name is lower-cased and split on anything but letters, digits and dots.
    A token that is exactly a size counts: "70b", "3.8b", "7b1" (BLOOM: 7.1B),
    "8x7b" (experts x size: a published total where known, else the product), or
    "560m" (millions, only when no billions token is present). Tokens such as
    "a3b" (active parameters), "v0.1", "8k" or "qwen2.5" are not sizes. When
    several sizes appear the largest is taken, so memory errs on the safe side.
    """
    billions: list[float] = []
    millions: list[float] = []
    for raw in re.split(r"[^a-z0-9.]+", model_name.lower()):
        token = raw.strip(".")
        if m := _MOE_TOKEN.fullmatch(token):
            experts, size = int(m[1]), float(m[2])
            billions.append(MOE_TOTAL_PARAMS_B.get((experts, size), experts * size))
        elif m := _BILLIONS_TOKEN.fullmatch(token):
            billions.append(float(m[1]))
        elif m := _BLOOM_TOKEN.fullmatch(token):
            billions.append(float(f"{m[1]}.{m[2]}"))
        elif m := _MILLIONS_TOKEN.fullmatch(token):
            millions.append(float(m[1]) / 1000)
    sizes = [b for b in (billions or millions) if b > 0]
    return max(sizes) if sizes else None


# --- memory from the parameter count ---------------------------------------


def _precision(fields: _Fields, default: str) -> tuple[str, float]:
    precision = fields.choice("precision", tuple(BYTES_PER_PARAM)) or default
    return precision, BYTES_PER_PARAM[precision]


def _to_mb(n_bytes: float) -> float:
    return n_bytes / _MIB


def _mb(value: float) -> float:
    """A MiB figure rounded for the human-readable account."""
    return round(value, 1)


def _serving_terms(fields: _Fields, params_b: float) -> dict[str, Any]:
    """Inference, embedding, ocr: weights + overhead + KV cache."""
    precision, bpp = _precision(fields, DEFAULT_PRECISION)
    weights_mb = _to_mb(params_b * 1e9 * bpp)
    overhead_mb = SERVING_OVERHEAD_FRACTION * weights_mb
    kv_mb, kv_rule = _kv_cache_mb(fields)
    total_mb = weights_mb + overhead_mb + kv_mb
    return {
        "params_b": params_b,
        "precision": precision,
        "bytes_per_param": bpp,
        "weights_mb": _mb(weights_mb),
        "overhead_fraction": SERVING_OVERHEAD_FRACTION,
        "overhead_mb": _mb(overhead_mb),
        "kv_cache_mb": _mb(kv_mb),
        "kv_cache_rule": kv_rule,
        "total_mb": total_mb,
        "formula": "total = params x bytes_per_param x (1 + overhead_fraction) + kv_cache",
    }


_KV_DIMS: Final = ("num_layers", "num_kv_heads", "head_dim")
_KV_MISSING: Final = (
    "workload_data.{key} is required to compute the KV cache "
    "(give context_length, num_layers, num_kv_heads and head_dim, or kv_cache_gb)"
)


def _kv_cache_mb(fields: _Fields) -> tuple[float, str]:
    """The KV cache in MiB and how it was found: given, computed, or left to the overhead."""
    given_gb = fields.number("kv_cache_gb", positive=False, high=MAX_GB)
    context = fields.integer("context_length", 1, MAX_COUNT)
    batch = fields.integer("batch_size", 1, MAX_COUNT)
    dims = {key: fields.integer(key, 1, MAX_COUNT) for key in _KV_DIMS}
    if given_gb is not None:
        return given_gb * 1024, f"kv_cache_gb = {given_gb:g} GiB (given)"
    if all(value is None for value in dims.values()):
        if context is not None:
            return 0.0, "context_length without model dimensions: KV cache left to the overhead"
        return 0.0, "no KV cache figure: left to the overhead"
    tokens = _kv_term(context, "context_length")
    layers = _kv_term(dims["num_layers"], "num_layers")
    heads = _kv_term(dims["num_kv_heads"], "num_kv_heads")
    head_dim = _kv_term(dims["head_dim"], "head_dim")
    sequences = batch or 1
    n_bytes = 2 * layers * heads * head_dim * tokens * sequences * KV_CACHE_BYTES_PER_ELEMENT
    return _to_mb(n_bytes), (
        f"KV cache = 2 x {layers} layers x {heads} kv heads x {head_dim} head_dim x "
        f"{tokens} tokens x {sequences} sequences x {KV_CACHE_BYTES_PER_ELEMENT} bytes"
    )


_TRAINING_SIZING_KEYS: Final[tuple[str, ...]] = ("precision", "method", "activations_gb")
_SERVING_SIZING_KEYS: Final[tuple[str, ...]] = (
    "precision",
    "kv_cache_gb",
    "context_length",
    *_KV_DIMS,
)


def _check_unused_sizing_fields(fields: _Fields, workload_type: str, draft: _Draft) -> None:
    """Validate the sizing fields when no parameter count lets them count, and say so.

    A bad field is an error whichever way the memory is found, so the same body
    never succeeds or fails depending on whether a model name parses.
    """
    _precision(fields, DEFAULT_PRECISION)
    if workload_type == "training":
        fields.choice("method", TRAINING_METHODS)
        fields.number("activations_gb", positive=False, high=MAX_GB)
        keys = _TRAINING_SIZING_KEYS
    else:
        _kv_cache_mb(fields)
        keys = _SERVING_SIZING_KEYS
    given = [key for key in keys if fields.has(key)]
    if given:
        draft.rules.append(
            f"{', '.join(given)} not used: the parameter count is unknown "
            "(give params_b or a model_name with a size such as 7b)"
        )


def _kv_term(value: int | None, key: str) -> int:
    if value is None:
        raise InvalidRequest(_KV_MISSING.format(key=key))
    return value


def _training_terms(fields: _Fields, params_b: float) -> dict[str, Any]:
    """Full training (16 bytes/param) or LoRA/QLoRA (weights + adapters), plus activations."""
    method = fields.choice("method", TRAINING_METHODS) or "full"
    params = params_b * 1e9
    terms: dict[str, Any] = {"params_b": params_b, "training_method": method}
    if method == "full":
        # Read only to validate: 16 bytes/param holds for fp32 Adam (4+4+4+4) too.
        precision, _ = _precision(fields, DEFAULT_PRECISION)
        states_mb = _to_mb(params * FULL_TRAINING_BYTES_PER_PARAM)
        terms.update(
            precision=precision,
            bytes_per_param=FULL_TRAINING_BYTES_PER_PARAM,
            model_states_mb=_mb(states_mb),
            formula="model_states = params x 16 bytes (Adam, mixed precision: 2 + 2 + 12)",
        )
    else:
        default = "int4" if method == "qlora" else DEFAULT_PRECISION
        precision, bpp = _precision(fields, default)
        if method == "qlora" and precision != "int4":
            raise InvalidRequest(
                f"workload_data.precision must be int4 for method qlora, got {precision!r}"
            )
        weights_mb = _to_mb(params * bpp)
        adapters_mb = _to_mb(params * LORA_TRAINABLE_FRACTION * FULL_TRAINING_BYTES_PER_PARAM)
        states_mb = weights_mb + adapters_mb
        terms.update(
            precision=precision,
            bytes_per_param=bpp,
            weights_mb=_mb(weights_mb),
            lora_trainable_fraction=LORA_TRAINABLE_FRACTION,
            adapters_mb=_mb(adapters_mb),
            model_states_mb=_mb(states_mb),
            formula="model_states = params x bytes_per_param + params x 1% x 16 bytes",
        )
    given_gb = fields.number("activations_gb", positive=False, high=MAX_GB)
    if given_gb is not None:
        activations_mb = given_gb * 1024
        terms["activations_rule"] = f"activations_gb = {given_gb:g} GiB (given)"
    else:
        activations_mb = ACTIVATION_FRACTION * states_mb
        terms["activations_rule"] = f"activations = {ACTIVATION_FRACTION:g} x model_states"
    terms["activations_mb"] = _mb(activations_mb)
    terms["total_mb"] = states_mb + activations_mb
    return terms


def tensor_parallel_size(gpus_needed: int) -> int:
    """The smallest tensor-parallel size >= `gpus_needed`: 1, 2, 4, 8, then multiples of 8."""
    for size in (1, 2, 4, 8):
        if gpus_needed <= size:
            return size
    return 8 * math.ceil(gpus_needed / 8)


def _split_over_gpus(draft: _Draft, total_mb: float, gpu_memory_mb: int | None) -> dict[str, Any]:
    """Set the draft's GPU count from the total; returns the terms of the split."""
    assumed = gpu_memory_mb is None
    gpu_mb = ASSUMED_GPU_MEMORY_MB if gpu_memory_mb is None else gpu_memory_mb
    usable_mb = USABLE_GPU_FRACTION * gpu_mb
    needed = math.ceil(total_mb / usable_mb)
    tp = tensor_parallel_size(needed)
    draft.gpus = tp
    draft.total_mb = total_mb
    if assumed:
        draft.rules.append(
            f"GPU model unknown: assumed 80 GB ({ASSUMED_GPU_MEMORY_MB} MiB, H100 80GB)"
        )
    draft.rules.append(
        f"{_mb(total_mb)} MB / {_mb(usable_mb)} MB usable per GPU = {needed} GPU(s) "
        f"-> tensor-parallel size {tp}"
    )
    return {
        "total_mb": _mb(total_mb),
        "gpu_memory_mb": gpu_mb,
        "gpu_memory_assumed": assumed,
        "usable_fraction": USABLE_GPU_FRACTION,
        "usable_gpu_memory_mb": _mb(usable_mb),
        "gpus_for_memory": needed,
        "tensor_parallel": tp,
    }


# --- the table's rules, one function per type ------------------------------


def _training_rules(draft: _Draft, fields: _Fields, params_b: float | None) -> None:
    size = fields.choice("model_size", MODEL_SIZES)
    if size is not None:
        if params_b is None:
            draft.gpus, draft.memory_mb = _TRAINING_SIZES[size]
            draft.rules.append(f"model_size {size}: {draft.gpus} GPU(s), {draft.memory_mb} MB")
        else:
            draft.rules.append(f"model_size {size} ignored: the parameter count is known")
    batch = fields.integer("batch_size", 1, MAX_COUNT)
    # Larger thresholds first, and never lowering what model_size set (a seed bug).
    if batch is not None and batch > 128:
        draft.at_least_gpus(4, f"batch_size {batch} > 128")
    elif batch is not None and batch > 64:
        draft.at_least_gpus(2, f"batch_size {batch} > 64")
    if fields.boolean("multi_gpu"):
        draft.at_least_gpus(2, "multi_gpu")


def _inference_rules(draft: _Draft, fields: _Fields, params_b: float | None) -> None:
    name = fields.string("model_name") or ""
    if "vaultgemma" in name.lower():
        if params_b is None:
            draft.memory_mb = 2048
            draft.rules.append("vaultgemma: 2048 MB, priority 6, max_utilization 75")
        else:
            draft.rules.append("vaultgemma: priority 6, max_utilization 75")
        draft.priority, draft.max_utilization = 6, 75.0
    elif params_b is not None and CLASS_7B[0] <= params_b < CLASS_7B[1]:
        # The table's 16384 MB for this class is replaced by the parameter estimate.
        draft.priority, draft.max_utilization = 8, 85.0
        draft.rules.append(
            f"7B-class ({CLASS_7B[0]:g} <= {params_b:g}B < {CLASS_7B[1]:g}): "
            "priority 8, max_utilization 85"
        )
    elif params_b is not None and CLASS_2B[0] <= params_b < CLASS_2B[1]:
        # The table's 4096 MB for this class is replaced by the parameter estimate.
        draft.rules.append(
            f"2B-class ({CLASS_2B[0]:g} <= {params_b:g}B < {CLASS_2B[1]:g}): "
            "memory from the parameter estimate"
        )

    size = fields.choice("model_size", MODEL_SIZES)
    if size is not None and params_b is not None:
        draft.rules.append(f"model_size {size} ignored: the parameter count is known")
    elif size is not None and size in _INFERENCE_SIZE_CAPS:
        cap = _INFERENCE_SIZE_CAPS[size]
        draft.memory_mb = min(draft.memory_mb, cap)
        draft.rules.append(f"model_size {size}: at most {cap} MB")
    elif size is not None:
        floor = _INFERENCE_SIZE_FLOORS[size]
        draft.memory_mb = max(draft.memory_mb, floor)
        draft.rules.append(f"model_size {size}: at least {floor} MB")

    memory = fields.integer("min_memory_mb", 0, MAX_MEMORY_MB)
    if memory is not None:
        draft.memory_override = memory
        draft.rules.append(f"min_memory_mb {memory} (given)")
    if fields.boolean("dedicated"):
        draft.memory_floor = 8192
        draft.priority = 8
        draft.rules.append("dedicated: at least 8192 MB, priority 8")

    concurrent = fields.integer("concurrent_requests", 0, MAX_COUNT)
    if concurrent is not None and concurrent > 20:
        draft.at_least_gpus(4, f"concurrent_requests {concurrent} > 20")
    elif concurrent is not None and concurrent > 10:
        draft.at_least_gpus(2, f"concurrent_requests {concurrent} > 10")


def _embedding_rules(draft: _Draft, fields: _Fields, params_b: float | None) -> None:
    batch = fields.integer("batch_size", 1, MAX_COUNT)
    if batch is not None and batch > 32:
        draft.at_least_gpus(2, f"batch_size {batch} > 32")


def _ocr_rules(draft: _Draft, fields: _Fields, params_b: float | None) -> None:
    images = fields.integer("image_count", 0, MAX_COUNT)
    if images is not None and images > 100:
        draft.at_least_gpus(2, f"image_count {images} > 100")


def _graph_rules(draft: _Draft, fields: _Fields, params_b: float | None) -> None:
    nodes = fields.integer("node_count", 0, MAX_COUNT)
    if nodes is not None and nodes > 1_000_000:
        draft.memory_floor = 8192
        draft.rules.append(f"node_count {nodes} > 1000000: at least 8192 MB")


def _generic_rules(draft: _Draft, fields: _Fields, params_b: float | None) -> None:
    gpus = fields.integer("required_gpus", 1, MAX_GPUS)
    memory = fields.integer("min_memory_mb", 0, MAX_MEMORY_MB)
    priority = fields.integer("priority", 1, 10)
    if gpus is not None:
        draft.gpus = gpus
        draft.rules.append(f"required_gpus {gpus} (given)")
    if memory is not None:
        draft.memory_mb = memory
        draft.rules.append(f"min_memory_mb {memory} (given)")
    if priority is not None:
        draft.priority = priority
        draft.rules.append(f"priority {priority} (given)")


def _workflow_rules(draft: _Draft, fields: _Fields, estimate: dict[str, Any]) -> None:
    """The Go service's workflow context: `workflow_priority` sets the priority, whatever the type.

    The Go service read it (default 5) as the base priority of inference only,
    where model-name rules could still override it; here it is the caller's
    stated priority for every type and wins over every table rule (a top-level
    `priority` in the body still wins over it). `workflow_dependencies` (names
    of other workflows) is checked and echoed in the estimate, with no effect
    on scheduling, as in the Go service, which only logged it.
    """
    priority = fields.integer("workflow_priority", 1, 10)
    if priority is not None:
        draft.priority = priority
        draft.rules.append(f"workflow_priority {priority}: priority {priority}")
    dependencies = fields.raw("workflow_dependencies")
    if dependencies is not None:
        if not isinstance(dependencies, list) or not all(isinstance(d, str) for d in dependencies):
            raise InvalidRequest(
                f"workload_data.workflow_dependencies must be an array of strings, got {dependencies!r}"
            )
        estimate["workflow_dependencies"] = list(dependencies)
        draft.rules.append("workflow_dependencies: recorded, not enforced (no ordering between workflows)")


_RULES: Final[Mapping[str, Callable[[_Draft, _Fields, float | None], None]]] = {
    "training": _training_rules,
    "inference": _inference_rules,
    "embedding": _embedding_rules,
    "ocr": _ocr_rules,
    "graph_processing": _graph_rules,
    "generic": _generic_rules,
}
