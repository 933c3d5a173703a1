"""The metadata each agent gossips about itself: who it is and what its GPUs are doing.

Theory of operation
-------------------
SWIM carries a small opaque blob per member (`SwimCore.set_meta`), re-sent in
every alive message and full-state sync, so it must stay small: the core caps
it (`SwimConfig.max_meta_bytes`). This module owns that blob's format, a
msgpack map with short keys, versioned by ``"v"``:

===  ====================================================================
key  value
===  ====================================================================
v    format version (1); a decoder refuses versions it does not know
n    node name
r    role: 0 = client (gossip only), 1 = server (votes in elections)
ip   advertised IP address, packed (4 or 16 bytes)
hp   HTTP API port;   gp: gossip port;   rp: Raft port
hip  HTTP IP address, packed, only when it differs from ``ip``
ver  agent version string
l    labels: {str: str}, omitted when empty
m    model names: [str], each named once; a GPU refers to its model by position
g    GPUs: [[index, uuid, model#, total MiB, free/256 MiB, util %, health, flags(, reasons)], ...]
gt   the node's GPU count, only when ``g`` lists fewer (the blob would not fit)
b    1 when this server holds Raft state (it belongs to a bootstrapped
     cluster), omitted otherwise: a blank server that sees it joins the
     running cluster instead of bootstrapping another (docs/raft.md)
s    1 when the HTTP API is served over TLS (https), omitted otherwise:
     peers forward to https://<hip or ip>:<hp> then
t    how the GPUs are wired, omitted when unknown: NodeTopology.to_wire()
     (coordinator/topology.py), one small int per GPU pair plus NUMA nodes,
     CPU lists and the pairs on a finer PCIe level (PXB, NODE); under 100
     bytes for eight GPUs
mg   MIG slices (coordinator/mig.py), omitted when none: [[unit index, uuid,
     name#, total MiB, free/256 MiB, health, flags, profile#], ...], name and
     profile by position in ``m``; each a schedulable unit of its own
===  ====================================================================

A GPU in MIG mode sets flags bit 2 in its ``g`` row: it is listed for its
telemetry and health, but only its slices in ``mg`` are leased. An agent from
before MIG ignores ``mg`` and the bit, and sees such a GPU as it always did.
A slice row takes about 30 bytes (its "MIG-<uuid>" packed to 16 bytes), so
eight GPUs of seven slices each do not fit the default 1 KiB cap: slices are
dropped (last first) before any GPU is, and a node that gossips fewer slices
than it has logs it: other agents cannot lease the slices left out.

Decoders ignore keys they do not know, so a key added later (as ``b`` and ``s`` were)
needs no new version: older agents read the rest of the blob unchanged.

A GPU's uuid is packed to its 16 bytes when it has NVML's "GPU-<uuid>" form,
else kept as a string (MIG devices). Free memory is sent in 256 MiB quanta and
utilization in 5 % steps, with a quarter-step hysteresis (`_Quantizer`), so
telemetry jitter does not change the blob; ``None`` stays None. Health is
0 healthy, 1 degraded, 2 unhealthy; flags bit 0 = drained, bit 1 = allocated.
A GPU that is not healthy appends why (at most 2 reasons of 64 characters): the
leader records it in the lease table and tells the lease holder, so the reason
must travel; a healthy GPU sends none, so the common case costs nothing.
With those, eight GPUs take about 32 bytes each and a whole 8-GPU node about
350 bytes (430 with its topology). When the blob would exceed the cap, reasons
are dropped first, then the topology (placement then takes the lowest
indices), and only then GPUs: a node whose blob would still exceed the core's
cap (about 25 GPUs at 1 KiB) gossips the first GPUs that fit, by index, and
its total in ``gt``.

`NodeMetaBuilder` decides *when* to re-announce: immediately when something
a scheduler must know changes (a GPU's health, drain or lease, a GPU appearing
or vanishing, the topology, addresses, labels), at most every `min_interval_s`
for telemetry (free memory, utilization), and never when the encoded blob is
unchanged.

Error handling
--------------
`decode_node_meta` raises `NodeMetaError` for anything that is not a valid
blob: bad msgpack, a wrong type, a model index out of range, an unknown
version. Callers (the membership service) treat such a member as having no
metadata; a bad blob never propagates further.
"""

