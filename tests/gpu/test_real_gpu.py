"""The real-GPU check under pytest: skipped where no NVIDIA GPU is present."""

from __future__ import annotations

import pytest

from tests.gpu.check_real_gpu import gpu_present, run_check

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_present(), reason="no NVIDIA GPU on this machine (nvidia-smi -L lists none)"),
]


def test_agent_on_nvml_matches_nvidia_smi_and_allocates() -> None:
    """The NVML agent lists the same GPUs as nvidia-smi, and allocates and releases one."""
    report: list[str] = []
    problems = run_check(report)
    assert not problems, "\n".join(report + problems)
