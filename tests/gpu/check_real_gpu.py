"""Real-GPU check: the agent on NVML beside nvidia-smi, then an allocate and a release.

The allocation's `topology` (NUMA node and CPUs, read through
nvmlDeviceGetNumaNodeId and nvmlDeviceGetCpuAffinity) is compared with the
CPU and NUMA affinity `nvidia-smi topo -m` prints for that GPU, where it prints one.

Run on a host with an NVIDIA GPU:

    python -m tests.gpu.check_real_gpu            # prints a report, exits non-zero on a mismatch

`tests/gpu/test_real_gpu.py` runs the same check under pytest and is skipped
where no NVIDIA GPU is present. The report's output is kept in docs/real-gpu.md.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from coordinator.topology import NodeTopology
from tests.agent_process import AgentProcess

SMI_FIELDS = (
    "index,uuid,name,pci.bus_id,memory.total,memory.used,memory.free,utilization.gpu,"
    "utilization.memory,temperature.gpu,power.draw,power.limit,clocks.sm,clocks.mem,"
    "ecc.errors.uncorrected.volatile.total"
)

# nvidia-smi field -> (where the agent shows it in /gpu/status, its dcgm series or None,
# how far apart two samples a moment apart may honestly be).
COMPARED: dict[str, tuple[str, str | None, float]] = {
    "memory.total": ("memory_total", None, 0),
    "memory.used": ("memory_used", "DCGM_FI_DEV_FB_USED", 64),
    "memory.free": ("memory_free", "DCGM_FI_DEV_FB_FREE", 64),
    "utilization.gpu": ("utilization", "DCGM_FI_DEV_GPU_UTIL", 10),
    "utilization.memory": ("telemetry.utilization_memory_pct", "DCGM_FI_DEV_MEM_COPY_UTIL", 10),
    "temperature.gpu": ("temperature", "DCGM_FI_DEV_GPU_TEMP", 3),
    "power.draw": ("power_draw", "DCGM_FI_DEV_POWER_USAGE", 25),
    "power.limit": ("telemetry.power_limit_w", None, 1),
    "clocks.sm": ("telemetry.sm_clock_mhz", "DCGM_FI_DEV_SM_CLOCK", 400),
    "clocks.mem": ("telemetry.mem_clock_mhz", "DCGM_FI_DEV_MEM_CLOCK", 100),
    "ecc.errors.uncorrected.volatile.total": ("telemetry.ecc_volatile_dbe", None, 0),
}


def _status_value(gpu: dict[str, object], path: str) -> object:
    value: object = gpu
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _metric_value(metrics: str, name: str, uuid: str) -> float | None:
    match = re.search(rf'^{name}{{[^}}]*UUID="{re.escape(uuid)}"[^}}]*}} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else None


def compare(smi: list[dict[str, str]], status: list[dict[str, object]], metrics: str) -> tuple[list[str], list[str]]:
    """Side-by-side lines for every compared field, and the problems among them."""
    lines = [f"{'field':<40} {'nvidia-smi':>12} {'/gpu/status':>12} {'/metrics':>12}"]
    problems = []
    for row, gpu in zip(smi, status):
        for field, (path, series, tolerance) in COMPARED.items():
            raw = row.get(field, "")
            agent = _status_value(gpu, path)
            exported = _metric_value(metrics, series, str(gpu["uuid"])) if series else None
            lines.append(f"{field:<40} {raw:>12} {str(agent):>12} {str(exported if series else '-'):>12}")
            try:
                expected = float(raw)
            except ValueError:  # "[N/A]", "[Not Supported]": the agent should say null
                if agent is not None:
                    problems.append(f"GPU {row['index']} {field}: nvidia-smi says {raw!r}, agent {agent!r}")
                continue
            for where, got in (("/gpu/status", agent), ("/metrics", exported)):
                if where == "/metrics" and series is None:
                    continue
                if not isinstance(got, (int, float)) or abs(float(got) - expected) > tolerance:
                    problems.append(f"GPU {row['index']} {field}: nvidia-smi {raw}, {where} {got!r}")
    return lines, problems


def gpu_present() -> bool:
    """True when nvidia-smi lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return result.returncode == 0 and "GPU " in result.stdout


