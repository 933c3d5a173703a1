"""The mixed-shape replay (tests/bench/bench_shapes.py) on a tiny trace: structure and sanity, not timing."""

from __future__ import annotations

from tests.bench import bench_shapes
from tests.bench.shapes_trace import SHAPES, build_fleet, generate


def test_a_seed_gives_the_same_trace_and_every_shape_appears() -> None:
    trace = generate(jobs=600, hosts=12, seed=3)
    assert trace == generate(jobs=600, hosts=12, seed=3)
    assert {j.shape for j in trace.jobs} == set(SHAPES)
    assert all(j.mig_profile is not None for j in trace.jobs if j.shape == "MIG slice")


def test_the_fleet_mixes_the_four_host_kinds() -> None:
    fleet = build_fleet(12)
    assert set(fleet.kinds.values()) == {"hgx-h100", "pcie-nvlink-pairs", "pcie-2socket", "a100-mig"}
    assert fleet.slices() == 4 * fleet.mig_gpus()
    assert fleet.inventory(topology=False).topology("hgx-h100-000") is None
    assert fleet.inventory(topology=True).topology("hgx-h100-000") is not None


def test_tiny_replay_reports_every_variant_and_sane_figures() -> None:
    trace = generate(jobs=400, hosts=12, seed=5)
    results = bench_shapes.run_variants(trace)
    on, off, shared_on, shared_off = results
    assert all(isinstance(r, bench_shapes.Figures) for r in results)
    assert isinstance(on, bench_shapes.Figures) and isinstance(off, bench_shapes.Figures)
    assert isinstance(shared_on, bench_shapes.Figures) and isinstance(shared_off, bench_shapes.Figures)
    # Small jobs pack several to a GPU: the whole-GPU pool holds no more GPUs with sharing.
    assert shared_on.util_whole <= on.util_whole
    for f in (on, off, shared_on, shared_off):
        assert 0 < f.util <= 1 and 0 <= f.util_whole <= 1 and 0 <= f.util_mig <= 1
        assert 0 <= f.largest_nvlink <= f.largest_gpus <= 8
        assert all(0 <= v <= 1 for v in f.stranded.values())
        assert sum(n for _, _, n in f.waits.values()) == len(trace.jobs)
        assert all(0 <= p50 <= p99 for p50, p99, _ in f.waits.values())
    # Topology only picks GPUs within the node best fit chose: the same jobs start at the same times.
    assert on.waits == off.waits
    # And with it, 2-GPU sets get their host's best link at least as often.
    assert on.best_link2 >= off.best_link2
    header, rows = bench_shapes.table_rows(results)
    assert len(header) == 5 and all(len(r) == 5 for r in rows)
    assert not any("not available" in c for r in rows for c in r)
