"""The Triton backend against the reference, bit for bit, through the public API.

On a machine without a GPU this runs the Triton interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1);
with a GPU it runs the compiled kernels on CUDA tensors and compares with the reference on CPU copies.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import mazo_kernels as mk
from mazo_kernels import reference as ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

pytestmark = pytest.mark.skipif(
    not (mk.has_triton() and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="triton backend needs a GPU or TRITON_INTERPRET=1 set before triton is imported")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.uint8: torch.uint8, torch.int32: torch.int32}


@pytest.fixture(autouse=True)
def _big_block(monkeypatch):
    tk = pytest.importorskip("mazo_kernels.triton_kernels")
    monkeypatch.setattr(tk, "BLOCK", 1024)  # the interpreter pays per op, not per element
    return tk


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(INT_VIEW[t.dtype])


def assert_same(a: torch.Tensor, b: torch.Tensor, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    ba, bb = bits(a), bits(b)
    if a.dtype in (torch.float32, torch.float16):
        # NaN bit patterns of float32 arithmetic and of the fp16 cast are platform defined (x86 makes 0xFFC00000,
        # CUDA 0x7FFFFFFF); the spec fixes NaN bits only for bf16 (0x7FC0). Compare NaNs as NaNs.
        na, nb = torch.isnan(a.detach().cpu()), torch.isnan(b.detach().cpu())
        assert torch.equal(na, nb), f"{what}: NaN positions differ"
        ba, bb = ba.masked_fill(na, 0), bb.masked_fill(nb, 0)
    if not torch.equal(ba, bb):
        bad = (ba != bb).nonzero().reshape(-1)[:8].tolist()
        raise AssertionError(f"{what}: {int((ba != bb).sum())} of {ba.numel()} differ, first at {bad}: "
                             f"{ba.reshape(-1)[bad].tolist()} vs {bb.reshape(-1)[bad].tolist()}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def weights(shape, dtype, g, scale=0.05, special=False):
    x = torch.randn(shape, generator=g) * scale
    if special and x.numel() >= 16:
        f = x.reshape(-1)
        f[:10] = torch.tensor([0.0, -0.0, 1e-30, -3e-8, 6e-5, -1e-7, 65000.0, -2.0 ** -24, 1e-40, 3.0])
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------ plan builders
def make_entries(specs, device):
    """specs: list of dicts (name, tensor (cpu), tid, mask spec, multipliers, offset). Fresh copies every call."""
    out = []
    for s in specs:
        t = s["tensor"].clone().to(device)
        m = s.get("mask")
        if m is not None:
            kind, val = m
            if kind == "thr":
                m = mk.ThresholdMask(val)
            elif kind == "bits":
                m = mk.BitMask.from_bool(val.to(device))
            else:
                m = mk.RowIndexMask(val.to(device))
        out.append(mk.PlanEntry(s["name"], t, s["tid"], global_offset=s.get("offset", 0),
                                full_numel=s.get("full"), mask=m, scale_mult=s.get("sm", 1.0),
                                lr_mult=s.get("lm", 1.0), weight_decay=s.get("wd", 0.0), g_mult=s.get("gm", 1.0)))
    return out


def plans(specs, group=True):
    """The same plan for the reference (CPU) and for triton (DEV); group=False gives one plan per tensor."""
    r = make_entries(specs, "cpu")
    t = make_entries(specs, DEV)
    if group:
        return [mk.ZOPlan(r)], [mk.ZOPlan(t)]
    return [mk.ZOPlan([e]) for e in r], [mk.ZOPlan([e]) for e in t]


def compare_plans(pr, pt, what):
    for a, b in zip(pr, pt):
        for ea, eb in zip(a.entries, b.entries):
            assert_same(ea.tensor, eb.tensor, f"{what}: {ea.name}")
        for ga, gb in zip(a.groups, b.groups):
            for ma, mb in zip(ga.masks, gb.masks):
                assert_same(ma, mb, f"{what}: mask/latch")


def compare_copies(pr, pt, seed, dist, what):
    """perturbed_copy of the first plan into NaN-filled outputs, reference against triton."""
    outs = {}
    for backend, ps in (("reference", pr), ("triton", pt)):
        o = [torch.full_like(e.tensor, float("nan")) for e in ps[0].entries]
        outs[backend] = mk.perturbed_copy(ps[0], seed, 0.3, out=o, dist=dist, backend=backend)
    for a, b, e in zip(outs["reference"], outs["triton"], pr[0].entries):
        assert_same(a, b, f"{what} {e.name}")


def rowidx(rows, cols, k, g):
    if k == 0:
        return torch.zeros(rows, 0, dtype=torch.int32)
    return torch.stack([torch.randperm(cols, generator=g)[:k].sort().values for _ in range(rows)]).to(torch.int32)


def mixed_specs(dtype, g, *, offset_base=0, sizes=(1, 3, 130, 1029), with_masks=True, mults=True):
    specs = []
    for i, n in enumerate(sizes):
        specs.append(dict(name=f"w{i}", tensor=weights((n,), dtype, g, special=(i == len(sizes) - 1)),
                          tid=(0x9E3779B9 * (i + 1)) & 0xFFFFFFFF, offset=offset_base + 5 * i,
                          full=offset_base + 5 * i + n,
                          sm=1.5 if (mults and i % 2) else 1.0, lm=0.5 if (mults and i == 1) else 1.0,
                          wd=0.01 if (mults and i == 2) else 0.0, gm=-2.0 if (mults and i == 3) else 1.0))
    specs.append(dict(name="empty", tensor=torch.zeros(0, dtype=dtype), tid=77))
    if with_masks:
        w = weights((37, 23), dtype, g)
        tau = float(w.float().abs().reshape(-1)[5])  # some elements exactly at tau
        specs.append(dict(name="thr", tensor=w, tid=1001, mask=("thr", tau), offset=11, full=11 + w.numel()))
        specs.append(dict(name="bits", tensor=weights((301,), dtype, g), tid=1002,
                          mask=("bits", torch.rand(301, generator=g) < 0.4)))
        specs.append(dict(name="rows", tensor=weights((19, 40), dtype, g), tid=1003,
                          mask=("rows", rowidx(19, 40, 7, g)), offset=2 ** 33 + 3, full=2 ** 34))
        specs.append(dict(name="rows0", tensor=weights((3, 5), dtype, g), tid=1004, mask=("rows", rowidx(3, 5, 0, g))))
    return specs


# ------------------------------------------------------------------------------------------------ noise
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "gaussian_fast"])
@pytest.mark.parametrize("off,n", [(0, 1), (0, 1000), (3, 777), (128, 300), (2 ** 32 - 5, 700),
                                   (2 ** 40 + 3, 261), (2 ** 62 - 300, 299)])
def test_noise_matches_reference(dist, off, n):
    for seed, tid in ((0, 0), (2 ** 64 - 1, 2 ** 32 - 1), (0xDEADBEEFCAFEF00D, 12345)):
        a = mk.noise(seed, tid, off, n, dist=dist, backend="reference")
        b = mk.noise(seed, tid, off, n, dist=dist, device=DEV, backend="triton")
        assert_same(a, b, f"{dist} seed={seed} tid={tid} off={off}")


@pytest.mark.parametrize("block", [128, 256, 4096])
def test_noise_independent_of_block(block, monkeypatch, _big_block):
    monkeypatch.setattr(_big_block, "BLOCK", block)
    for dist in ("gaussian", "rademacher", "gaussian_fast"):
        for off in (0, 5, 2 ** 35 + 131):
            a = mk.noise(42, 9, off, 1500, dist=dist, backend="reference")
            b = mk.noise(42, 9, off, 1500, dist=dist, device=DEV, backend="triton")
            assert_same(a, b, f"{dist} block={block} off={off}")


def test_noise_empty():
    assert mk.noise(1, 2, 3, 0, device=DEV, backend="triton").numel() == 0


# ------------------------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "gaussian_fast"])
def test_step_sequence(dtype, dist):
    """perturb(+eps, latch write) -> perturb(-eps, prior, latch read) -> update(prior, SR) -> update(no prior)."""
    g = gen(hash((str(dtype), dist)) & 0xFFFF)
    specs = mixed_specs(dtype, g)
    pr, pt = plans(specs)
    eps, seed = 1e-3, 2 ** 64 - 7
    for backend, ps in (("reference", pr), ("triton", pt)):
        mk.perturb_(ps[0], seed, eps, dist=dist, backend=backend)
    compare_plans(pr, pt, "perturb +eps")
    for backend, ps in (("reference", pr), ("triton", pt)):
        mk.perturb_(ps[0], seed, -eps, prior=eps, dist=dist, backend=backend)
    compare_plans(pr, pt, "perturb -eps")
    seeds, grads = [seed, 3, 2 ** 63 + 1], [0.75, -1.25e3, 3e-2]
    for backend, ps in (("reference", pr), ("triton", pt)):
        gs = torch.tensor(grads, dtype=torch.float32, device=ps[0].device)
        mk.update_(ps[0], seeds, gs, lr=1e-2, restore_seed=seed, prior=-eps, rounding="stochastic",
                   sr_seed=2 ** 64 - 1, dist=dist, backend=backend)
    compare_plans(pr, pt, "update prior SR")
    for rounding in ("nearest", "stochastic"):
        for backend, ps in (("reference", pr), ("triton", pt)):
            mk.update_(ps[0], [11], [1e4], lr=3e-3, rounding=rounding, sr_seed=5, dist=dist, backend=backend)
        compare_plans(pr, pt, f"update {rounding}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturbed_copy_all_masks(dtype):
    g = gen(7 + DTYPES.index(dtype))
    specs = mixed_specs(dtype, g, offset_base=2 ** 33 + 1)
    pr, pt = plans(specs)
    outs = {}
    for backend, ps in (("reference", pr), ("triton", pt)):
        o = [torch.full_like(e.tensor, float("nan")) for e in ps[0].entries]  # poisoned
        outs[backend] = mk.perturbed_copy(ps[0], 0xABCDEF0123456789, 0.3, out=o, backend=backend)
    for a, b, e in zip(outs["reference"], outs["triton"], pr[0].entries):
        assert_same(a, b, f"copy {e.name}")
    compare_plans(pr, pt, "weights untouched")
    for e, s in zip(pt[0].entries, specs):
        assert_same(e.tensor, s["tensor"], "copy must not touch theta")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturbed_copy_into_new_outputs_each_call(dtype):
    """The cached tables of perturbed_copy are keyed without the outputs' addresses (the transient mode allocates
    new copies every forward): every call must write its own outputs, aligned or not, and leave earlier ones."""
    g = gen(17 + DTYPES.index(dtype))
    specs = mixed_specs(dtype, g)
    pr, pt = plans(specs)

    def fresh(plan, shift):   # poisoned outputs; shift 1: one element off a 16-byte boundary (no fast path)
        outs = []
        for e in plan.entries:
            buf = torch.full((e.tensor.numel() + 8,), float("nan"), dtype=dtype, device=e.tensor.device)
            outs.append(buf[shift:shift + e.tensor.numel()].view(e.tensor.shape))
        return outs

    calls = [(0xABC, 0.3, 0), (0xDEF, -0.2, 1), (0x123, 0.1, 0)]
    got = [mk.perturbed_copy(pt[0], seed, sc, out=fresh(pt[0], sh), backend="triton") for seed, sc, sh in calls]
    for (seed, sc, sh), outs in zip(calls, got):
        want = mk.perturbed_copy(pr[0], seed, sc, out=fresh(pr[0], 0), backend="reference")
        for a, b, e in zip(want, outs, pr[0].entries):
            assert_same(a, b, f"copy seed {seed:#x} shift {sh} {e.name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouping_and_block_independence(dtype, monkeypatch, _big_block):
    g = gen(99 + DTYPES.index(dtype))
    specs = mixed_specs(dtype, g)
    pr, _ = plans(specs)
    mk.perturb_(pr[0], 5, 0.01, backend="reference")
    mk.update_(pr[0], [6, 7], [0.5, -0.25], lr=0.1, restore_seed=5, prior=0.01, sr_seed=8, backend="reference")
    for block, group in ((128, True), (2048, False), (512, False)):
        monkeypatch.setattr(_big_block, "BLOCK", block)
        _, pt = plans(specs, group=group)
        for p in pt:
            mk.perturb_(p, 5, 0.01, backend="triton")
            mk.update_(p, [6, 7], [0.5, -0.25], lr=0.1, restore_seed=5, prior=0.01, sr_seed=8, backend="triton")
        for ea in pr[0].entries:
            eb = [e for p in pt for e in p.entries if e.name == ea.name][0]
            assert_same(ea.tensor, eb.tensor, f"block={block} group={group} {ea.name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_modes_near_tau(dtype):
    g = gen(5)
    w = weights((600,), dtype, g)
    vals = w.float().abs().unique()
    tau = float(vals[len(vals) // 2])
    w.reshape(-1)[:4] = torch.tensor([tau, -tau, tau * (1 - 2 ** -12), -tau * (1 + 2 ** -12)]).to(dtype)
    specs = [dict(name="t", tensor=w, tid=3, mask=("thr", tau), offset=7, full=1000)]
    pr, pt = plans(specs)
    for backend, ps in (("reference", pr), ("triton", pt)):
        mk.update_(ps[0], [1], [2.0], lr=0.5, backend=backend)              # THRESH_EVAL
    compare_plans(pr, pt, "eval")
    for backend, ps in (("reference", pr), ("triton", pt)):
        mk.perturb_(ps[0], 9, 0.5, backend=backend)                        # latch write
    compare_plans(pr, pt, "latch write")
    assert int(bits(pt[0].groups[0].masks[0]).to(torch.int64).sum()) > 0
    for backend, ps in (("reference", pr), ("triton", pt)):
        mk.perturb_(ps[0], 9, -0.5, prior=0.5, backend=backend)            # latch read
    compare_plans(pr, pt, "latch read")


def test_special_values_rounding():
    """inf/NaN/subnormal/overflow through every rounding path; fp16 tiny stochastic path."""
    g = gen(3)
    for dtype in DTYPES:
        x = weights((300,), dtype, g, scale=1e-3)
        f = x.reshape(-1)
        f[:8] = torch.tensor([float("inf"), -float("inf"), 65504.0, -65504.0, 3e38, 1e-7, -2e-8, 6e-8]).to(dtype)
        if dtype == torch.float16:
            f[8:200] = (torch.rand(192, generator=g) * 2 ** -23).to(dtype)   # around the fp16 subnormal grid
        specs = [dict(name="s", tensor=x, tid=4)]
        pr, pt = plans(specs)
        for backend, ps in (("reference", pr), ("triton", pt)):
            mk.update_(ps[0], [1, 2], [1e-3, 7e-4], lr=1e-3, rounding="stochastic", sr_seed=3, backend=backend)
        compare_plans(pr, pt, f"special SR {dtype}")
        for backend, ps in (("reference", pr), ("triton", pt)):
            mk.perturb_(ps[0], 4, 1e-4, backend=backend)
        compare_plans(pr, pt, f"special RNE {dtype}")


def test_direct_kernel_outs_and_multi_seed():
    """zo_apply_ called directly: explicit outs for COPY with a row-index mask, prior ignored by COPY."""
    from mazo_kernels import triton_kernels as tk
    g = gen(11)
    w = weights((9, 33), torch.bfloat16, g)
    cols = rowidx(9, 33, 33, g)  # full rows
    meta = torch.tensor([[5, 2 ** 33 + 3, ref.MASK_ROWIDX, 33]], dtype=torch.int64)
    fv = torch.tensor([[1.25, 1.0, 0.0, 1.0, 0.0]], dtype=torch.float32)
    seeds = [-1, 2, 3]
    gs = torch.tensor([0.5, -0.5], dtype=torch.float32)
    o_ref = torch.full_like(w, float("nan"))
    o_tri = torch.full_like(w, float("nan")).to(DEV)
    ref.zo_apply_([w], [o_ref], [cols], meta, fv, [s & (2 ** 64 - 1) for s in seeds], gs, ref.OP_COPY, 0, 0, 0, 0,
                  0.1, 0.0, 0.0)
    tk.zo_apply_([w.to(DEV)], [o_tri], [cols.to(DEV)], meta.to(DEV), fv.to(DEV), seeds, gs.to(DEV), ref.OP_COPY, 0,
                 0, 0, 0, 0.1, 0.0, 0.0)
    assert_same(o_ref, o_tri, "copy rows")


# ------------------------------------------------------------------------------------------------ fast path
def fast_specs(dtype, g):
    """Dense aligned tensors (the [BLOCK // 8, 8] fast path at small BLOCK) beside unaligned, partial and masked ones
    in one call: offsets multiple of 8 and of 128, an odd offset, a tail block, a misaligned data pointer."""
    buf = weights((300,), dtype, g)
    specs = [dict(name="a0", tensor=weights((512,), dtype, g), tid=21, offset=0, full=4096),
             dict(name="a8", tensor=weights((256 + 100,), dtype, g), tid=22, offset=8, full=2 ** 33,
                  sm=1.5, lm=0.5, wd=0.01, gm=-2.0),
             dict(name="a128", tensor=weights((8, 40), dtype, g, special=True), tid=23, offset=2 ** 32 - 128,
                  full=2 ** 33),
             dict(name="odd", tensor=weights((300,), dtype, g), tid=24, offset=3, full=303),
             dict(name="misaligned", tensor=buf[1:1 + 256], tid=25, offset=0, full=256),
             dict(name="bits", tensor=weights((256,), dtype, g), tid=26,
                  mask=("bits", torch.rand(256, generator=g) < 0.5)),
             dict(name="thr", tensor=weights((256,), dtype, g), tid=27, mask=("thr", 0.04), offset=1024, full=4096),
             dict(name="rows", tensor=weights((4, 64), dtype, g), tid=28, mask=("rows", rowidx(4, 64, 9, g)),
                  offset=2 ** 20, full=2 ** 21)]
    return specs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "gaussian_fast"])
def test_fast_path_mixed_call(dtype, dist, monkeypatch, _big_block):
    """A ZO step whose update reuses the restore seed (seeds[1] == seeds[0]), then multi-seed updates with a
    repeated seed and a copy, all with dense aligned blocks beside masked and unaligned tensors in one call."""
    monkeypatch.setattr(_big_block, "BLOCK", 128)
    monkeypatch.setattr(_big_block, "FAST_BLOCK", 128 if dist == "gaussian" else 256)
    g = gen(3 * DTYPES.index(dtype) + ["gaussian", "rademacher", "gaussian_fast"].index(dist) * 101)
    specs = fast_specs(dtype, g)
    pr, pt = plans(specs)
    eps, seed = 1e-3, 0x0123456789ABCDEF
    for backend, ps in (("reference", pr), ("triton", pt)):
        mk.perturb_(ps[0], seed, eps, dist=dist, backend=backend)
    compare_plans(pr, pt, "perturb +eps")
    for backend, ps in (("reference", pr), ("triton", pt)):
        mk.perturb_(ps[0], seed, -eps, prior=eps, dist=dist, backend=backend)
    compare_plans(pr, pt, "perturb -eps prior")
    for rounding in ("stochastic", "nearest"):
        for backend, ps in (("reference", pr), ("triton", pt)):
            gs = torch.tensor([-3e2], dtype=torch.float32, device=ps[0].device)
            mk.update_(ps[0], [seed], gs, lr=1e-2, restore_seed=seed, prior=-eps, rounding=rounding,
                       sr_seed=99, dist=dist, backend=backend)
        compare_plans(pr, pt, f"update reusing z0 {rounding}")
    for seeds in ([seed, 5, seed, 7, 8], [seed, 5], [4, seed]):   # dynamic loop; reuse + static; no reuse
        for backend, ps in (("reference", pr), ("triton", pt)):
            gs = torch.tensor([0.5, -2e2, 3.0, 1.0, -1.0][:len(seeds)], dtype=torch.float32, device=ps[0].device)
            mk.update_(ps[0], seeds, gs, lr=1e-2, restore_seed=seed, prior=eps, sr_seed=3, dist=dist,
                       backend=backend)
        compare_plans(pr, pt, f"update seeds={seeds}")
    compare_copies(pr, pt, seed, dist, "copy")


def test_fast_path_off_matches(monkeypatch, _big_block):
    """The fast path and the general path give the same bits on the same dense aligned blocks."""
    monkeypatch.setattr(_big_block, "BLOCK", 128)
    monkeypatch.setattr(_big_block, "FAST_BLOCK", 256)
    g = gen(17)
    specs = fast_specs(torch.bfloat16, g)[:3]
    res = []
    for fast in (True, False):
        monkeypatch.setattr(_big_block, "FAST", fast)
        _, pt = plans(specs)
        mk.perturb_(pt[0], 1, 1e-2, backend="triton")
        mk.update_(pt[0], [1, 2], [1.0, -2.0], lr=1e-2, restore_seed=1, prior=1e-2, sr_seed=5, backend="triton")
        res.append([e.tensor.clone() for e in pt[0].entries])
    for a, b in zip(*res):
        assert_same(a, b, "fast vs general")


def step_fast_on_and_off(tk, monkeypatch, specs, dist, seed, eps, upd_seed, sr_seed, seed0, rounding0):
    """A ZO step (perturb +eps; perturb -eps with the prior; restore + update with SR; update with prior 0 and
    rounding0) and a copy, reference against triton, with MASKED_FAST on and off. Returns {on: (tensors, masks)}
    after the step, for comparing the fast path with the general path."""
    results = {}
    for on in (True, False):
        monkeypatch.setattr(tk, "MASKED_FAST", on)
        pr, pt = plans(specs)
        steps = [("perturb +eps", lambda ps, b: mk.perturb_(ps[0], seed, eps, dist=dist, backend=b)),
                 ("perturb -eps", lambda ps, b: mk.perturb_(ps[0], seed, -eps, prior=eps, dist=dist, backend=b)),
                 ("update", lambda ps, b: mk.update_(ps[0], [seed, upd_seed], torch.tensor([-3e2, 5.0],
                                                     device=ps[0].device), lr=1e-2, restore_seed=seed,
                                                     prior=-eps, sr_seed=sr_seed, dist=dist, backend=b)),
                 ("update, prior 0", lambda ps, b: mk.update_(ps[0], [seed0], torch.tensor([40.0],
                                                              device=ps[0].device), lr=1e-2, dist=dist,
                                                              rounding=rounding0, backend=b))]
        for what, fn in steps:
            for backend, ps in (("reference", pr), ("triton", pt)):
                fn(ps, backend)
            compare_plans(pr, pt, f"{what} (MASKED_FAST={on})")
        compare_copies(pr, pt, seed, dist, f"copy (MASKED_FAST={on})")
        results[on] = ([e.tensor.clone() for e in pt[0].entries], [m.clone() for m in pt[0].groups[0].masks])
    return results


@pytest.mark.parametrize("dist,split,rad8,dtype,row_thread", [
    ("gaussian", True, False, torch.bfloat16, 1), ("rademacher", True, False, torch.bfloat16, 1),
    ("rademacher", True, True, torch.bfloat16, 1), ("gaussian", False, False, torch.bfloat16, 1),
    ("gaussian_fast", True, False, torch.bfloat16, 1),
    ("gaussian", True, False, torch.float32, 1), ("rademacher", True, False, torch.float32, 1),
    ("gaussian_fast", True, False, torch.float32, 1), ("gaussian_fast", True, False, torch.float32, 0),
    ("rademacher", True, False, torch.float32, "auto"),
    ("rademacher", True, False, torch.float32, "auto-untuned"),   # the latch written in [2, R, 4], read in [R, 8]
    ("gaussian", True, False, torch.bfloat16, "maxnreg80")],
    ids=lambda v: str(v).replace("torch.", ""))
def test_masked_fast_path_matches_general_and_reference(dist, split, rad8, dtype, row_thread, monkeypatch,
                                                        _big_block):
    """Threshold (latch) and packed-bit masks take the fast path (MASKED_FAST): the host gives their full blocks to
    the fast kernel, and a whole ZO step (latch written, then read; restore; update with SR; a masked copy) gives
    the reference's bits and the general path's (MASKED_FAST off), latches included. A tensor whose size is not a
    multiple of the block also runs its tail through the general kernel, writing the rest of the same latch.
    rad8: Rademacher signs made in the rows' layout (RAD_ROWS8, _rad8) rather than exchanged into it. float32:
    the [2, R, 4] tile (FP32_ROW_THREAD 1, signs always by _rad8), the [R, 8] one (0), and both in one step
    ("auto-untuned", FP32_MASKED_TUNED off: Rademacher perturb_ with prior 0 in the first, the restoring passes in
    the second). "maxnreg80": MASKED_LIGHT_MAXNREG (a compile option; the interpreter ignores it)."""
    tk = _big_block
    monkeypatch.setattr(tk, "RAD_ROWS8", rad8)
    if row_thread == "auto-untuned":
        monkeypatch.setattr(tk, "FP32_MASKED_TUNED", False)
        row_thread = "auto"
    if row_thread == "maxnreg80":
        monkeypatch.setattr(tk, "MASKED_LIGHT_MAXNREG", 80)
        row_thread = "auto"
    monkeypatch.setattr(tk, "FP32_ROW_THREAD", row_thread)
    monkeypatch.setattr(tk, "BLOCK", 128)
    monkeypatch.setattr(tk, "FAST_BLOCK", 256)
    monkeypatch.setattr(tk, "SPLIT", split)   # False: the older two-launch layout (fast kernel, then general)
    g = gen(29 + (dist == "rademacher"))
    specs = [dict(name="bits", tensor=weights((512,), dtype, g), tid=31,
                  mask=("bits", torch.rand(512, generator=g) < 0.4), offset=256, full=4096),
             dict(name="thr", tensor=weights((768 + 40,), dtype, g), tid=32, mask=("thr", 0.04),
                  sm=0.5, lm=2.0, wd=0.1),
             dict(name="dense", tensor=weights((256,), dtype, g), tid=33),
             dict(name="thr_odd", tensor=weights((512,), dtype, g), tid=34, mask=("thr", 0.03), offset=3,
                  full=515)]   # an unaligned offset: its fast blocks fall back to the general path on the device
    # the host's split: with MASKED_FAST the masked tensors' full blocks are fast programs (2 + 3 + 1 + 2 blocks)
    _, pt = plans(specs)
    grp = pt[0].groups[0]
    for on, want in ((True, 8), (False, 1)):
        monkeypatch.setattr(tk, "MASKED_FAST", on)
        nf = tk._split_tables(grp.tensors, grp.tensors, grp.masks, 128, 256, 1, 16,
                              grp.tensors[0].device)[2]
        assert nf == want, (on, nf)
    res = step_fast_on_and_off(tk, monkeypatch, specs, dist, 0xFEDCBA9876543210, 1e-3, upd_seed=77, sr_seed=99,
                               seed0=5, rounding0="nearest")
    for a, b in zip(res[True][0] + res[True][1], res[False][0] + res[False][1]):
        assert_same(a, b, "masked fast path vs general path")


@pytest.mark.parametrize("dist,rad8,dtype", [("gaussian_fast", False, torch.bfloat16),
                                             ("rademacher", False, torch.bfloat16),
                                             ("rademacher", True, torch.bfloat16),
                                             ("gaussian", False, torch.float32)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_rowindex_element_units_fast_and_general(dist, rad8, dtype, monkeypatch, _big_block):
    """Row-index masks with k * 8 >= row_len (rows a multiple of 8 long) run as element units: full blocks in the
    fast kernel (MASKED_FAST), tails and unaligned offsets in the general kernel, both finding each unit's selection
    by a binary search of its row's columns (_rowidx_bytes). Sparser masks and rows not a multiple of 8 keep entry
    units. A whole step and a copy against the reference, with the fast path on and off (rad8: RAD_ROWS8; float32
    in the [2, R, 4] tile)."""
    tk = _big_block
    monkeypatch.setattr(tk, "RAD_ROWS8", rad8)
    monkeypatch.setattr(tk, "BLOCK", 128)
    monkeypatch.setattr(tk, "FAST_BLOCK", 256)
    monkeypatch.setattr(tk, "ROWIDX_ELEMENTS", True)   # every op (the default "auto" picks per op, dtype, noise)
    monkeypatch.setattr(tk, "ROWIDX_SCATTER", False)   # the fast kernel's search form (the scatter form: below)
    g = gen(41 + (dist == "rademacher"))
    specs = [dict(name="r64", tensor=weights((8, 64), dtype, g), tid=51, mask=("rows", rowidx(8, 64, 32, g)),
                  offset=1024, full=4096),
             dict(name="r48", tensor=weights((6, 48), dtype, g), tid=52, mask=("rows", rowidx(6, 48, 6, g)),
                  sm=0.5, lm=2.0, wd=0.1),
             dict(name="r40_sparse", tensor=weights((5, 40), dtype, g), tid=53,
                  mask=("rows", rowidx(5, 40, 3, g))),
             dict(name="r36", tensor=weights((9, 36), dtype, g), tid=54, mask=("rows", rowidx(9, 36, 20, g))),
             dict(name="r64_odd", tensor=weights((4, 64), dtype, g), tid=55,
                  mask=("rows", rowidx(4, 64, 40, g)), offset=5, full=300),
             dict(name="dense", tensor=weights((256,), dtype, g), tid=56)]
    _, pt = plans(specs)
    grp = pt[0].groups[0]
    modes = [bool(tk._table_row(t, t, m)[6]) for t, m in zip(grp.tensors, grp.masks)]
    assert modes == [False, False, True, True, False, False], modes   # entry units only where sparse or rows % 8
    monkeypatch.setattr(tk, "MASKED_FAST", True)
    nf = tk._split_tables(grp.tensors, grp.tensors, grp.masks, 128, 256, 1, 16, grp.tensors[0].device)[2]
    assert nf == 2 + 1 + 1 + 1, nf   # r64, r48, r64_odd (found unaligned on the device), dense
    res = step_fast_on_and_off(tk, monkeypatch, specs, dist, 0x0123456789ABCDEF, 1e-3, upd_seed=78, sr_seed=98,
                               seed0=6, rounding0="stochastic")
    for a, b in zip(res[True][0], res[False][0]):
        assert_same(a, b, "row-index fast path vs general path")


@pytest.mark.parametrize("dist,dtype,probes", [("gaussian", torch.bfloat16, 8), ("rademacher", torch.float16, 128),
                                               ("gaussian_fast", torch.float32, 0), ("gaussian", torch.float32, 8),
                                               ("rademacher", torch.float32, 128)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_rowindex_scatter_matches_reference(dist, dtype, probes, monkeypatch, _big_block):
    """ROWIDX_SCATTER: the fast kernel's row-index blocks compute every element and store the listed ones through a
    window of the table (_rowidx_scatter), one search per block. Blocks of several rows (r64, r520 at exactly 1/8),
    blocks that start inside a row longer than the block (r600, r1000: the search within its bounds, and a window
    that ends in the next row), a near-full row, rows of 16 (r16: the rows found by a division) and an unaligned
    tensor (the general path), through a whole step
    and a copy against the reference, with the fast path on and off. The block's first entry by the P-ary search
    (ROWIDX_PROBES 8: r600's blocks inside a row take two rounds of probes before the last load; 128, the default:
    one) and by the binary search (0)."""
    tk = _big_block
    monkeypatch.setattr(tk, "ROWIDX_PROBES", probes)
    monkeypatch.setattr(tk, "BLOCK", 128)
    monkeypatch.setattr(tk, "FAST_BLOCK", 256)
    monkeypatch.setattr(tk, "ROWIDX_ELEMENTS", True)
    monkeypatch.setattr(tk, "ROWIDX_SCATTER", True)
    g = gen(61 + (dist == "rademacher"))
    specs = [dict(name="r64", tensor=weights((8, 64), dtype, g), tid=71, mask=("rows", rowidx(8, 64, 32, g)),
                  offset=1024, full=4096),
             dict(name="r600", tensor=weights((3, 600), dtype, g), tid=72, mask=("rows", rowidx(3, 600, 300, g)),
                  sm=0.5, lm=2.0, wd=0.1),
             dict(name="r1000", tensor=weights((2, 1000), dtype, g), tid=73, mask=("rows", rowidx(2, 1000, 990, g))),
             dict(name="r520", tensor=weights((4, 520), dtype, g), tid=74, mask=("rows", rowidx(4, 520, 65, g))),
             dict(name="r64_odd", tensor=weights((4, 64), dtype, g), tid=75,
                  mask=("rows", rowidx(4, 64, 40, g)), offset=5, full=300),
             dict(name="r16", tensor=weights((40, 16), dtype, g), tid=76, mask=("rows", rowidx(40, 16, 9, g)))]
    _, pt = plans(specs)
    grp = pt[0].groups[0]
    assert all(tk._rowidx_elements(t, m) for t, m in zip(grp.tensors, grp.masks))
    monkeypatch.setattr(tk, "MASKED_FAST", True)
    nf = tk._split_tables(grp.tensors, grp.tensors, grp.masks, 128, 256, 1, 16, grp.tensors[0].device)[2]
    assert nf == 2 + 7 + 7 + 8 + 1 + 2, nf
    res = step_fast_on_and_off(tk, monkeypatch, specs, dist, 0x0FEDCBA987654321, 1e-3, upd_seed=79, sr_seed=99,
                               seed0=7, rounding0="stochastic")
    for a, b in zip(res[True][0], res[False][0]):
        assert_same(a, b, "row-index scatter vs general path")


def test_rowindex_element_policy(_big_block, monkeypatch):
    """ROWIDX_ELEMENTS "auto": row-index element units for the transient mode's passes in every dtype (but fp32
    perturbed_copy with v1 Gaussian noise), for the other 16-bit passes except perturb_ with prior 0 and Rademacher
    noise, and for no other fp32 pass (the measured outcome, see _rowidx_element_policy); True / False force
    either. With the scatter form (ROWIDX_SCATTER, the default): element units for every pass."""
    tk = _big_block
    pol = tk._rowidx_element_policy
    monkeypatch.setattr(tk, "ROWIDX_SCATTER", False)   # the search form's policy (the scatter form's: below)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert pol(ref.OP_COPY, ref.DIST_RADEMACHER, dt, 0.0)
        assert pol(ref.OP_UPDATE, ref.DIST_GAUSSIAN_FAST, dt, 0.0)
        assert not pol(ref.OP_PERTURB, ref.DIST_RADEMACHER, dt, 0.0)
        assert pol(ref.OP_PERTURB, ref.DIST_GAUSSIAN_FAST, dt, 0.0) == (dt != torch.float32)
        assert pol(ref.OP_UPDATE, ref.DIST_RADEMACHER, dt, 1e-3) == (dt != torch.float32)
        assert pol(ref.OP_PERTURB, ref.DIST_RADEMACHER, dt, 1e-3) == (dt != torch.float32)
        assert pol(ref.OP_COPY, ref.DIST_GAUSSIAN, dt, 0.0) == (dt != torch.float32)   # fp32 v1 copy: entries
        assert pol(ref.OP_COPY, ref.DIST_GAUSSIAN_FAST, dt, 0.0)
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    m = torch.arange(32, dtype=torch.int32).repeat(4, 1)
    assert tk._table_row(w, w, m, True)[6] == 0 and tk._table_row(w, w, m, False)[6] == 1
    try:
        for forced in (True, False):
            tk.ROWIDX_ELEMENTS = forced
            assert pol(ref.OP_PERTURB, ref.DIST_RADEMACHER, torch.float32, 0.0) is forced
        tk.ROWIDX_ELEMENTS = "auto"
        tk.ROWIDX_SCATTER = True
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            for op, prior in ((ref.OP_PERTURB, 0.0), (ref.OP_PERTURB, 1e-3), (ref.OP_UPDATE, 1e-3),
                              (ref.OP_UPDATE, 0.0), (ref.OP_COPY, 0.0)):
                for dist in (ref.DIST_GAUSSIAN, ref.DIST_GAUSSIAN_FAST, ref.DIST_RADEMACHER):
                    assert pol(op, dist, dt, prior), (op, dist, dt, prior)
    finally:
        tk.ROWIDX_ELEMENTS = "auto"


try:   # a kernel of the module's rounding forms alone (compiled on a GPU, interpreted on the CPU)
    import triton
    import triton.language as tl
    from mazo_kernels import triton_kernels as _tk

    @triton.jit
    def _rounding_kernel(x_ptr, rb_ptr, out_ptr, N: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
        offs = tl.program_id(0) * N + tl.arange(0, N)
        x = tl.load(x_ptr + offs)
        rb = tl.load(rb_ptr + offs).to(tl.uint32)
        if ASM:
            res = _tk._sr_bf16_asm(x, rb)
        else:
            res = _tk._sr(x, rb, DT)
        tl.store(out_ptr + offs, res.to(tl.int16, bitcast=True))

    @triton.jit
    def _restore_kernel(raw_ptr, d_ptr, out_ptr, N: tl.constexpr, DT: tl.constexpr, SMALL: tl.constexpr,
                        ASM: tl.constexpr):
        offs = tl.program_id(0) * N + tl.arange(0, N)
        raw = tl.load(raw_ptr + offs)
        if DT == 1:
            raw = raw.to(tl.float16, bitcast=True)
        else:
            raw = raw.to(tl.uint16, bitcast=True)
        x = _tk._to_f32(raw, DT)
        d = tl.load(d_ptr + offs)
        if ASM:
            base = _tk._invert_rounding_bf16_asm(raw, x, d, SMALL)
        else:
            base = _tk._invert_rounding(x, d, DT, SMALL)
        tl.store(out_ptr + offs, base.to(tl.int32, bitcast=True))
except ImportError:
    _rounding_kernel = _restore_kernel = None


@pytest.mark.parametrize("form", ["fp16", "bf16", "bf16-ptx"])
def test_stochastic_rounding_forms_match_reference_on_every_exponent(form):
    """The kernels' stochastic roundings (_sr; on a GPU also the bf16 PTX form) against reference.sr_fp16_value /
    sr_bf16_bits on every float32 exponent (both signs, random significands, the extreme significands), with
    random rounding bits and their extremes 0 and 0xFFFF: every result bit, NaN positions for fp16 (whose NaN bits
    the spec does not fix). Poisoned output."""
    if form == "bf16-ptx" and not CUDA:
        pytest.skip("PTX runs on a GPU only")
    g = gen(11)
    n = 1 << 15
    ex = torch.arange(256, dtype=torch.int32).repeat_interleave(n // 256)
    man = torch.randint(0, 1 << 23, (n,), generator=g, dtype=torch.int32)
    man[0::64], man[1::64], man[2::64] = 0, (1 << 23) - 1, 1    # zero / largest / smallest significands
    sign = (torch.randint(0, 2, (n,), generator=g, dtype=torch.int32) << 31)
    x = ((ex << 23) | man | sign).view(torch.float32)
    rb = torch.randint(0, 1 << 16, (n,), generator=g, dtype=torch.int32)
    rb[3::64], rb[4::64] = 0, 0xFFFF
    out = torch.full((n,), 0x5A5A, dtype=torch.int16, device=DEV)
    dt = 1 if form == "fp16" else 2
    _rounding_kernel[(n // 1024,)](x.to(DEV), rb.to(DEV), out, N=1024, DT=dt, ASM=form == "bf16-ptx")
    got = out.cpu()
    rb64 = rb.to(torch.int64)
    if dt == 1:
        want = ref.sr_fp16_value(x, rb64).to(torch.float16)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got.view(torch.float16)), nan)
        assert torch.equal(got[~nan], want.view(torch.int16)[~nan])
    else:
        want = ref.sr_bf16_bits(x, rb64).to(torch.int32).to(torch.int16)
        assert torch.equal(got, want)


@pytest.mark.parametrize("small", [False, True], ids=["any-shift", "small-shift"])
@pytest.mark.parametrize("form", ["fp16", "bf16", "bf16-ptx"])
def test_restore_forms_match_reference_on_every_stored_value(form, small):
    """The kernels' restore (_invert_rounding; on a GPU also the bf16 PTX form, and the hardware-rounding bf16
    form) against reference.invert_rounding for every 16-bit stored pattern (infinities and NaNs included), each
    with shifts from 1e-30 to past the small-shift bounds (small: only below them, the host's promise for SMALL):
    every bit of the base, NaN positions (a NaN base's bits are not the spec's: every caller rounds it again).
    Poisoned output."""
    if form == "bf16-ptx" and not CUDA:
        pytest.skip("PTX runs on a GPU only")
    dtype = torch.float16 if form == "fp16" else torch.bfloat16
    g = gen(12 + small)
    raw = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    n = raw.numel()
    w = raw.view(dtype).float()
    z = torch.randn(n, generator=g).clamp(-5.27, 5.27)
    if small:   # |p| below the bound: 2^100 (bf16), 1 (fp16)
        ps = [1e-30, 1e-3, 0.25, 0.999] + ([7.0, 2.0 ** 60, 2.0 ** 99] if dtype == torch.bfloat16 else [])
    else:
        ps = [1e-3, 0.7, 3.0, 300.0, 1e5, 2.0 ** 101, 2.0 ** 120, 1e38]
    p = torch.tensor(ps)[torch.randint(0, len(ps), (n,), generator=g)]
    d = (p * z).float()
    out = torch.full((n,), 0x5A5A5A5A, dtype=torch.int32, device=DEV)
    _restore_kernel[(n // 1024,)](raw.to(DEV), d.to(DEV), out, N=1024, DT=1 if dtype == torch.float16 else 2,
                                  SMALL=small, ASM=form == "bf16-ptx")
    got = out.cpu().view(torch.float32)
    want = ref.invert_rounding(w, d, dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def test_small_shift_choice_follows_the_plan_table():
    """The host's SMALL constexpr (the restore without its finite test): true only where |fl32(prior) * scale_mult|
    is below the bound for every tensor (fp16: 1; bf16: 2^100 on the hardware-conversion path only), never for prior
    0 or fp32, and read again after the table changes in place."""
    from mazo_kernels import triton_kernels as tk
    fv = torch.tensor([[0.5, 1.0, 0.0, 1.0, 0.0], [2.0, 1.0, 0.0, 1.0, 0.0]], dtype=torch.float32)
    assert tk._small_shift(1, 0.49, fv)              # 0.98 < 1
    assert not tk._small_shift(1, 0.5, fv)           # 2.0 * 0.5 = 1.0: not below
    assert not tk._small_shift(1, -0.6, fv)
    assert not tk._small_shift(1, 0.0, fv)
    assert not tk._small_shift(0, 1e-3, fv)          # fp32 keeps its test
    assert tk._small_shift(2, 1e-3, fv) == bool(tk.HW_BF16)
    fv[1, 0] = -0.25                                 # in place: the cached maximum must not be reused
    assert tk._small_shift(1, 0.9, fv)               # max |scale_mult| now 0.5
    fv[0, 0] = float("nan")                          # a NaN multiplier never counts as small
    assert not tk._small_shift(1, 1e-3, fv)


def test_rad8_choice_follows_the_measured_policy(monkeypatch):
    """RAD_ROWS8 "auto" (the default): Rademacher signs in the rows' layout only for masked perturb_ with prior 0 and
    for update_ with a prior on calls with row-index element units (bench/NOTES.md, session 19; not float32 ones in
    the scatter form, session 25); never unmasked or for other noise; True / False force it on every masked
    Rademacher call / off."""
    from mazo_kernels import triton_kernels as tk
    R, G = ref.DIST_RADEMACHER, ref.DIST_GAUSSIAN_FAST
    monkeypatch.setattr(tk, "RAD_ROWS8", "auto")
    assert tk._rad8_choice(True, R, ref.OP_PERTURB, 0.0, False)
    assert not tk._rad8_choice(True, R, ref.OP_PERTURB, 1e-3, False)      # the restoring pass: slower with it
    assert not tk._rad8_choice(True, R, ref.OP_UPDATE, -1e-3, False)      # threshold / packed bits: no gain
    assert tk._rad8_choice(True, R, ref.OP_UPDATE, -1e-3, True)           # row-index element units
    assert not tk._rad8_choice(True, R, ref.OP_UPDATE, 0.0, True)         # update with prior 0: unmeasured
    assert not tk._rad8_choice(False, R, ref.OP_PERTURB, 0.0, False)
    assert not tk._rad8_choice(True, G, ref.OP_PERTURB, 0.0, False)
    monkeypatch.setattr(tk, "FP32_MASKED_TUNED", "auto")   # float32's light pass exchanges its signs instead
    assert not tk._rad8_choice(True, R, ref.OP_PERTURB, 0.0, False, torch.float32)
    monkeypatch.setattr(tk, "ROWIDX_SCATTER", True)   # float32 row-index update_ in the scatter form: [R, 8] signs
    assert not tk._rad8_choice(True, R, ref.OP_UPDATE, -1e-3, True, torch.float32)
    assert tk._rad8_choice(True, R, ref.OP_UPDATE, -1e-3, True, torch.bfloat16)
    monkeypatch.setattr(tk, "ROWIDX_SCATTER", False)
    assert tk._rad8_choice(True, R, ref.OP_UPDATE, -1e-3, True, torch.float32)
    monkeypatch.setattr(tk, "FP32_MASKED_TUNED", False)
    assert tk._rad8_choice(True, R, ref.OP_PERTURB, 0.0, False, torch.float32)
    monkeypatch.setattr(tk, "RAD_ROWS8", True)
    assert tk._rad8_choice(True, R, ref.OP_PERTURB, 1e-3, False)
    assert not tk._rad8_choice(False, R, ref.OP_PERTURB, 0.0, False)
    monkeypatch.setattr(tk, "RAD_ROWS8", False)
    assert not tk._rad8_choice(True, R, ref.OP_PERTURB, 0.0, False)


def test_light_maxnreg_follows_the_measured_policy(monkeypatch):
    """MASKED_LIGHT_MAXNREG "auto" (the default): a register cap for the masked perturb_ with prior 0 where it was
    measured faster (bench/NOTES.md, session 22): v1 Gaussian 80 in 16-bit (row-index element units too) and 96 in
    float32; float32 gaussian_fast 80 and Rademacher 96 (at FP32_MASKED_TUNED's warps); none for 16-bit
    gaussian_fast / Rademacher, float32 row-index, the restoring and update passes or unmasked calls; an integer
    caps every masked light pass (0: none)."""
    from mazo_kernels import triton_kernels as tk
    V1, G, R = ref.DIST_GAUSSIAN, ref.DIST_GAUSSIAN_FAST, ref.DIST_RADEMACHER
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    P = ref.OP_PERTURB
    monkeypatch.setattr(tk, "MASKED_LIGHT_MAXNREG", "auto")
    monkeypatch.setattr(tk, "FP32_MASKED_TUNED", "auto")
    for half in (bf16, f16):
        assert tk._light_maxnreg(True, half, V1, P, 0.0, False) == 80
        assert tk._light_maxnreg(True, half, V1, P, 0.0, True) == 80
        assert tk._light_maxnreg(True, half, G, P, 0.0, False) == 0
        assert tk._light_maxnreg(True, half, R, P, 0.0, False) == 0
    assert tk._light_maxnreg(True, f32, V1, P, 0.0, False) == 96
    assert tk._light_maxnreg(True, f32, G, P, 0.0, False) == 80
    assert tk._light_maxnreg(True, f32, R, P, 0.0, False) == 96
    for dist in (V1, G, R):
        assert tk._light_maxnreg(True, f32, dist, P, 0.0, True) == 0      # float32 row-index: no effect measured
        assert tk._light_maxnreg(True, bf16, dist, P, 1e-3, False) == 0   # the restoring pass
        assert tk._light_maxnreg(False, f32, dist, P, 0.0, False) == 0
        for op in (ref.OP_UPDATE, ref.OP_COPY, ref.OP_UPDATE_PERTURB):
            assert tk._light_maxnreg(True, f32, dist, op, 0.0, False) == 0
    monkeypatch.setattr(tk, "FP32_MASKED_TUNED", False)                   # other warps: unmeasured
    assert tk._light_maxnreg(True, f32, V1, P, 0.0, False) == 0
    assert tk._light_maxnreg(True, bf16, V1, P, 0.0, False) == 80
    monkeypatch.setattr(tk, "MASKED_LIGHT_MAXNREG", 72)
    assert tk._light_maxnreg(True, bf16, R, P, 0.0, True) == 72
    assert tk._light_maxnreg(True, bf16, R, P, 1e-3, True) == 0
    monkeypatch.setattr(tk, "MASKED_LIGHT_MAXNREG", 0)
    assert tk._light_maxnreg(True, bf16, V1, P, 0.0, False) == 0


def test_fast_maxnreg_precedence(monkeypatch):
    """The fast kernel's cap: MASKED_LIGHT_MAXNREG's where it gives one, else MASKED_COPY_MAXNREG's for a masked
    perturbed_copy, else ROWIDX_MAXNREG's on calls with row-index element units (any pass), else FUSED_MAXNREG for
    op 3 (0 by default)."""
    from mazo_kernels import triton_kernels as tk
    V1, G = ref.DIST_GAUSSIAN, ref.DIST_GAUSSIAN_FAST
    bf16 = torch.bfloat16
    monkeypatch.setattr(tk, "MASKED_LIGHT_MAXNREG", "auto")
    monkeypatch.setattr(tk, "ROWIDX_MAXNREG", 0)
    monkeypatch.setattr(tk, "FUSED_MAXNREG", 0)
    monkeypatch.setattr(tk, "MASKED_COPY_MAXNREG", 0)
    assert tk._fast_maxnreg(True, bf16, V1, ref.OP_PERTURB, 0.0, True) == 80
    for op, prior in ((ref.OP_PERTURB, 1e-3), (ref.OP_UPDATE, -1e-3), (ref.OP_COPY, 0.0),
                      (ref.OP_UPDATE_PERTURB, -1e-3)):
        assert tk._fast_maxnreg(True, bf16, V1, op, prior, True) == 0
    monkeypatch.setattr(tk, "ROWIDX_MAXNREG", 88)
    monkeypatch.setattr(tk, "FUSED_MAXNREG", 72)
    assert tk._fast_maxnreg(True, bf16, V1, ref.OP_PERTURB, 0.0, True) == 80          # the light pass's own cap
    assert tk._fast_maxnreg(True, bf16, G, ref.OP_PERTURB, 0.0, True) == 88
    assert tk._fast_maxnreg(True, bf16, V1, ref.OP_UPDATE, -1e-3, True) == 88
    assert tk._fast_maxnreg(True, bf16, V1, ref.OP_UPDATE_PERTURB, -1e-3, True) == 88
    assert tk._fast_maxnreg(True, bf16, V1, ref.OP_UPDATE_PERTURB, -1e-3, False) == 72  # no row-index units
    assert tk._fast_maxnreg(False, bf16, V1, ref.OP_UPDATE_PERTURB, -1e-3, False) == 72
    assert tk._fast_maxnreg(True, bf16, V1, ref.OP_UPDATE, -1e-3, False) == 0
    assert tk._fast_maxnreg(True, torch.float32, V1, ref.OP_COPY, 0.0, False) == 0
    monkeypatch.setattr(tk, "MASKED_COPY_MAXNREG", 60)
    assert tk._fast_maxnreg(True, torch.float32, V1, ref.OP_COPY, 0.0, False) == 60
    assert tk._fast_maxnreg(True, bf16, V1, ref.OP_COPY, 0.0, True) == 60            # before the row-index cap
    assert tk._fast_maxnreg(False, torch.float32, V1, ref.OP_COPY, 0.0, False) == 0   # unmasked copies: none
    assert tk._fast_maxnreg(True, bf16, V1, ref.OP_PERTURB, 0.0, False) == 80


def test_copy_and_rowidx_maxnreg_follow_the_measured_policy(monkeypatch):
    """MASKED_COPY_MAXNREG and ROWIDX_MAXNREG "auto" (the defaults): the caps measured faster (bench/NOTES.md,
    session 23). Masked float32 perturbed_copy on threshold / packed bits: v1 64, gaussian_fast 80, Rademacher 64 (at
    FP32_MASKED_TUNED's warps), 16-bit and row-index copies none. Row-index element units, 16-bit: update_ with
    prior 0 at 80 for every noise; copies 96 / 96 / 80; perturb_prior gaussian_fast 96, Rademacher 80; update_ v1
    96; bf16 only, update_ gaussian_fast / Rademacher 96; in the scatter form Rademacher perturb_ with prior 0 64
    (session 25); the rest (the fused masked op 3 too) none. Float32
    row-index (session 24, the scatter form): perturb_ 96 / 96 / 80, perturb_prior 96 / 80 / none, update_ 64 / 64 /
    none, copies 64 / 96 / 96, update_ with prior 0 none; none without the scatter form."""
    from mazo_kernels import triton_kernels as tk
    V1, G, R = ref.DIST_GAUSSIAN, ref.DIST_GAUSSIAN_FAST, ref.DIST_RADEMACHER
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    P, U, C, UP = ref.OP_PERTURB, ref.OP_UPDATE, ref.OP_COPY, ref.OP_UPDATE_PERTURB
    for knob in ("MASKED_LIGHT_MAXNREG", "MASKED_COPY_MAXNREG", "ROWIDX_MAXNREG", "FP32_MASKED_TUNED"):
        monkeypatch.setattr(tk, knob, "auto")
    monkeypatch.setattr(tk, "FUSED_MAXNREG", 0)
    cap = tk._fast_maxnreg
    assert [cap(True, f32, d, C, 0.0, False) for d in (V1, G, R)] == [64, 80, 64]
    for d in (V1, G, R):
        assert cap(False, f32, d, C, 0.0, False) == 0                  # unmasked
        assert cap(True, bf16, d, C, 0.0, False) == 0                  # 16-bit threshold / packed bits: unmeasured
        for half in (bf16, f16):
            assert cap(True, half, d, U, 0.0, True) == 80              # update_ with prior 0
            assert cap(True, half, d, U, 0.0, False) == 0              # no row-index units
        assert cap(True, f32, d, U, 0.0, True) == 0                    # float32 row-index update0: unmeasured
        assert cap(True, f32, d, UP, -1e-3, True) == 0
        for op, prior in ((U, 0.0), (U, -1e-3), (P, 1e-3), (P, 0.0), (C, 0.0)):   # the search form: unmeasured
            monkeypatch.setattr(tk, "ROWIDX_SCATTER", False)
            assert cap(True, f32, d, op, prior, True) == 0
            monkeypatch.setattr(tk, "ROWIDX_SCATTER", True)
    assert [cap(True, f32, d, P, 0.0, True) for d in (V1, G, R)] == [96, 96, 80]
    assert [cap(True, f32, d, P, 1e-3, True) for d in (V1, G, R)] == [96, 80, 0]
    assert [cap(True, f32, d, U, -1e-3, True) for d in (V1, G, R)] == [64, 64, 0]
    assert [cap(True, f32, d, C, 0.0, True) for d in (V1, G, R)] == [64, 96, 96]
    for half in (bf16, f16):
        assert [cap(True, half, d, C, 0.0, True) for d in (V1, G, R)] == [96, 96, 80]
        assert [cap(True, half, d, P, 1e-3, True) for d in (V1, G, R)] == [0, 96, 80]
        assert cap(True, half, V1, U, -1e-3, True) == 96
        assert [cap(True, half, d, UP, -1e-3, True) for d in (V1, G, R)] == [0, 0, 0]
        assert cap(True, half, G, P, 0.0, True) == 0                   # the light pass: its own rule
        assert cap(True, half, R, P, 0.0, True) == 64                  # ... Rademacher's: the scatter form's
        monkeypatch.setattr(tk, "ROWIDX_SCATTER", False)
        assert cap(True, half, R, P, 0.0, True) == 0
        monkeypatch.setattr(tk, "ROWIDX_SCATTER", True)
    assert [cap(True, bf16, d, U, -1e-3, True) for d in (G, R)] == [96, 96]
    assert [cap(True, f16, d, U, -1e-3, True) for d in (G, R)] == [0, 0]
    monkeypatch.setattr(tk, "FP32_MASKED_TUNED", False)                 # other warps: unmeasured
    assert cap(True, f32, V1, C, 0.0, False) == 0
    monkeypatch.setattr(tk, "ROWIDX_MAXNREG", 0)
    monkeypatch.setattr(tk, "MASKED_COPY_MAXNREG", 0)
    assert cap(True, bf16, V1, U, 0.0, True) == 0
    assert cap(True, bf16, V1, C, 0.0, True) == 0


@pytest.mark.parametrize("var", ["MAZO_TRITON_MASKED_LIGHT_MAXNREG", "MAZO_TRITON_ROWIDX_MAXNREG",
                                 "MAZO_TRITON_MASKED_COPY_MAXNREG"])
def test_bad_maxnreg_setting_is_refused_at_import(var):
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = dict(os.environ, **{var: "lots"})
    res = subprocess.run([sys.executable, "-c", "import mazo_kernels.triton_kernels"], env=env, capture_output=True,
                         text=True)
    assert res.returncode != 0
    assert f"{var} must be auto or a register count" in res.stderr


@pytest.mark.parametrize("var,bad", [("MAZO_TRITON_RAD_ROWS8", "yes"), ("MAZO_TRITON_FP32_ROW_THREAD", "on"),
                                     ("MAZO_TRITON_FP32_MASKED_TUNED", "2")])
def test_bad_auto_knob_setting_is_refused_at_import(var, bad):
    """MAZO_TRITON_RAD_ROWS8, MAZO_TRITON_FP32_ROW_THREAD and MAZO_TRITON_FP32_MASKED_TUNED take auto, 1 or 0;
    anything else is a clear error when the backend is imported."""
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = dict(os.environ, **{var: bad})
    res = subprocess.run([sys.executable, "-c", "import mazo_kernels.triton_kernels"], env=env, capture_output=True,
                         text=True)
    assert res.returncode != 0
    assert f"{var} must be auto, 1 or 0, got {bad!r}" in res.stderr


def test_row_thread_choice_follows_the_measured_policy(monkeypatch):
    """FP32_ROW_THREAD "auto" (the default): masked float32 calls run the [2, R, 4] tile with Gaussian noise always,
    with Rademacher noise where _rad8 was measured faster (perturb_ with prior 0, op 3, the calls given _rad8;
    bench/NOTES.md, session 20); never unmasked or 16-bit calls; 1 / 0 force it on every masked float32 call / off."""
    from mazo_kernels import triton_kernels as tk
    R, G, V1 = ref.DIST_RADEMACHER, ref.DIST_GAUSSIAN_FAST, ref.DIST_GAUSSIAN
    f32, bf16 = torch.float32, torch.bfloat16
    monkeypatch.setattr(tk, "FP32_ROW_THREAD", "auto")
    monkeypatch.setattr(tk, "FP32_MASKED_TUNED", False)   # session 20's rule first
    for op in (ref.OP_PERTURB, ref.OP_UPDATE, ref.OP_COPY, ref.OP_UPDATE_PERTURB):
        for prior in (0.0, 1e-3):
            assert tk._row_thread_choice(True, f32, G, op, prior, False)
            assert tk._row_thread_choice(True, f32, V1, op, prior, False)
            assert not tk._row_thread_choice(False, f32, G, op, prior, False)
            assert not tk._row_thread_choice(True, bf16, G, op, prior, False)
            assert tk._row_thread_choice(True, f32, R, op, prior, True)          # signs by _rad8 anyway
    assert tk._row_thread_choice(True, f32, R, ref.OP_PERTURB, 0.0, False)
    assert tk._row_thread_choice(True, f32, R, ref.OP_UPDATE_PERTURB, -1e-3, False)
    assert not tk._row_thread_choice(True, f32, R, ref.OP_PERTURB, 1e-3, False)   # restoring: slower with _rad8
    assert not tk._row_thread_choice(True, f32, R, ref.OP_UPDATE, -1e-3, False)
    assert not tk._row_thread_choice(True, f32, R, ref.OP_COPY, 0.0, False)
    monkeypatch.setattr(tk, "FP32_MASKED_TUNED", "auto")   # Rademacher's light pass: the [R, 8] tile's exchange
    assert not tk._row_thread_choice(True, f32, R, ref.OP_PERTURB, 0.0, False)
    assert tk._row_thread_choice(True, f32, R, ref.OP_PERTURB, 0.0, True)     # _rad8 forced: the row tile
    assert tk._row_thread_choice(True, f32, R, ref.OP_UPDATE_PERTURB, -1e-3, False)
    assert tk._row_thread_choice(True, f32, G, ref.OP_PERTURB, 0.0, False)
    monkeypatch.setattr(tk, "FP32_ROW_THREAD", 1)
    assert tk._row_thread_choice(True, f32, R, ref.OP_COPY, 0.0, False)
    assert not tk._row_thread_choice(True, bf16, R, ref.OP_COPY, 0.0, False)
    monkeypatch.setattr(tk, "FP32_ROW_THREAD", 0)
    assert not tk._row_thread_choice(True, f32, G, ref.OP_PERTURB, 0.0, False)


def test_fast_warps_follow_the_measured_policy(monkeypatch):
    """The fast kernel's warps: masked float32 under FP32_MASKED_TUNED 8 for the restoring gaussian_fast perturb_,
    the v1 Gaussian perturbed_copy and Gaussian update_ with a prior, FAST_NUM_WARPS otherwise (bench/NOTES.md,
    session 21); 16-bit calls (and float32 with the knob off) the latch-writing perturb_'s MASKED_NUM_WARPS /
    MASKED_NUM_WARPS_RAD (with _rad8)."""
    from mazo_kernels import triton_kernels as tk
    R, G, V1 = ref.DIST_RADEMACHER, ref.DIST_GAUSSIAN_FAST, ref.DIST_GAUSSIAN
    f32, bf16 = torch.float32, torch.bfloat16
    monkeypatch.setattr(tk, "FAST_NUM_WARPS", 4)
    monkeypatch.setattr(tk, "MASKED_NUM_WARPS", 8)
    monkeypatch.setattr(tk, "MASKED_NUM_WARPS_RAD", 8)
    monkeypatch.setattr(tk, "FP32_MASKED_TUNED", "auto")
    assert tk._fast_warps(True, f32, G, ref.OP_PERTURB, 0.0, False) == 4
    assert tk._fast_warps(True, f32, R, ref.OP_PERTURB, 0.0, True) == 4
    assert tk._fast_warps(True, f32, G, ref.OP_PERTURB, 1e-3, False) == 8
    assert tk._fast_warps(True, f32, R, ref.OP_PERTURB, 1e-3, False) == 4
    assert tk._fast_warps(True, f32, V1, ref.OP_COPY, 0.0, False) == 8
    assert tk._fast_warps(True, f32, G, ref.OP_COPY, 0.0, False) == 4
    assert tk._fast_warps(True, f32, G, ref.OP_UPDATE, -1e-3, False) == 8
    assert tk._fast_warps(True, f32, V1, ref.OP_UPDATE, -1e-3, False) == 8
    assert tk._fast_warps(True, f32, R, ref.OP_UPDATE, -1e-3, False) == 4
    assert tk._fast_warps(True, f32, G, ref.OP_UPDATE, 0.0, False) == 4          # update0: slower at 8
    assert tk._fast_warps(False, f32, V1, ref.OP_COPY, 0.0, False) == 4          # unmasked: FAST_NUM_WARPS
    assert tk._fast_warps(True, bf16, G, ref.OP_PERTURB, 0.0, False) == 8
    assert tk._fast_warps(True, bf16, R, ref.OP_PERTURB, 0.0, True) == 8
    assert tk._fast_warps(True, bf16, R, ref.OP_PERTURB, 0.0, False) == 4
    assert tk._fast_warps(True, bf16, G, ref.OP_PERTURB, 1e-3, False) == 4
    assert tk._fast_warps(False, bf16, G, ref.OP_PERTURB, 0.0, False) == 4
    monkeypatch.setattr(tk, "FP32_MASKED_TUNED", False)
    assert tk._fast_warps(True, f32, G, ref.OP_PERTURB, 0.0, False) == 8
    assert tk._fast_warps(True, f32, V1, ref.OP_COPY, 0.0, False) == 4
    monkeypatch.setattr(tk, "FP32_MASKED_TUNED", "auto")
    monkeypatch.setattr(tk, "FAST_NUM_WARPS", 8)      # the knob the bench's variants set
    assert tk._fast_warps(True, f32, R, ref.OP_UPDATE, -1e-3, False) == 8


def _check_update_then_perturb(dtype, dist, sets, g):
    eps, seed, nxt = 1e-3, 0x0123456789ABCDEF, 2 ** 64 - 3
    for specs, what in sets:
        pr, pt = plans(specs)
        for backend, ps in (("reference", pr), ("triton", pt)):
            mk.perturb_(ps[0], seed, eps, dist=dist, backend=backend)
            mk.perturb_(ps[0], seed, -eps, prior=eps, dist=dist, backend=backend)
        compare_plans(pr, pt, f"{what}: before")
        for seeds, grads in (([seed], [-3e2]), ([seed, 5], [0.5, -2e2]), ([seed, 5, 6, 7, 8], [1, 2, 3, 4, 5.0])):
            for backend, ps in (("reference", pr), ("triton", pt)):
                gs = torch.tensor(grads, dtype=torch.float32, device=ps[0].device)
                mk.update_(ps[0], seeds, gs, lr=1e-2, restore_seed=seed, prior=-eps, sr_seed=99, dist=dist,
                           backend=backend, next_seed=nxt, next_scale=eps)
            compare_plans(pr, pt, f"{what}: update then perturb, seeds={seeds}")
            for backend, ps in (("reference", pr), ("triton", pt)):   # back to -eps for the next round
                mk.perturb_(ps[0], nxt, -eps, prior=eps, dist=dist, backend=backend)
            seed, nxt = nxt, nxt ^ 0x5555


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "gaussian_fast"])
def test_update_then_perturb_matches_reference(dtype, dist, monkeypatch, _big_block):
    """op 3 (update_ then the next step's perturbation in one pass): unmasked calls run it fused, in the fast blocks
    and in the general ones (unaligned and short tensors beside dense ones); a masked call runs the two ops
    (FUSE_MASKED off, the default)."""
    monkeypatch.setattr(_big_block, "BLOCK", 128)
    monkeypatch.setattr(_big_block, "FAST_BLOCK", 128 if dist == "gaussian" else 256)
    monkeypatch.setattr(_big_block, "FUSE_MASKED", False)
    g = gen(11 + 5 * DTYPES.index(dtype) + ["gaussian", "rademacher", "gaussian_fast"].index(dist))
    dense = [s for s in fast_specs(dtype, g) if "mask" not in s]
    _check_update_then_perturb(dtype, dist, ((dense, "unmasked"), (fast_specs(dtype, g), "masked")), g)


@pytest.mark.parametrize("dtype,dist", [(dt, d) for dt in (torch.bfloat16, torch.float16)
                                        for d in ("rademacher", "rademacher-rows8", "gaussian_fast")]
                         + [(torch.float32, "rademacher"), (torch.float32, "gaussian_fast")],   # the [2, R, 4] tile
                         ids=lambda v: str(v).replace("torch.", ""))
def test_update_then_perturb_fused_masked(dtype, dist, monkeypatch, _big_block):
    """FUSE_MASKED: masked calls fused too, the next selection in the same pass (a threshold's on the updated values,
    latched; packed bits and row indices keep theirs), in the fast blocks and in the general ones (masked tensors at
    unaligned offsets). rademacher-rows8: with RAD_ROWS8."""
    monkeypatch.setattr(_big_block, "RAD_ROWS8", dist == "rademacher-rows8")
    dist = dist.replace("-rows8", "")
    monkeypatch.setattr(_big_block, "BLOCK", 128)
    monkeypatch.setattr(_big_block, "FAST_BLOCK", 256)
    monkeypatch.setattr(_big_block, "FUSE_MASKED", True)
    g = gen(31 + 5 * DTYPES.index(dtype) + ["rademacher", "gaussian_fast"].index(dist))
    _check_update_then_perturb(dtype, dist, ((fast_specs(dtype, g), "masked"), (mixed_specs(dtype, g), "mixed")), g)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_update_then_perturb_with_device_seeds(masked, monkeypatch, _big_block):
    """op 3 with seed_dev (the seeds, the next seed, then sr_seed; the ints only give the count and the pattern):
    the fused path reads the next seed from it, the masked call's two ops get their parts of it."""
    from mazo_kernels.ops import zo_apply_
    monkeypatch.setattr(_big_block, "BLOCK", 128)
    monkeypatch.setattr(_big_block, "FAST_BLOCK", 256)
    g = gen(77 + masked)
    specs = fast_specs(torch.bfloat16, g)
    if not masked:
        specs = [s for s in specs if "mask" not in s]
    pr, pt = plans(specs)
    eps, seed, nxt, srs = 1e-3, 2 ** 64 - 9, 2 ** 62 + 1, 12345
    signed = [mk.api._seed_bits(v) for v in (seed, seed, nxt, srs)]
    for backend, ps in (("reference", pr), ("triton", pt)):
        mk.perturb_(ps[0], seed, eps, dist="gaussian_fast", backend=backend)
        mk.perturb_(ps[0], seed, -eps, prior=eps, dist="gaussian_fast", backend=backend)
    for backend, ps in (("reference", pr), ("triton", pt)):
        dev = ps[0].device
        for grp in ps[0].groups:
            sd = torch.tensor(signed, dtype=torch.int64, device=dev) if backend == "triton" else None
            ints = [7, 7, 8] if backend == "triton" else signed[:3]
            zo_apply_(grp.tensors, [], grp.masks, grp.meta, grp.fvals, ints, torch.tensor([0.8], device=dev),
                      ref.OP_UPDATE_PERTURB, ref.DIST_GAUSSIAN_FAST, ref.ROUND_STOCHASTIC,
                      0 if backend == "triton" else signed[3], ref.THRESH_LATCH_READ, eps, -eps, 1e-2, backend, sd)
    compare_plans(pr, pt, f"op 3 with seed_dev ({'masked' if masked else 'unmasked'})")
