"""MIG slices as schedulable units: how a slice is named and numbered.

Theory of operation
-------------------
A GPU in MIG mode runs no CUDA work of its own: work runs in its GPU
instances, each a fixed slice of its SMs and memory with its own UUID
("MIG-…"), which CUDA_VISIBLE_DEVICES takes. Creating or destroying
instances is left to the operator (`nvidia-smi mig -cgi …`): the agent only
reports the layout it finds, and the scheduler leases the slices as they are.

So a MIG-mode GPU enters the inventory not as one view but as one view per
slice (`GpuView.mig_profile` set), and the GPU itself is not schedulable
whole. Each slice has its own *unit index* on its node, `slice_index(gpu,
mig)`, apart from every whole GPU's index: every structure keyed by
`GpuRef` (the lease table's holders, drains, release times, the open-GPU
index) holds a slice as one unit without knowing about MIG, and "no GPU in
two leases" is "no slice in two leases" too.

A request asks for one slice (CUDA uses one MIG device per process): of a
named profile, or of any (`MIG_ANY`), best fit then taking the smallest
adequate one.
"""

from __future__ import annotations

import re
from typing import Final

# Unit index of a slice: MIG_INDEX_BASE + SLOTS_PER_GPU · GPU index + MIG device
# index. NVML numbers a GPU's MIG devices 0 … nvmlDeviceGetMaxMigDeviceCount − 1
# (7 on A100/H100), so 100 slots leave room, and a reader sees GPU 2's slice 3
# as 1203. Whole GPUs keep their NVML index, always below the base.
MIG_INDEX_BASE: Final = 1000
SLOTS_PER_GPU: Final = 100

# Profile names as NVML's nvmlDeviceGetGpuInstanceProfileInfo and nvidia-smi
# print them: "1g.10gb", "1g.10gb+me" (with a media engine), "1g.20gb",
# "3g.40gb", "7g.80gb"; compute-instance profiles "1c.3g.40gb".
PROFILE_PATTERN: Final = r"(?:[1-8]c\.)?[1-8]g\.[0-9]{1,4}gb(?:\+[a-z]{1,8})?"
PROFILE_RE: Final = re.compile(rf"^{PROFILE_PATTERN}\Z")
# Slices are numbered for GPUs 0 … MAX_MIG_GPU_INDEX of a node; the largest unit index follows.
MAX_MIG_GPU_INDEX: Final = 63


def slice_index(gpu_index: int, mig_index: int) -> int:
    """The unit index of MIG device `mig_index` of GPU `gpu_index`. Raises ValueError out of range."""
    if not 0 <= mig_index < SLOTS_PER_GPU or not 0 <= gpu_index <= MAX_MIG_GPU_INDEX:
        raise ValueError(f"MIG device {mig_index} of GPU {gpu_index} has no unit index")
    return MIG_INDEX_BASE + SLOTS_PER_GPU * gpu_index + mig_index


# The largest index a unit (whole GPU or slice) may have: what drain requests accept.
MAX_UNIT_INDEX: Final = MIG_INDEX_BASE + SLOTS_PER_GPU * (MAX_MIG_GPU_INDEX + 1) - 1


def gpu_of_slice(unit_index: int) -> int | None:
    """The GPU index a slice's unit index belongs to, or None for a whole GPU's index."""
    if unit_index < MIG_INDEX_BASE:
        return None
    return (unit_index - MIG_INDEX_BASE) // SLOTS_PER_GPU


def profile_memory_order(profile: str) -> tuple[int, int, str]:
    """A sort key putting profiles smallest first: by memory, then compute slices, then name."""
    match = re.search(r"([0-9]+)g\.([0-9]+)gb", profile)
    if match is None:
        return (0, 0, profile)
    return (int(match.group(2)), int(match.group(1)), profile)
