"""bench/bench_e2e.py, make_e2e_table.py and plot_e2e.py on a tiny LLaMA on the CPU (no GPU needed).

One run of every method on a ~29k-parameter model, one timed step each: the JSON's structure, the breakdown's
arithmetic, that every ZO method moves the weights and that one lr = 0 step restores them (exactly in transient
mode), that masked methods only touch their masks, and the table / README / plot scripts on that JSON.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_e2e  # noqa: E402
import make_e2e_table  # noqa: E402

import mazo_kernels as mk  # noqa: E402
from mazo_kernels import reference as ref  # noqa: E402

METHODS = ["zosgd", "zosgd-transient", "mezo", "mezo-inplace", "sparse-zosgd", "sparse-mezo", "mazo-zosgd",
           "mazo-mezo"]
SPARSITY, DENSITY = 0.5, 0.25


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "e2e_tiny.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = bench_e2e.main(["--model-shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "2",
                             "--seq", "8", "--steps", "1", "--warmup", "1", "--lr", "1e-3", "--eps", "1e-3",
                             "--sparsity", str(SPARSITY), "--density", str(DENSITY), "--method", ",".join(METHODS),
                             "--cuda-graph", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(out) as f:
        return json.load(f), str(out)


def results(doc):
    (cfg,) = doc["configs"]
    return {r["method"]: r for r in cfg["results"]}


def test_json_structure(run):
    doc, _ = run
    assert doc["format"] == "mazo_kernels.bench_e2e" and doc["format_version"] == 1
    h = doc["header"]
    for k in ("device", "torch", "triton", "transformers", "python", "date", "git_commit", "model_shape",
              "model_config", "n_params", "weights_bytes", "args", "build_s", "total_wall_s"):
        assert k in h, k
    assert h["model_shape"] == "tiny" and h["dtype"] == "fp32" and h["check_weights"] is True
    assert h["weights_bytes"] == 4 * h["n_params"]
    (cfg,) = doc["configs"]
    assert (cfg["batch"], cfg["seq"]) == (2, 8)
    res = results(doc)
    assert list(res) == METHODS
    for m, r in res.items():
        assert r["status"] == "ok", (m, r.get("error"), r.get("traceback"))
        assert r["losses_finite"] and abs(r["loss_last"] - math.log(128)) < 1.0, (m, r["loss_last"])
    assert doc["cuda_graph"]["attempted"] is False                  # CUDA graphs need a GPU
    t = h["threshold_timing"]
    assert t["equal"] and t["kthvalue_ms"] > 0 and t["sort_ms"] > 0


def test_breakdown_and_ratios(run):
    doc, _ = run
    for m, r in results(doc).items():
        b = r["breakdown_ms"]
        assert b["forwards"] == r["fwd2_ms"] and b["passes"] == r["passes_ms"]
        assert b["forwards"] + b["passes"] + b["rest"] == pytest.approx(r["step_ms"], rel=1e-9, abs=1e-9)
        assert r["overhead_ms"] == pytest.approx(r["step_ms"] - r["fwd2_ms"])
        assert r["overhead_over_one_pass"] == pytest.approx(r["overhead_ms"] / r["one_pass_ms"])
        assert r["one_pass_ms"] == r["pass_ms"][0] and all(x > 0 for x in r["pass_ms"])
        assert len(r["pass_labels"]) == len(r["pass_ms"]) == (4 if r["impl"] == "mezo" else 3), m
        assert r["step_ms"] > 0 and r["fwd2_ms"] > 0
        assert r["mem_peak_step_bytes"] is None          # no allocator statistics on the CPU
    (cfg,) = doc["configs"]
    comps = {(c["ours"], c["baseline"]): c for c in cfg["comparisons"]}
    for pair in (("zosgd", "mezo"), ("zosgd", "mezo-inplace"), ("zosgd-transient", "mezo"),
                 ("sparse-zosgd", "sparse-mezo"), ("mazo-zosgd", "mazo-mezo")):
        a, b = results(doc)[pair[0]], results(doc)[pair[1]]
        assert comps[pair]["step_speedup"] == pytest.approx(b["step_ms"] / a["step_ms"])
    assert any(t["what"].startswith("zosgd:") for t in cfg["targets"])


def test_weights_move_and_restore(run):
    doc, _ = run
    res = results(doc)
    for m, r in res.items():
        after, lr0 = r["check"]["after_timed_steps"], r["check"]["after_one_lr0_step"]
        assert after["finite"] and lr0["finite"]
        assert after["rel_rms_change"] > 1e-4, m                 # lr = 1e-3: two steps move the weights
        if m == "sparse-mezo":
            # Sparse MeZO's mask recomputed from the perturbed weights in each pass: elements that cross tau are
            # not undone, so even an lr = 0 step moves some weights (what the kernels' latched selection avoids)
            continue
        assert lr0["rel_rms_change"] < 1e-5, (m, lr0)              # one lr = 0 step: restored up to rounding
    assert res["zosgd-transient"]["check"]["after_one_lr0_step"]["rel_rms_change"] == 0.0
    assert res["zosgd-transient"]["check"]["after_one_lr0_step"]["changed_fraction"] == 0.0
    assert res["sparse-zosgd"]["mask_selected_fraction"] == pytest.approx(1 - SPARSITY, abs=0.01)
    assert res["mazo-zosgd"]["mask_selected_fraction"] == pytest.approx(DENSITY)
    for m in ("sparse-zosgd", "mazo-zosgd", "mazo-mezo"):           # nothing outside the mask is ever written
        r = res[m]
        assert r["check"]["after_timed_steps"]["changed_fraction"] <= r["mask_selected_fraction"] + 1e-12, m
    for m in ("sparse-zosgd", "sparse-mezo", "mazo-zosgd", "mazo-mezo"):   # masked methods train the matrices
        assert res[m]["trained_params"] < doc["header"]["n_params"]


def test_table_and_readme(run, tmp_path):
    doc, path = run
    text = make_e2e_table.render(make_e2e_table.load([path]))
    for m in METHODS:
        assert f"`{m}`" in text
    assert "| model | batch x seq | method |" in text and "tiny fp32 | 2x8" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| tiny")]
    assert rows and all(ln.endswith("| 1 |") for ln in rows) and f"(1) `" in text   # the run column: source (1)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- e2e-table -->\nold\n<!-- /e2e-table -->\nrest\n")
    assert make_e2e_table.main([path, "--readme", str(readme)]) == 0
    s = readme.read_text()
    assert "old" not in s and "`zosgd`" in s and s.startswith("intro\n") and s.endswith("<!-- /e2e-table -->\nrest\n")


def test_plot(run, tmp_path):
    pytest.importorskip("matplotlib")
    import plot_e2e
    _, path = run
    png = tmp_path / "e2e.png"
    assert plot_e2e.main([path, "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_meta_built_model_matches_transformers():
    from transformers import LlamaForCausalLM
    fields = bench_e2e.model_fields("tiny", {}, 8)
    m1, cfg = bench_e2e.build_model(fields, torch.float32, torch.device("cpu"), seed=3)
    m2, _ = bench_e2e.build_model(fields, torch.float32, torch.device("cpu"), seed=3)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n                                # deterministic init
        assert torch.isfinite(a).all()
        if a.dim() == 1:
            assert torch.equal(a, torch.ones_like(a))              # RMSNorm weights
        else:
            assert 0.01 < float(a.std()) < 0.03
    ref_model = LlamaForCausalLM(cfg)                              # buffers as transformers computes them
    bufs = dict(ref_model.named_buffers())
    for n, b in m1.named_buffers():
        assert torch.equal(b, bufs[n]), n
    ids = torch.randint(0, fields["vocab_size"], (2, 8))
    with torch.no_grad():
        ref_model.load_state_dict(m1.state_dict())
        assert torch.allclose(m1(input_ids=ids, labels=ids).loss, ref_model(input_ids=ids, labels=ids).loss)


def test_threshold_taus_match_magnitude_threshold():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 29, generator=g).to(torch.bfloat16)          # bf16: many ties
    for s in (0.0, 0.3, 0.5, 0.75, 0.99):
        taus, selected = bench_e2e.threshold_taus([("w", w)], s)
        assert taus["w"] == mk.magnitude_threshold(w, s)
        assert selected == int((w.float().abs() < taus["w"]).sum())


def test_unpack_bits_roundtrip():
    g = torch.Generator().manual_seed(1)
    sel = torch.rand(13, 11, generator=g) < 0.3
    bits = ref.pack_bits(sel.reshape(-1))
    assert torch.equal(bench_e2e.unpack_bits(bits, (13, 11)), sel)


def test_parse_errors():
    with pytest.raises(SystemExit):
        bench_e2e.parse_methods("zosgd,nope")
    assert bench_e2e.parse_methods("mezo,zosgd,mezo") == ["zosgd", "mezo"]
    assert bench_e2e.parse_methods("masked") == METHODS[4:]
    assert bench_e2e.parse_shapes("16,1", "256,512") == [(16, 256), (1, 512)]
    assert bench_e2e.parse_shapes("4", "128,256") == [(4, 128), (4, 256)]
    with pytest.raises(SystemExit):
        bench_e2e.parse_shapes("1,2,3", "4,5")


def test_negative_overhead_is_never_a_met_target():
    """A step timed shorter than its two forwards (the forwards timed apart, noise) gives a negative overhead: no
    measurement, so neither bench_e2e's targets nor the table may call it met (an old file said "met")."""
    res = [{"method": "zosgd", "status": "ok", "overhead_over_one_pass": v} for v in (-17.26,)]
    (t,) = bench_e2e.targets("125m", 1, 512, res, [])
    assert t["value"] == -17.26 and t["met"] is False
    ok = bench_e2e.targets("125m", 1, 512, [dict(res[0], overhead_over_one_pass=2.5)], [])
    assert ok[0]["met"] is True
    doc = {"header": {"model_shape": "125m"}, "configs": [{"batch": 1, "seq": 512, "targets": [
        dict(t, met=True), dict(ok[0])]}]}
    lines = make_e2e_table.target_lines([doc])
    assert "**no measurement" in lines[0] and "**met**" not in lines[0]
    assert lines[1].endswith("**met**")