from __future__ import annotations

import ipaddress
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import msgpack

from coordinator.model import DEGRADED, HEALTHY, UNHEALTHY
from coordinator.topology import NodeTopology

FORMAT_VERSION: Final = 1
MEMORY_QUANTUM_MB: Final = 256
UTILIZATION_STEP_PCT: Final = 5
# Health reasons a GPU gossips: enough for "XID 79: GPU has fallen off the bus"
# and one more, while eight failing GPUs still fit the metadata cap.
MAX_REASONS: Final = 2
MAX_REASON_CHARS: Final = 64
_HEALTH_CODES: Final = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}
_HEALTH_NAMES: Final = {code: name for name, code in _HEALTH_CODES.items()}
_DRAINED, _ALLOCATED, _MIG_MODE = 1, 2, 4
ROLE_SERVER, ROLE_CLIENT = "server", "client"


class NodeMetaError(ValueError):
    """A gossiped metadata blob is not one this agent can read."""


@dataclass(frozen=True, slots=True)
class GpuMeta:
    """One GPU as its node gossips it (quantized: see the module docstring)."""

    index: int
    uuid: str
    model: str
    memory_total_mb: int
    memory_free_mb: int | None  # a multiple of 256 MiB
    utilization_pct: int | None  # a multiple of 5
    health: str
    drained: bool
    allocated: bool
    # Why the GPU is not healthy (bounded: see the module docstring); () when healthy.
    reasons: tuple[str, ...] = ()
    # A GPU in MIG mode: leased only by its slices, never whole.
    mig_mode: bool = False
    # Set for a MIG slice (an ``mg`` row): its profile; `index` is its unit index.
    mig_profile: str | None = None


@dataclass(frozen=True, slots=True)
class NodeMeta:
    """A member's self-description, as decoded from its gossip metadata."""

    name: str
    role: str
    advertise_ip: str
    http_port: int
    gossip_port: int
    raft_port: int
    version: str
    http_ip: str | None = None  # None: the same as advertise_ip
    labels: Mapping[str, str] = field(default_factory=dict)
    gpus: tuple[GpuMeta, ...] = ()
    # The node's GPU count when `gpus` lists only the first ones (the metadata
    # cap); None when `gpus` is complete.
    gpu_total: int | None = None
    # A server that holds Raft state: it is (or was) a member of a bootstrapped cluster.
    bootstrapped: bool = False
    # The HTTP API is served over TLS: reach it at https://.
    tls: bool = False
    # How the GPUs are wired; None when unknown or left out to fit the cap.
    topology: NodeTopology | None = None

    @property
    def gpu_count(self) -> int:
        """The node's GPUs (MIG slices not counted: they are parts of GPUs)."""
        if self.gpu_total is not None:
            return self.gpu_total
        return sum(1 for g in self.gpus if g.mig_profile is None)

    @property
    def http_address(self) -> str:
        return _join_host_port(self.http_ip or self.advertise_ip, self.http_port)

    @property
    def http_url(self) -> str:
        """The member's API base URL, scheme included: what forwarding and /cluster/members use."""
        return f"{'https' if self.tls else 'http'}://{self.http_address}"

    @property
    def gossip_address(self) -> str:
        return _join_host_port(self.advertise_ip, self.gossip_port)

    @property
    def raft_address(self) -> str:
        return _join_host_port(self.advertise_ip, self.raft_port)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- encoding ----------------------------------------------------------------------


def _pack_uuid(text: str, prefix: str = "GPU-") -> bytes | str:
    if text.startswith(prefix):
        try:
            parsed = uuidlib.UUID(text[len(prefix) :])
        except ValueError:
            return text
        if f"{prefix}{parsed}" == text:
            return parsed.bytes
    return text


