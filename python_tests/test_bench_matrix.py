"""bench/bench_matrix.py on the CPU (its smoke-test mode): every op, the records' fields, and ops that change the
weights only as they should (update0 runs update_ with prior 0: the transient mode's update)."""
from __future__ import annotations

import json
import os
import sys

import pytest

import mazo_kernels as mk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_matrix  # noqa: E402

FIELDS = ("op", "dtype", "mask", "distribution", "backend", "numel", "ms", "floor_ms", "fraction_of_floor",
          "baseline_ms")


@pytest.mark.skipif(not mk.has_cpu(), reason="needs the C++ CPU extension")
def test_cpu_smoke_run_writes_every_op(tmp_path):
    rc = bench_matrix.main(["--model", "tiny", "--device", "cpu", "--backends", "cpu", "--dtypes", "bf16",
                            "--masks", "none,threshold", "--dists", "gaussian_fast", "--ops", ",".join(bench_matrix.OPS),
                            "--quick", "--iters", "1", "--warmup", "0", "--baseline-iters", "1",
                            "--out", str(tmp_path), "--tag", "t"])
    assert rc in (0, None)
    doc = json.load(open(tmp_path / "matrix_t.json"))
    recs = doc["records"]
    assert {r["op"] for r in recs} == set(bench_matrix.OPS)
    assert {r["mask"] for r in recs} == {"none", "threshold"}
    for r in recs:
        assert "error" not in r, r
        for f in FIELDS:
            assert f in r, (f, r["op"])
        assert r["ms"] > 0 and r["floor_ms"] > 0 and r["fraction_of_floor"] == pytest.approx(r["floor_ms"] / r["ms"])
        assert r["baseline_ms"] is not None and r["baseline_ms"] > 0
    # the transient mode's update evaluates a threshold rule itself: no latch bytes in its floor
    by = {(r["op"], r["mask"]): r for r in recs}
    assert by[("update0", "threshold")]["floor_ms"] < by[("update_", "threshold")]["floor_ms"]
    assert by[("update0", "none")]["floor_ms"] == pytest.approx(by[("update_", "none")]["floor_ms"])


def test_variants_run_on_every_selected_mask_unless_narrowed():
    """--triton-variants / --cuda-variants run on every selected mask by default (a default of "none" alone had let
    variants asked for masked cases silently not run); --variant-masks narrows them."""
    sel = {"masks": ["none", "threshold", "bitmask"]}
    ap_args = lambda *a: bench_matrix.build_parser().parse_args(list(a))  # noqa: E731
    assert bench_matrix.variant_masks(ap_args(), sel) == ["none", "threshold", "bitmask"]
    assert bench_matrix.variant_masks(ap_args("--variant-masks", "bitmask"), sel) == ["bitmask"]