def test_noise_tag_only_on_our_methods():
    """A run with --dist gaussian_fast: ZOSGD rows say so; MeZO-style rows (masked ones included) draw
    torch.normal whatever --dist says, so they carry no tag."""
    h = {"dist": "gaussian_fast"}
    for method in ("zosgd", "zosgd-transient", "sparse-zosgd", "mazo-zosgd"):
        assert make_e2e_table._dist_tag({"method": method}, h) == " (gaussian_fast)", method
    for method in ("mezo", "mezo-inplace", "sparse-mezo", "sparse-mezo-inplace", "mazo-mezo", "mazo-mezo-inplace"):
        assert make_e2e_table._dist_tag({"method": method}, h) == "", method
    assert make_e2e_table._dist_tag({"method": "zosgd"}, {"dist": "gaussian"}) == ""


def test_compare_backend_runs_each_of_our_methods_twice(tmp_path):
    """--compare-backend: each of our methods once more on the other backend in the same process, under
    `<method>@<backend>`, the baselines once; backend_ab pairs them, and the table and plot take the extra rows."""
    out = tmp_path / "ab.json"
    rc = bench_e2e.main(["--model-shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "2", "--seq", "8",
                         "--steps", "1", "--warmup", "0", "--method", "zosgd,mezo,sparse-zosgd",
                         "--backend", "cpu" if mk.has_cpu() else "reference", "--compare-backend", "reference",
                         "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    (cfg,) = doc["configs"]
    names = [r["method"] for r in cfg["results"]]
    assert names == ["zosgd", "zosgd@reference", "mezo", "sparse-zosgd", "sparse-zosgd@reference"]
    recs = {r["method"]: r for r in cfg["results"]}
    assert all(r["status"] == "ok" for r in recs.values())
    assert recs["zosgd@reference"]["backend"] == "reference" and recs["zosgd@reference"]["base_method"] == "zosgd"
    assert recs["sparse-zosgd@reference"]["mask"] == "threshold"
    ab = {c["method"]: c for c in cfg["backend_ab"]}
    assert sorted(ab) == ["sparse-zosgd", "zosgd"]
    for m, c in ab.items():
        assert c["other_backend"] == "reference"
        assert c["step_ratio"] == pytest.approx(recs[m]["step_ms"] / recs[f"{m}@reference"]["step_ms"])
    assert [c["ours"] for c in cfg["comparisons"]] == ["zosgd"]     # the @ rows are not compared with MeZO
    text = make_e2e_table.render(make_e2e_table.load([str(out)]))
    assert "`zosgd@reference`" in text and "`sparse-zosgd@reference`" in text


def test_paired_rounds_time_each_step_against_its_own_forwards(tmp_path):
    """--paired: rounds of (forward, forward, step); record['paired'] holds each round's step minus its forwards and
    their median over one pass."""
    out = tmp_path / "paired.json"
    rc = bench_e2e.main(["--model-shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "2", "--seq", "8",
                         "--steps", "3", "--warmup", "0", "--method", "zosgd,mezo", "--paired", "--out", str(out)])
    assert rc == 0
    (cfg,) = json.loads(out.read_text())["configs"]
    for r in cfg["results"]:
        pr = r["paired"]
        assert pr["rounds"] == 3 and len(pr["overhead_ms_all"]) == 3
        assert pr["overhead_ms"] == pytest.approx(sorted(pr["overhead_ms_all"])[1])
        assert pr["overhead_over_one_pass"] == pytest.approx(pr["overhead_ms"] / r["one_pass_ms"])
        assert pr["step_ms"] > 0 and pr["fwd2_ms"] > 0
    # the table's "paired" column carries it; runs without --paired show "-" there
    text = make_e2e_table.render(make_e2e_table.load([str(out)]))
    head = next(ln for ln in text.splitlines() if ln.startswith("| model |"))
    col = [c.strip() for c in head.split("|")].index("paired")
    for r in cfg["results"]:
        row = next(ln for ln in text.splitlines() if f"`{r['method']}`" in ln)
        assert row.split("|")[col].strip() == f"{r['paired']['overhead_over_one_pass']:.2f}"