def _unpack_uuid(value: object, prefix: str = "GPU-") -> str:
    if isinstance(value, bytes) and len(value) == 16:
        return f"{prefix}{uuidlib.UUID(bytes=value)}"
    if isinstance(value, str):
        return value
    raise NodeMetaError("a GPU uuid must be 16 bytes or a string")


def encode_node_meta(meta: NodeMeta) -> bytes:
    """Return the msgpack blob for `meta` (values quantized as given; see NodeMetaBuilder)."""
    models: list[str] = []
    gpus: list[list[object]] = []
    slices: list[list[object]] = []
    for gpu in meta.gpus:
        if gpu.model not in models:
            models.append(gpu.model)
        flags = (_DRAINED if gpu.drained else 0) | (_ALLOCATED if gpu.allocated else 0) | (_MIG_MODE if gpu.mig_mode else 0)
        if gpu.mig_profile is not None:
            if gpu.mig_profile not in models:
                models.append(gpu.mig_profile)
            slices.append(
                [
                    gpu.index,
                    _pack_uuid(gpu.uuid, "MIG-"),
                    models.index(gpu.model),
                    gpu.memory_total_mb,
                    None if gpu.memory_free_mb is None else gpu.memory_free_mb // MEMORY_QUANTUM_MB,
                    _HEALTH_CODES[gpu.health],
                    flags,
                    models.index(gpu.mig_profile),
                ]
            )
            continue
        row: list[object] = [
            gpu.index,
            _pack_uuid(gpu.uuid),
            models.index(gpu.model),
            gpu.memory_total_mb,
            None if gpu.memory_free_mb is None else gpu.memory_free_mb // MEMORY_QUANTUM_MB,
            gpu.utilization_pct,
            _HEALTH_CODES[gpu.health],
            flags,
        ]
        if gpu.reasons:
            row.append(list(gpu.reasons))
        gpus.append(row)
    doc: dict[str, object] = {
        "v": FORMAT_VERSION,
        "n": meta.name,
        "r": 1 if meta.role == ROLE_SERVER else 0,
        "ip": ipaddress.ip_address(meta.advertise_ip).packed,
        "hp": meta.http_port,
        "gp": meta.gossip_port,
        "rp": meta.raft_port,
        "ver": meta.version,
    }
    if meta.http_ip is not None and meta.http_ip != meta.advertise_ip:
        doc["hip"] = ipaddress.ip_address(meta.http_ip).packed
    if meta.labels:
        doc["l"] = dict(sorted(meta.labels.items()))
    if models:
        doc["m"] = models
    if gpus:
        doc["g"] = gpus
    if slices:
        doc["mg"] = slices
    if meta.gpu_total is not None:
        doc["gt"] = meta.gpu_total
    if meta.bootstrapped:
        doc["b"] = 1
    if meta.tls:
        doc["s"] = 1
    if meta.topology is not None:
        doc["t"] = meta.topology.to_wire()
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


# --- decoding ----------------------------------------------------------------------