def nvidia_smi() -> list[dict[str, str]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = SMI_FIELDS.split(",")
    return [dict(zip(names, (v.strip() for v in line.split(",")))) for line in out.strip().splitlines()]


def topology_problems(allocated: dict[str, object], out: list[str]) -> list[str]:
    """Where the allocation's NUMA node and CPUs differ from what `nvidia-smi topo -m` prints."""
    result = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, check=False)
    out.append("\n$ nvidia-smi topo -m\n" + result.stdout)
    try:
        smi = NodeTopology.from_nvidia_smi(result.stdout)
    except (ValueError, IndexError) as exc:
        out.append(f"(not compared: cannot read that matrix: {exc})")
        return []
    topology = allocated.get("topology")
    if not isinstance(topology, dict):
        return ["the allocation has no topology"]
    index = allocated["gpu_ids"][0]  # type: ignore[index]
    problems = []
    for field, expected in (("numa_node", smi.numa_node(index)), ("cpu_list", smi.cpu_list(index))):
        if expected is not None and topology.get(field) != expected:
            problems.append(f"GPU {index} {field}: nvidia-smi topo -m {expected!r}, allocation {topology.get(field)!r}")
    return problems


def run_check(out: list[str]) -> list[str]:
    """Start an NVML agent, compare with nvidia-smi, allocate and release; returns problems found."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        agent = AgentProcess(data_dir=Path(tmp), simulate="", node_name="gpu-host")
        agent.start()
        try:
            with httpx.Client(base_url=agent.url, timeout=10.0) as api:
                smi = nvidia_smi()
                health = api.get("/healthz").json()
                status = api.get("/gpu/status").json()["gpus"]
                out.append("$ nvidia-smi --query-gpu=" + SMI_FIELDS + " --format=csv,noheader,nounits")
                out.extend(json.dumps(row) for row in smi)
                out.append("\n$ curl /healthz")
                out.append(json.dumps(health, indent=1))
                out.append("\n$ curl /gpu/status")
                out.append(json.dumps(status, indent=1))
                if health["devices"]["backend"] != "nvml":
                    problems.append(f"backend is {health['devices']['backend']}, not nvml")
                if len(status) != len(smi):
                    problems.append(f"agent sees {len(status)} GPUs, nvidia-smi {len(smi)}")
                for row, gpu in zip(smi, status):
                    if row["uuid"] != gpu["uuid"] or row["name"] != gpu["name"]:
                        problems.append(f"GPU {row['index']}: identity differs: {row} vs {gpu}")
                    if abs(int(row["memory.total"]) - gpu["memory_total"]) > 1:
                        problems.append(f"GPU {row['index']}: memory.total {row['memory.total']} vs {gpu['memory_total']}")
                metrics = api.get("/metrics").text
                lines, mismatches = compare(smi, status, metrics)
                out.append("\nside by side (agent sampled within a second of nvidia-smi):")
                out.extend(lines)
                problems.extend(mismatches)
                out.append("\n$ curl /metrics | grep ^DCGM_")
                out.extend(line for line in metrics.splitlines() if line.startswith("DCGM_"))
                if not re.search(r"^DCGM_FI_DEV_FB_USED\{", metrics, re.M):
                    problems.append("no DCGM_FI_DEV_FB_USED series")
                alloc = api.post("/gpu/allocate", json={"service_name": "gpu-check", "gpu_count": 1, "min_memory_mb": 1024})
                out.append("\n$ curl -X POST /gpu/allocate -d '{\"service_name\":\"gpu-check\",\"gpu_count\":1,\"min_memory_mb\":1024}'")
                out.append(f"{alloc.status_code} {json.dumps(alloc.json(), indent=1)}")
                if alloc.status_code != 200:
                    problems.append(f"allocate answered {alloc.status_code}")
                else:
                    allocated = alloc.json()
                    if allocated["cuda_visible_devices"] not in {row["uuid"] for row in smi}:
                        problems.append("cuda_visible_devices is not a real GPU UUID")
                    problems.extend(topology_problems(allocated, out))
                    release = api.post("/gpu/release", json={"allocation_id": allocated["id"]})
                    out.append(f"\n$ curl -X POST /gpu/release -> {release.status_code} {release.text}")
                    if release.status_code != 200:
                        problems.append(f"release answered {release.status_code}")
        finally:
            agent.stop()
            out.append("\n$ agent log\n" + agent.log())
    return problems


def main() -> int:
    if not gpu_present():
        print("no NVIDIA GPU present (nvidia-smi -L lists none): nothing to check")
        return 0
    lines: list[str] = []
    problems = run_check(lines)
    print("\n".join(lines))
    print("\nproblems:", problems or "none")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
