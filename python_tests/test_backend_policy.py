"""backend="fastest": each pass of a CUDA call on cuda or triton, from the measured table
mazo_kernels/backend_policy.py (bench/make_backend_policy.py). The bits are the backends' own (python_tests/
test_gpu_backends.py runs the step with it on a GPU); here: the table is the generator's output for its sources, a
pass maps to the table's key, the op dispatches to the chosen backend, the errors, and a masked step whose passes
alternate between this machine's two CPU-capable kernels (C++ and Triton's interpreter) through that dispatch."""
import os
import re
import subprocess
import sys

import pytest
import torch

import mazo_kernels as mk
from mazo_kernels import _backends, backend_policy
from mazo_kernels import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_policy_table_is_the_generators_output_for_its_sources(tmp_path):
    """Regenerate the table from the JSON files its docstring names: the same file, byte for byte."""
    sources = re.findall(r"^- (bench/results/\S+\.json(?:@\S+)?)$", backend_policy.__doc__, re.M)
    assert len(sources) >= 2, backend_policy.__doc__
    left_out = re.search(r"^Left out \(stale after a later kernel change\): (.*)\.$", backend_policy.__doc__, re.M)
    exclude = [item.replace(" ", ":") for item in left_out.group(1).split(", ")] if left_out else []
    out = tmp_path / "policy.py"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_backend_policy.py"), "--input",
                          *[os.path.join(ROOT, s) for s in sources], "--ratio", str(backend_policy.RATIO),
                          "--out", str(out)] + (["--exclude", *exclude] if exclude else []),
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    with open(os.path.join(ROOT, "mazo_kernels", "backend_policy.py")) as f:
        assert out.read_text() == f.read()


def test_generator_keeps_cuda_unless_triton_wins_every_measurement():
    """Triton is chosen for a key only where every model and both byte masks had it at most --ratio of CUDA."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import make_backend_policy as gen
    finally:
        sys.path.pop(0)
    cases = {("7b", "bf16", "threshold", "update_", "rademacher"): {"cuda": 20.0, "triton": 15.0},
             ("7b", "bf16", "bitmask", "update_", "rademacher"): {"cuda": 20.0, "triton": 16.0},
             ("125m", "bf16", "threshold", "update_", "rademacher"): {"cuda": 1.0, "triton": 0.9},
             ("7b", "bf16", "threshold", "perturb_", "rademacher"): {"cuda": 20.0, "triton": 15.0},
             ("7b", "bf16", "bitmask", "perturb_", "rademacher"): {"cuda": 20.0, "triton": 19.5},   # 0.975: no
             ("7b", "fp16", "none", "update_", "gaussian"): {"cuda": 10.0, "triton": 9.5},            # 0.95: yes
             ("7b", "fp32", "rowindex", "update_", "gaussian"): {"cuda": 10.0}}                      # unpaired
    keys, n = gen.triton_keys(cases, 0.95)
    assert keys == [("bf16", "bytes", "update_", "rademacher"), ("fp16", "none", "update_", "gaussian")]
    assert n == 3


def test_generator_leaves_out_excluded_model_and_mask(tmp_path):
    """--exclude MODEL:MASK drops those records (stale ones), so the other models decide the key; a bad item is
    refused with a message naming the form."""
    import json
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import make_backend_policy as gen
    finally:
        sys.path.pop(0)
    recs = [dict(model=m, dtype="bf16", mask="rowindex", op="update_", distribution="gaussian", backend=b, ms=ms)
            for m, b, ms in (("7b", "cuda", 40.0), ("7b", "triton", 28.0), ("125m", "cuda", 0.8),
                             ("125m", "triton", 0.9))]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"records": recs, "device": "d", "date": "x"}))
    cases, _ = gen.load([str(path)])
    assert gen.triton_keys(cases, 0.95)[0] == []                        # 125M had Triton slower
    cases, _ = gen.load([str(path)], {("125m", "rowindex")})
    assert gen.triton_keys(cases, 0.95)[0] == [("bf16", "rowindex", "update_", "gaussian")]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_backend_policy.py"), "--input",
                          str(path), "--out", str(tmp_path / "p.py"), "--exclude", "125m-rowindex"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "MODEL:MASK" in res.stderr


def test_generator_takes_a_variant_as_the_triton_default(tmp_path):
    """FILE@LABEL: that file's Triton records of variant LABEL stand for Triton (the form that became the default
    after the run); its unlabeled Triton records and other variants are left out, CUDA's unlabeled ones kept."""
    import json
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import make_backend_policy as gen
    finally:
        sys.path.pop(0)
    recs = [dict(model="125m", dtype="bf16", mask="rowindex", op="perturb_prior", distribution="gaussian",
                 backend=b, ms=ms, **({"variant": v} if v else {}))
            for b, v, ms in (("cuda", "", 0.61), ("triton", "", 0.654), ("triton", "s24", 0.517),
                             ("triton", "bin", 0.538), ("cuda", "x", 9.0))]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"records": recs, "device": "d", "date": "x"}))
    cases, _ = gen.load([str(path)])
    assert cases == {("125m", "bf16", "rowindex", "perturb_prior", "gaussian"): {"cuda": 0.61, "triton": 0.654}}
    cases, sources = gen.load([f"{path}@s24"])
    assert cases == {("125m", "bf16", "rowindex", "perturb_prior", "gaussian"): {"cuda": 0.61, "triton": 0.517}}
    assert sources[0][0].endswith("m.json@s24")