def _expect(value: object, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise NodeMetaError(f"{what}: unexpected {type(value).__name__}")
    return value


def _port(value: object, what: str) -> int:
    port: int = _expect(value, int, what)
    if not 0 < port < 65536:
        raise NodeMetaError(f"{what}: {port} is not a port")
    return port


def _ip(value: object, what: str) -> str:
    raw: bytes = _expect(value, bytes, what)
    if len(raw) not in (4, 16):
        raise NodeMetaError(f"{what}: {len(raw)} bytes is not an IP address")
    return str(ipaddress.ip_address(raw))


def _optional_int(value: object, what: str) -> int | None:
    return None if value is None else int(_expect(value, int, what))


def _decode_gpu(raw: object, models: Sequence[str]) -> GpuMeta:
    row: list[object] = _expect(raw, list, "GPU")
    if len(row) < 8:  # later versions may append fields
        raise NodeMetaError(f"GPU: {len(row)} fields, expected 8")
    index, packed_uuid, model, total, free, util, health, flags = row[:8]
    model_index: int = _expect(model, int, "GPU model")
    if not 0 <= model_index < len(models):
        raise NodeMetaError(f"GPU model #{model_index} is not in the model table")
    health_code: int = _expect(health, int, "GPU health")
    if health_code not in _HEALTH_NAMES:
        raise NodeMetaError(f"GPU health code {health_code} is unknown")
    free_quanta = _optional_int(free, "GPU free memory")
    bits: int = _expect(flags, int, "GPU flags")
    reasons: list[object] = _expect(row[8], list, "GPU health reasons") if len(row) > 8 else []
    return GpuMeta(
        index=_expect(index, int, "GPU index"),
        uuid=_unpack_uuid(packed_uuid),
        model=models[model_index],
        memory_total_mb=_expect(total, int, "GPU memory"),
        memory_free_mb=None if free_quanta is None else free_quanta * MEMORY_QUANTUM_MB,
        utilization_pct=_optional_int(util, "GPU utilization"),
        health=_HEALTH_NAMES[health_code],
        drained=bool(bits & _DRAINED),
        allocated=bool(bits & _ALLOCATED),
        reasons=tuple(_expect(r, str, "GPU health reason") for r in reasons[:MAX_REASONS]),
        mig_mode=bool(bits & _MIG_MODE),
    )


def _decode_slice(raw: object, models: Sequence[str]) -> GpuMeta:
    row: list[object] = _expect(raw, list, "MIG slice")
    if len(row) < 8:  # later versions may append fields
        raise NodeMetaError(f"MIG slice: {len(row)} fields, expected 8")
    index, packed_uuid, model, total, free, health, flags, profile = row[:8]
    named = [_expect(model, int, "MIG slice name"), _expect(profile, int, "MIG slice profile")]
    if not all(0 <= i < len(models) for i in named):
        raise NodeMetaError(f"MIG slice name or profile #{named} is not in the model table")
    health_code: int = _expect(health, int, "MIG slice health")
    if health_code not in _HEALTH_NAMES:
        raise NodeMetaError(f"MIG slice health code {health_code} is unknown")
    free_quanta = _optional_int(free, "MIG slice free memory")
    bits: int = _expect(flags, int, "MIG slice flags")
    return GpuMeta(
        index=_expect(index, int, "MIG slice index"),
        uuid=_unpack_uuid(packed_uuid, "MIG-"),
        model=models[named[0]],
        memory_total_mb=_expect(total, int, "MIG slice memory"),
        memory_free_mb=None if free_quanta is None else free_quanta * MEMORY_QUANTUM_MB,
        utilization_pct=None,
        health=_HEALTH_NAMES[health_code],
        drained=bool(bits & _DRAINED),
        allocated=bool(bits & _ALLOCATED),
        mig_profile=models[named[1]],
    )


def _topology(value: object) -> NodeTopology | None:
    if value is None:
        return None
    try:
        return NodeTopology.from_wire(value)
    except ValueError as error:
        raise NodeMetaError(f"topology: {error}") from None


def decode_node_meta(data: bytes) -> NodeMeta:
    """Return the NodeMeta in a gossiped blob. Raises NodeMetaError when it is not a valid one."""
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=1024,
            max_bin_len=64,
            max_array_len=1024,
            max_map_len=256,
            max_ext_len=0,
        )
    except Exception as error:  # msgpack raises several unrelated types for bad input
        raise NodeMetaError(f"not a msgpack metadata blob: {error}") from None
    if not isinstance(doc, dict):
        raise NodeMetaError("metadata is not a map")
    try:
        version = doc["v"]
        if version != FORMAT_VERSION:
            raise NodeMetaError(f"metadata format version {version!r} is not supported")
        models = [_expect(m, str, "model name") for m in _expect(doc.get("m", []), list, "models")]
        labels: dict[object, object] = _expect(doc.get("l", {}), dict, "labels")
        return NodeMeta(
            name=_expect(doc["n"], str, "name"),
            role=ROLE_SERVER if _expect(doc["r"], int, "role") == 1 else ROLE_CLIENT,
            advertise_ip=_ip(doc["ip"], "ip"),
            http_port=_port(doc["hp"], "http port"),
            gossip_port=_port(doc["gp"], "gossip port"),
            raft_port=_port(doc["rp"], "raft port"),
            version=_expect(doc["ver"], str, "version"),
            http_ip=_ip(doc["hip"], "http ip") if "hip" in doc else None,
            labels={_expect(k, str, "label"): _expect(v, str, "label value") for k, v in labels.items()},
            gpus=(
                *(_decode_gpu(g, models) for g in _expect(doc.get("g", []), list, "GPUs")),
                *(_decode_slice(g, models) for g in _expect(doc.get("mg", []), list, "MIG slices")),
            ),
            gpu_total=_optional_int(doc.get("gt"), "GPU total"),
            bootstrapped=_optional_int(doc.get("b"), "bootstrapped") == 1,
            tls=_optional_int(doc.get("s"), "tls") == 1,
            topology=_topology(doc.get("t")),
        )
    except KeyError as missing:
        raise NodeMetaError(f"metadata lacks {missing.args[0]!r}") from None


