"""NvmlDevices on GPUs in MIG mode: the GPU instances the operator made, reported, never created.

Scenarios against the fake pynvml (its MIG functions carry nvidia-ml-py's names,
signatures and error classes):
  1. an A100 80GB split 3g.40gb + 2g.20gb + 1g.10gb: each instance read with its
     MIG UUID, profile name and its own memory;
  2. a MIG-capable GPU with MIG off: no instances, and the MIG queries not made;
  3. an instance that stops answering: left out of the sample, with the reason;
  4. older bindings (v1 profile struct without a name): the name built the way nvidia-smi builds it;
  5. a binding without the MIG functions: no slices offered, said once in the log.
"""

from __future__ import annotations

import logging

import pynvml
import pytest

from agent.devices import NvmlDevices
from agent.devices.base import MigInstance
from tests.fakes.fake_pynvml import MIB, FakeGpu, FakeNvml, a100_80gb_mig, h100_80gb


def opened(gpus: list[FakeGpu]) -> tuple[FakeNvml, NvmlDevices]:
    fake = FakeNvml(gpus)
    devices = NvmlDevices(fake)
    devices.open()
    return fake, devices


def test_instances_reported_with_uuid_profile_and_memory() -> None:
    gpu = a100_80gb_mig(0, ["3g.40gb", "2g.20gb", "1g.10gb"])
    gpu.mig_devices[1].memory_used = 1000 * MIB
    fake, devices = opened([gpu, h100_80gb(1)])
    mig_gpu, whole = devices.sample(1.0)
    assert mig_gpu.mig_mode is True
    assert mig_gpu.mig_instances == (
        MigInstance(0, 1, gpu.mig_devices[0].uuid, "3g.40gb", 40192, 40192),
        MigInstance(1, 2, gpu.mig_devices[1].uuid, "2g.20gb", 19968, 18968),
        MigInstance(2, 3, gpu.mig_devices[2].uuid, "1g.10gb", 9728, 9728),
    )
    assert all(i.uuid.startswith("MIG-") for i in mig_gpu.mig_instances)
    assert whole.mig_instances == ()
    # The profile table is read once per GPU, not on every sample.
    profile_reads = fake.calls["nvmlDeviceGetGpuInstanceProfileInfo"]
    devices.sample(2.0)
    assert fake.calls["nvmlDeviceGetGpuInstanceProfileInfo"] == profile_reads


def test_empty_mig_indices_are_skipped() -> None:
    gpu = a100_80gb_mig(0, ["1g.10gb", "1g.10gb", "1g.10gb"])
    del gpu.mig_devices[1]  # the operator destroyed the middle instance
    _, devices = opened([gpu])
    (reading,) = devices.sample(1.0)
    assert [i.mig_index for i in reading.mig_instances] == [0, 2]


def test_mig_off_reads_no_instances() -> None:
    gpu = a100_80gb_mig(0, ["7g.80gb"], mig_mode=pynvml.NVML_DEVICE_MIG_DISABLE)
    fake, devices = opened([gpu])
    (reading,) = devices.sample(1.0)
    assert reading.mig_mode is False and reading.mig_instances == ()
    assert fake.calls["nvmlDeviceGetMaxMigDeviceCount"] == 0


def test_instance_that_fails_is_left_out_with_a_problem() -> None:
    gpu = a100_80gb_mig(0, ["3g.40gb", "3g.40gb"])
    gpu.errors["nvmlDeviceGetGpuInstanceId"] = pynvml.NVML_ERROR_UNKNOWN
    _, devices = opened([gpu])
    (reading,) = devices.sample(1.0)
    assert reading.mig_instances == ()
    assert "MIG device 0 did not answer" in (devices.degraded_reason or "")


def test_v1_profile_struct_named_from_slices_and_memory() -> None:
    gpu = a100_80gb_mig(0, ["2g.20gb"])
    fake = FakeNvml([gpu])
    real = fake.nvmlDeviceGetGpuInstanceProfileInfo
    fake.nvmlDeviceGetGpuInstanceProfileInfo = lambda device, profile, version=2: real(device, profile, 1)  # type: ignore[method-assign]
    devices = NvmlDevices(fake)
    devices.open()
    (reading,) = devices.sample(1.0)
    assert reading.mig_instances[0].profile == "2g.20gb"


def test_a_binding_without_mig_functions_offers_no_slices(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml([a100_80gb_mig(0, ["7g.80gb"])], missing=("nvmlDeviceGetMigDeviceHandleByIndex",))
    devices = NvmlDevices(fake)
    devices.open()
    with caplog.at_level(logging.WARNING, logger="agent.devices.nvml"):
        (reading,) = devices.sample(1.0)
        devices.sample(2.0)
    assert reading.mig_mode is True and reading.mig_instances == ()
    assert sum("lacks the MIG device functions" in r.getMessage() for r in caplog.records) == 1