@pytest.mark.parametrize("op,prior,name", [(ref.OP_PERTURB, 0.0, "perturb_"), (ref.OP_PERTURB, 1e-3, "perturb_prior"),
                                           (ref.OP_UPDATE, -1e-3, "update_"), (ref.OP_UPDATE, 0.0, "update0"),
                                           (ref.OP_COPY, 0.0, "perturbed_copy"),
                                           (ref.OP_UPDATE_PERTURB, -1e-3, "update_next")])
def test_pass_backend_reads_the_table_key(op, prior, name, monkeypatch):
    none, latch = torch.zeros(0, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    rows = torch.zeros((8, 4), dtype=torch.int32)
    monkeypatch.setattr(backend_policy, "TRITON", frozenset({("bf16", "bytes", name, "gaussian_fast"),
                                                             ("fp32", "rowindex", name, "rademacher")}))
    G, R = ref.DIST_GAUSSIAN_FAST, ref.DIST_RADEMACHER
    assert _backends.pass_backend(op, G, prior, torch.bfloat16, [none, latch, none]) == "triton"
    assert _backends.pass_backend(op, G, prior, torch.bfloat16, [none, none]) == "cuda"          # class none
    assert _backends.pass_backend(op, R, prior, torch.bfloat16, [latch]) == "cuda"               # other noise
    assert _backends.pass_backend(op, G, prior, torch.float16, [latch]) == "cuda"                # other dtype
    assert _backends.pass_backend(op, R, prior, torch.float32, [latch, rows]) == "triton"        # row-index wins
    assert _backends.pass_backend(op, G, prior, torch.bfloat16, [latch, rows]) == "cuda"


def test_the_measured_table_mixes_backends_in_a_masked_bf16_step():
    """The point of "fastest": on the table as measured, a Sparse MeZO bf16 step (gaussian_fast) runs its first
    pass on one backend and its restoring passes on the other."""
    latch = torch.zeros(8, dtype=torch.uint8)
    G = ref.DIST_GAUSSIAN_FAST
    chosen = {_backends.pass_backend(op, G, prior, torch.bfloat16, [latch])
              for op, prior in ((ref.OP_PERTURB, 0.0), (ref.OP_PERTURB, 1e-3), (ref.OP_UPDATE, -1e-3))}
    assert chosen == {"cuda", "triton"}


def test_op_dispatches_each_pass_to_the_chosen_backend(monkeypatch):
    """zo_apply_(backend="fastest") asks pass_backend and runs that backend's kernel with the call's arguments."""
    calls = []

    def fake_kernel(backend):
        def run(*args, **kw):
            calls.append(backend)
        return run

    monkeypatch.setattr(_backends, "kernel", fake_kernel)
    monkeypatch.setattr(_backends, "pass_backend", lambda op, dist, prior, dtype, masks:
                        "triton" if op == ref.OP_UPDATE else "cuda")
    w = [torch.randn(16, dtype=torch.bfloat16)]
    meta = torch.tensor([[1, 0, ref.MASK_NONE, 0]], dtype=torch.int64)
    fv = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    gs = torch.zeros(0)
    mk.ops.zo_apply_(w, [], [torch.zeros(0, dtype=torch.uint8)], meta, fv, [3], gs, ref.OP_PERTURB,
                     ref.DIST_GAUSSIAN, ref.ROUND_NEAREST, 0, 0, 1e-3, 0.0, 0.0, "fastest")
    mk.ops.zo_apply_(w, [], [torch.zeros(0, dtype=torch.uint8)], meta, fv, [3, 4], torch.ones(1), ref.OP_UPDATE,
                     ref.DIST_GAUSSIAN, ref.ROUND_NEAREST, 0, 0, 0.0, 1e-3, 1e-2, "fastest")
    assert calls == ["cuda", "triton"]


def test_fastest_needs_cuda_tensors_and_both_backends(monkeypatch):
    with pytest.raises(ValueError, match="backend 'fastest' .* runs on CUDA tensors; these are on cpu"):
        _backends.resolve("fastest", torch.device("cpu"))
    with pytest.raises(ValueError, match="choose auto, reference, cpu, triton, cuda or fastest"):
        _backends.resolve("quickest", torch.device("cpu"))
    monkeypatch.setattr(_backends, "has_cuda", lambda: False)
    with pytest.raises(_backends.BackendUnavailable, match="'fastest' backend picks cuda or triton per pass and "
                                                           "needs both: the 'cuda' backend needs"):
        _backends.require("fastest")
    monkeypatch.setattr(_backends, "has_cuda", lambda: True)
    monkeypatch.setattr(_backends, "has_triton", lambda: False)
    with pytest.raises(_backends.BackendUnavailable, match="needs both: the 'triton' backend needs"):
        _backends.require("fastest")


@pytest.mark.parametrize("cuda,triton,cap,want", [(True, True, (9, 0), "fastest"), (True, True, (8, 0), "fastest"),
                                                  (True, True, (7, 5), "cuda"), (True, False, (9, 0), "cuda"),
                                                  (False, True, (9, 0), "triton")])
def test_auto_on_cuda_tensors_is_fastest_where_both_backends_are(cuda, triton, cap, want, monkeypatch):
    """backend="auto" on CUDA tensors: "fastest" with the extension and triton on sm_80 and later (measured on an
    H200: the same steps' passes 0.87-0.89x cuda's with masks, 1.00x dense; bench/NOTES.md session 21), cuda on
    older GPUs, else the backend there is. CPU tensors keep cpu / reference."""
    monkeypatch.setattr(_backends, "has_cuda", lambda: cuda)
    monkeypatch.setattr(_backends, "has_triton", lambda: triton)
    monkeypatch.setattr(_backends, "_capability", lambda device: cap)
    assert _backends.resolve("auto", torch.device("cuda", 0)) == want
    monkeypatch.setattr(_backends, "has_cpu", lambda: True)
    assert _backends.resolve("auto", torch.device("cpu")) == "cpu"


def test_fastest_on_cpu_plan_is_refused_before_any_write():
    plan = mk.ZOPlan([("w", torch.randn(32))])
    before = plan.entries[0].tensor.clone()
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        mk.perturb_(plan, 1, 1e-3, backend="fastest")
    assert torch.equal(plan.entries[0].tensor, before)


def _step_plan(dtype, gen):
    """bf16 / fp32 weights with every mask kind, block-sized so the fast paths run (interpreter: small blocks)."""
    def w(*shape):
        x = torch.randn(*shape, generator=gen) * 0.05
        x.view(-1)[::7] *= 20.0
        return x.to(dtype)
    sel = torch.rand(512, generator=gen) < 0.4
    cols = torch.stack([torch.randperm(64, generator=gen)[:40].sort().values for _ in range(8)]).to(torch.int32)
    entries = [mk.PlanEntry("thr", w(768 + 40), 11, mask=mk.ThresholdMask(0.04)),
               mk.PlanEntry("bits", w(512), 12, mask=mk.BitMask.from_bool(sel)),
               mk.PlanEntry("rows", w(8, 64), 13, mask=mk.RowIndexMask(cols)),
               mk.PlanEntry("dense", w(256), 14)]
    return mk.ZOPlan(entries)


@pytest.mark.parametrize("first", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fastest_dispatch_mixes_backends_within_a_step_bit_exactly(first, dtype, monkeypatch):
    """The mechanism "fastest" relies on, run on this machine's two CPU-capable kernels: each pass of a masked ZO
    step (threshold latch written, read; restore; update with stochastic rounding; op 3) goes to the C++ CPU backend
    or to Triton's interpreter in turn, through zo_apply_'s per-pass dispatch, and the weights and latches end
    bit-identical to the reference's. first: which backend takes the step's first pass (so the latch is written
    by one and read by the other, both ways)."""
    if not _backends.has_cpu():
        pytest.skip("needs the C++ CPU extension")
    if not _backends.has_triton() or not _backends.triton_interpreted():
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    from mazo_kernels import triton_kernels as tk
    monkeypatch.setattr(tk, "BLOCK", 128)
    monkeypatch.setattr(tk, "FAST_BLOCK", 256)
    other = "triton" if first == "cpu" else "cpu"
    used = []

    def policy(op, dist, prior, dt, masks):   # alternate per pass, starting with `first`
        b = (first, other)[len(used) % 2]
        used.append(b)
        return b

    monkeypatch.setattr(_backends, "pass_backend", policy)
    real_resolve = _backends.resolve
    monkeypatch.setattr(_backends, "resolve", lambda b, dev: b if b == "fastest" else real_resolve(b, dev))
    monkeypatch.setattr(_backends, "require", lambda b: None)
    p_ref, p_mix = (_step_plan(dtype, torch.Generator().manual_seed(7)) for _ in range(2))
    seed, eps, nxt = 0xFEDCBA9876543210, 1e-3, 12345
    for dist in ("gaussian_fast", "rademacher"):
        for plan, b in ((p_ref, "reference"), (p_mix, "fastest")):
            mk.perturb_(plan, seed, eps, dist=dist, backend=b)
            mk.perturb_(plan, seed, -eps, prior=eps, dist=dist, backend=b)
            mk.update_(plan, [seed, 99], [0.7, -1.3], lr=1e-2, restore_seed=seed, prior=-eps, sr_seed=5,
                       dist=dist, backend=b, next_seed=nxt, next_scale=eps)
            mk.perturb_(plan, nxt, -eps, prior=eps, dist=dist, backend=b)
            mk.update_(plan, [nxt], [0.5], lr=1e-2, restore_seed=nxt, prior=-eps, sr_seed=6, dist=dist, backend=b)
        for a, c in zip(p_ref.entries, p_mix.entries):
            assert torch.equal(a.tensor.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               c.tensor.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), (dist, a.name)
        for ga, gc in zip(p_ref.groups, p_mix.groups):
            for ma, mc in zip(ga.masks, gc.masks):
                assert torch.equal(ma, mc), (dist, "latch")
        seed, nxt = nxt, nxt + 1
    assert set(used) == {"cpu", "triton"} and used[0] == first and len(used) == 10