# --- when to re-announce -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuState:
    """One local GPU's current state, raw (unquantized), as the sampler and lease table know it."""

    index: int
    uuid: str
    model: str
    memory_total_mb: int
    memory_free_mb: int | None
    utilization_pct: float | None
    health: str
    drained: bool
    allocated: bool
    reasons: tuple[str, ...] = ()
    mig_mode: bool = False  # leased only by its slices
    mig_profile: str | None = None  # a MIG slice (index = its unit index)


def gossiped_reasons(health: str, reasons: Sequence[str]) -> tuple[str, ...]:
    """The reasons a GPU gossips: none when healthy, else the first MAX_REASONS, each cut to MAX_REASON_CHARS."""
    if health == HEALTHY:
        return ()
    return tuple(r[:MAX_REASON_CHARS] for r in reasons[:MAX_REASONS])


def _quantize(raw: float | None, announced: int | None, step: int) -> int | None:
    """`raw` rounded to the nearest multiple of `step`, keeping `announced` while raw stays near it.

    Hysteresis: the announced value holds until `raw` moves more than 3/4 of a
    step away from it, so a reading hovering at a rounding boundary does not
    flip the blob (and cause a broadcast) on every sample.
    """
    if raw is None:
        return None
    if announced is not None and abs(raw - announced) <= 0.75 * step:
        return announced
    return int(round(raw / step)) * step


