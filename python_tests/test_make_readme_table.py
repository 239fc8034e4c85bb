"""bench/make_readme_table.py: merging matrix files split over device calls, the row filters, the commit that ran."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import make_readme_table as mrt  # noqa: E402


def _doc(tmp_path, name, dtype, ms, device="GPU X", **header):
    recs = []
    for model in ("7b", "125m"):
        for mask in ("none", "threshold"):
            for backend in ("cuda", "triton"):
                recs.append(dict(model=model, op="perturb_", dtype=dtype, mask=mask, distribution="gaussian",
                                 backend=backend, ms=ms, floor_ms=ms / 2, fraction_of_floor=0.5, baseline_ms=3 * ms,
                                 extra_bytes=0))
    d = dict(device=device, date="2026-12-02", torch="t", triton="tr", cuda="c", python="p", git_commit="aaaa+dirty",
             copy_bandwidth_TBps=4.25, records=recs, **header)
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return str(p)


def test_merge_filters_and_commit_as_run(tmp_path):
    a = _doc(tmp_path, "a.json", "bf16", 10.0, git_commit_as_run="bbbb")
    b = _doc(tmp_path, "b.json", "fp32", 20.0)
    t = mrt.table(mrt.load([a, b]), models=["7b"], masked_dtypes=["bf16"])
    rows = [ln for ln in t.splitlines() if ln.startswith("| 7b") or ln.startswith("| 125m")]
    # 7b only; bf16 none + threshold, fp32 none only
    assert [r.split(" | ")[2:4] for r in rows] == [["bf16", "none"], ["bf16", "threshold"], ["fp32", "none"]]
    assert "| 10.00 (50%) | 10.00 (50%) |" in rows[0] and "| 20.00 (50%) |" in rows[2]
    assert "`bbbb`" in t and "`aaaa+dirty`" in t  # each file's commit: the corrected one where the file has it
    assert "a.json" in t and "b.json" in t
    full = mrt.table(mrt.load([a, b]))
    assert sum(ln.startswith("| 125m") for ln in full.splitlines()) == 4


def test_inputs_from_two_devices_are_refused(tmp_path):
    a = _doc(tmp_path, "a.json", "bf16", 10.0)
    b = _doc(tmp_path, "b.json", "fp32", 20.0, device="GPU Y")
    with pytest.raises(SystemExit, match="different devices"):
        mrt.load([a, b])


def test_main_rewrites_only_between_the_markers(tmp_path):
    a = _doc(tmp_path, "a.json", "bf16", 12.5)
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{mrt.BEGIN}\nOLD TABLE\n{mrt.END}\nafter\n")
    assert mrt.main(["--input", a, "--readme", str(readme), "--models", "7b"]) == 0
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "OLD TABLE" not in text
    assert "| 7b | `perturb_` | bf16 | none | gaussian | 12.50 (50%) |" in text