class NodeMetaBuilder:
    """Turns the local state into gossip metadata, and says when it is worth re-announcing."""

    def __init__(self, identity: NodeMeta, *, max_bytes: int, min_interval_s: float = 5.0) -> None:
        # `identity` gives everything but the GPUs, which `update` supplies.
        self.identity = identity
        self.max_bytes = max_bytes
        self.min_interval_s = min_interval_s
        self.truncated = False
        self._gpus: dict[int, GpuMeta] = {}
        self._topology: NodeTopology | None = None
        self._blob = encode_node_meta(identity)
        self._announced_at = float("-inf")

    @property
    def blob(self) -> bytes:
        """The metadata as last announced."""
        return self._blob

    def set_identity(self, identity: NodeMeta, now: float) -> bytes | None:
        """Replace everything but the GPUs; return the new blob if it changed (announce it now), else None."""
        self.identity = replace(identity, gpus=(), gpu_total=None, topology=None)
        blob = self._fit([self._gpus[i] for i in sorted(self._gpus)])
        if blob == self._blob:
            return None
        self._blob = blob
        self._announced_at = now
        return blob

    def update(self, gpus: Sequence[GpuState], now: float, topology: NodeTopology | None = None) -> bytes | None:
        """Return the new blob if it should be announced now, else None.

        Urgent changes (GPU set, health, drain, lease, topology) are returned
        at once; telemetry-only changes wait until `min_interval_s` after the
        last announcement (the next call after that returns them).
        """
        urgent = {g.index for g in gpus} != set(self._gpus) or topology != self._topology
        fresh: dict[int, GpuMeta] = {}
        for state in gpus:
            before = self._gpus.get(state.index)
            gpu = GpuMeta(
                index=state.index,
                uuid=state.uuid,
                model=state.model,
                memory_total_mb=state.memory_total_mb,
                memory_free_mb=_quantize(
                    state.memory_free_mb, before.memory_free_mb if before else None, MEMORY_QUANTUM_MB
                ),
                utilization_pct=_quantize(
                    state.utilization_pct, before.utilization_pct if before else None, UTILIZATION_STEP_PCT
                ),
                health=state.health,
                drained=state.drained,
                allocated=state.allocated,
                reasons=gossiped_reasons(state.health, state.reasons),
                mig_mode=state.mig_mode,
                mig_profile=state.mig_profile,
            )
            if before is not None and replace(before, memory_free_mb=None, utilization_pct=None) != replace(
                gpu, memory_free_mb=None, utilization_pct=None
            ):
                urgent = True
            fresh[state.index] = gpu
        if fresh == self._gpus and topology == self._topology:
            return None
        if not urgent and now - self._announced_at < self.min_interval_s:
            return None
        self._gpus = fresh
        self._topology = topology
        self._blob = self._fit([fresh[i] for i in sorted(fresh)])
        self._announced_at = now
        return self._blob

    def _fit(self, gpus: list[GpuMeta]) -> bytes:
        """The blob with as many GPUs (lowest indices first) as fit in max_bytes."""
        blob = encode_node_meta(replace(self.identity, gpus=tuple(gpus), topology=self._topology))
        if len(blob) <= self.max_bytes:
            self.truncated = False
            return blob
        # Every GPU matters more to the scheduler than why some are failing, or how they
        # are wired (without the topology it takes the lowest indices): drop those first.
        gpus = [replace(g, reasons=()) for g in gpus]
        blob = encode_node_meta(replace(self.identity, gpus=tuple(gpus), topology=self._topology))
        if len(blob) <= self.max_bytes:
            self.truncated = False
            return blob
        blob = encode_node_meta(replace(self.identity, gpus=tuple(gpus)))
        if len(blob) <= self.max_bytes:
            self.truncated = False
            return blob
        self.truncated = True
        # Then MIG slices, last first: a slice left out is one unit less, a GPU left out all of its own.
        whole = [g for g in gpus if g.mig_profile is None]
        sliced = [g for g in gpus if g.mig_profile is not None]
        if sliced and len(encode_node_meta(replace(self.identity, gpus=tuple(whole)))) <= self.max_bytes:
            lo, hi = 0, len(sliced)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if len(encode_node_meta(replace(self.identity, gpus=(*whole, *sliced[:mid])))) <= self.max_bytes:
                    lo = mid
                else:
                    hi = mid - 1
            return encode_node_meta(replace(self.identity, gpus=(*whole, *sliced[:lo])))
        gpus = whole
        # Sizes grow monotonically with the GPU count: binary-search the largest prefix that fits.
        lo, hi = 0, len(gpus)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(encode_node_meta(replace(self.identity, gpus=tuple(gpus[:mid]), gpu_total=len(gpus)))) <= self.max_bytes:
                lo = mid
            else:
                hi = mid - 1
        blob = encode_node_meta(replace(self.identity, gpus=tuple(gpus[:lo]), gpu_total=len(gpus)))
        if len(blob) > self.max_bytes:
            raise NodeMetaError(f"this node's identity alone takes {len(blob)} bytes, over the {self.max_bytes}-byte cap")
        return blob
