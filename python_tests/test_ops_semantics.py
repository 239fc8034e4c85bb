"""Semantics of perturb_, update_, perturbed_copy on the reference backend (and the C++ CPU backend where built):
exact restore where the spec promises it, masks, the threshold latch, the update rule, weight decay, rounding,
and the torch.library op contract (opcheck)."""
from __future__ import annotations

import os

import pytest
import torch

import mazo_kernels as mk
from mazo_kernels import BitMask, PlanEntry, RowIndexMask, ThresholdMask, ZOPlan
from mazo_kernels import reference as ref

BACKENDS = [pytest.param("reference", id="reference"),
            pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not mk.has_cpu(), reason="C++ extension not built"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-3


def randw(shape, dtype, seed, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


def ibits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()]).clone()


def ulp(x64: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of the storage dtype's grid at |x| (normal range)."""
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    e = torch.floor(torch.log2(x64.abs().clamp_min(1e-30)))
    return torch.pow(2.0, e - mant)


def z_of(seed, tid, n, dist=ref.DIST_GAUSSIAN, offset=0):
    return ref.noise(seed, tid, torch.arange(offset, offset + n), dist)


# ---------------------------------------------------------------- perturb / restore
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_is_rne_of_float32_sum(backend, dtype):
    w = randw(4096, dtype, 1)
    w0 = w.clone()
    plan = ZOPlan([("w", w)])
    seed = 0xF00D
    mk.perturb_(plan, seed, EPS, backend=backend)
    d = torch.tensor(EPS, dtype=torch.float32) * z_of(seed, plan.entries[0].tensor_id, w.numel())
    expect = (w0.float() + d).to(dtype)        # torch's own float32 -> dtype conversion is nearest-even
    assert torch.equal(ibits(w), ibits(expect))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_exact_where_spec_says(backend, dtype):
    n = 1 << 14
    w = randw(n, dtype, 2)
    w0 = w.clone()
    plan = ZOPlan([("layer.w", w)])
    seed = 2 ** 64 - 5
    mk.perturb_(plan, seed, EPS, backend=backend)
    y = w.clone()
    mk.update_(plan, [seed + 1], [0.0], lr=0.0, restore_seed=seed, prior=EPS, rounding="nearest", backend=backend)
    # exactness condition: the perturbed value's rounding error e = y - (theta + d) is clearly below half an ulp of
    # theta's grid (no tie, and y not in a coarser binade), theta not a power of two (finer grid below)
    th = w0.double()
    d = (torch.tensor(EPS, dtype=torch.float32) * z_of(seed, plan.entries[0].tensor_id, n)).double()
    e = y.double() - (th + d)
    u = ulp(th, dtype)
    pow2 = torch.frexp(th).mantissa.abs() == 0.5
    coarser = ulp(y.double(), dtype) > u         # two storage values map to y: one bit of theta is gone
    exact_expected = (e.abs() < 0.49 * u) & ~pow2 & (th != 0) & ~coarser
    restored = ibits(w) == ibits(w0)
    assert bool(restored[exact_expected].all()), int((~restored[exact_expected]).sum())
    frac = float(exact_expected.double().mean())
    # the condition covers nearly all elements in bf16/fp16; in fp32 about 1/16 of the sums are exact ties
    # in bf16/fp16 the exceptions are the sums that land in a coarser binade (|theta| small or near the top of its
    # binade: ~10% at eps = 1e-3, theta ~ N(0, 0.02^2)); in fp32 also the exact ties (~1/32 of the sums)
    assert frac > {torch.float32: 0.8, torch.bfloat16: 0.85, torch.float16: 0.85}[dtype], frac
    if dtype == torch.float32:
        assert float((w.double() - th).abs().max()) <= float(u.max())  # ties: off by at most one ulp


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_step_at_lr0_restores_most_bf16_weights(backend):
    # +eps, -eps (prior +eps), restore (prior -eps): in bf16 only elements whose perturbed value lands in a coarser
    # binade can lose bits (a few % per step); MeZO-style +eps, -2eps, +eps changes about half of them every step
    n = 1 << 14
    w = randw(n, torch.bfloat16, 3)
    w0 = w.clone()
    plan = ZOPlan([("w", w)])
    m = w0.clone()
    for step in range(3):
        s = 1000 + step
        mk.perturb_(plan, s, EPS, backend=backend)
        mk.perturb_(plan, s, -EPS, prior=EPS, backend=backend)
        mk.update_(plan, [s], [0.3], lr=0.0, restore_seed=s, prior=-EPS, backend=backend)
        z = z_of(s, 0, n).to(torch.bfloat16)
        for c in (EPS, -2 * EPS, EPS):
            m.add_(z, alpha=c)
    ours = float((ibits(w) != ibits(w0)).double().mean())
    mezo = float((ibits(m) != ibits(w0)).double().mean())
    assert ours < 0.2 and mezo > 0.5 and ours < mezo / 3, (ours, mezo)
    # what changed moved by at most a few ulps of the perturbed value's grid (|theta| + |eps z|, |z| < 5.8)
    grid = ulp(w0.double().abs() + 6 * EPS, torch.bfloat16)
    assert bool(((w.double() - w0.double()).abs() <= 6 * grid).all())


# ---------------------------------------------------------------- masks: unselected elements are never written
def _poison_unselected(w: torch.Tensor, unsel: torch.Tensor):
    """Values a kernel that writes theta + 0 would change: -0.0 (-> +0.0), NaN payloads (-> canonical NaN), inf."""
    specials = {torch.bfloat16: [0x8000, 0x7FA1, 0xFF81, 0x7F80, 0xFF80],
                torch.float16: [0x8000, 0x7D01, 0xFC11, 0x7C00, 0xFC00],
                torch.float32: [-2 ** 31, 0x7FA00001, -0x7FFFFF, 0x7F800000, -0x800000]}[w.dtype]
    v = w.view({2: torch.int16, 4: torch.int32}[w.element_size()]).reshape(-1)
    idx = unsel.reshape(-1).nonzero().reshape(-1)
    for j, i in enumerate(idx[: 5 * len(specials)].tolist()):
        sp = specials[j % len(specials)]
        v[i] = sp - (1 << 16) if (w.element_size() == 2 and sp >= 1 << 15) else sp


def _mask_cases(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = randw((48, 40), dtype, seed)
    sel_bits = torch.rand(w.shape, generator=g) < 0.3
    cols = torch.stack([torch.randperm(40, generator=g)[:7].sort().values for _ in range(48)]).to(torch.int32)
    rowsel = torch.zeros(w.shape, dtype=torch.bool)
    rowsel.scatter_(1, cols.long(), True)
    tau = 0.015
    return [("bitmask", w.clone(), BitMask.from_bool(sel_bits), sel_bits),
            ("rowidx", w.clone(), RowIndexMask(cols), rowsel),
            ("threshold", w.clone(), ThresholdMask(tau), w.float().abs() < tau)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unselected_never_written(backend, dtype):
    for kind, w, mask, sel in _mask_cases(dtype, 11):
        _poison_unselected(w, ~sel)
        if kind == "threshold":
            sel = w.float().abs() < mask.tau             # NaN / inf are unselected; -0.0 is selected
        w0 = w.clone()
        e = PlanEntry("w", w, 17, weight_decay=0.1)
        plan = ZOPlan([e], masks={"w": mask})
        out = torch.full_like(w, float("nan"))
        mk.perturbed_copy(plan, 5, EPS, out=[out], backend=backend)
        assert torch.equal(ibits(out)[~sel], ibits(w0)[~sel]), kind
        assert not bool(torch.isnan(out.float())[sel].any()), kind
        assert torch.equal(ibits(w), ibits(w0)), kind           # the transient mode leaves theta alone
        mk.perturb_(plan, 5, EPS, backend=backend)
        mk.perturb_(plan, 5, -EPS, prior=EPS, backend=backend)
        mk.update_(plan, [6, 7], [0.4, -0.2], lr=1e-2, restore_seed=5, prior=-EPS, rounding="stochastic",
                   sr_seed=3, backend=backend)
        mk.update_(plan, [8], [1.0], lr=1e-2, backend=backend)  # without restore: threshold re-evaluated
        assert torch.equal(ibits(w)[~sel], ibits(w0)[~sel]), kind
        moved = ibits(w)[sel] != ibits(w0)[sel]
        assert float(moved.double().mean()) > 0.9, kind       # and the selected ones did move


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_mask_writes_every_element(backend):
    w = randw(999, torch.bfloat16, 12)
    w0 = w.clone()
    mk.perturb_(ZOPlan([w]), 1, 0.05, backend=backend)
    assert float((ibits(w) != ibits(w0)).double().mean()) > 0.95


# ---------------------------------------------------------------- threshold latch
@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_latch_selects_the_same_elements_in_every_pass(backend):
    dtype = torch.bfloat16
    tau = float(torch.tensor(0.02).to(dtype))          # a bf16 grid point, so tau - k ulp are representable
    u = 2.0 ** -13                                      # bf16 ulp on [2**-6, 2**-5)
    near = torch.tensor([tau + k * u for k in range(-4, 5)] * 40, dtype=torch.float64)
    sign = torch.where(torch.arange(near.numel()) % 2 == 0, 1.0, -1.0).double()
    near = (near * sign).to(dtype)
    w = torch.cat([near, randw(4000, dtype, 13)])
    assert torch.equal(w[:near.numel()].double(), (torch.tensor([tau + k * u for k in range(-4, 5)] * 40,
                                                                dtype=torch.float64) * sign))
    w0 = w.clone()
    plan = ZOPlan([("w", w)], masks={"w": ThresholdMask(tau)})
    sel = w0.float().abs() < tau
    latch = plan.groups[0].masks[0]
    seed = 77
    mk.perturb_(plan, seed, EPS, backend=backend)                                   # pass 1 writes the latch
    assert torch.equal(latch.cpu(), ref.pack_bits(sel))
    w1 = w.clone()
    ch1 = ibits(w1) != ibits(w0)
    # selected values cross tau: a rule re-evaluated on the perturbed weights would drop them
    assert bool((w1.float().abs() >= tau)[sel].any())
    mk.perturb_(plan, seed, -EPS, prior=EPS, backend=backend)                       # pass 2 reads it
    w2 = w.clone()
    ch2 = ibits(w2) != ibits(w1)
    mk.update_(plan, [seed + 1], [0.5], lr=1e-3, restore_seed=seed, prior=-EPS, backend=backend)  # pass 3
    ch3 = ibits(w) != ibits(w2)
    for ch in (ch1, ch2, ch3):
        assert not bool(ch[~sel].any())
        assert float(ch[sel].double().mean()) > 0.97
    assert torch.equal(latch.cpu(), ref.pack_bits(sel))                            # reading did not change it
    assert torch.equal(ibits(w)[~sel], ibits(w0)[~sel])


# ---------------------------------------------------------------- update rule
@pytest.mark.parametrize("backend", BACKENDS)
def test_update_matches_float64(backend):
    n = 5000
    w = randw(n, torch.float32, 21)
    w0 = w.clone()
    e = PlanEntry("w", w, 123, lr_mult=0.5, g_mult=2.0, weight_decay=0.1)
    plan = ZOPlan([e])
    seeds, grads, lr = [11, 2 ** 63 + 7], [0.75, -1.25], 1e-3
    mk.update_(plan, seeds, grads, lr=lr, backend=backend)
    acc = sum(g * 2.0 * z_of(s, 123, n).double() for s, g in zip(seeds, grads))
    expect = w0.double() - lr * 0.5 * (acc + 0.1 * w0.double())
    err = (w.double() - expect).abs()
    # half an ulp for the final rounding, plus float32 rounding of the step (a few relative 2**-24 of its terms)
    step_terms = lr * 0.5 * (sum(abs(g) * 2.0 * z_of(s, 123, n).double().abs() for s, g in zip(seeds, grads))
                             + 0.1 * w0.double().abs())
    tol = 0.5 * ulp(expect, torch.float32) + 8 * 2.0 ** -24 * step_terms
    assert bool((err <= tol).all()), float((err / tol).max())
    step = (w.double() - w0.double())
    assert float((step * (-acc)).sum()) > 0      # moved along -g z


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_decay_only_on_selected(backend):
    w = randw((64, 32), torch.float32, 22)
    w0 = w.clone()
    sel = torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    plan = ZOPlan([PlanEntry("w", w, 9, weight_decay=0.5)], masks={"w": BitMask.from_bool(sel)})
    mk.update_(plan, [3], [0.0], lr=0.1, backend=backend)
    assert torch.equal(ibits(w)[~sel], ibits(w0)[~sel])
    expect = w0.double() * (1 - 0.1 * 0.5)
    err = (w.double() - expect).abs()[sel]
    assert bool((err <= ulp(expect, torch.float32)[sel]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_unbiased_nearest_drops(backend, dtype):
    n, reps = 1 << 15, 8
    w_val = float(torch.tensor(0.02).to(dtype))
    u = float(ulp(torch.tensor([w_val], dtype=torch.float64), dtype))
    delta = 0.1 * u                                   # lr * g: a tenth of an ulp
    results = []
    zs = None
    for r in range(reps):
        w = torch.full((n,), w_val, dtype=dtype)
        plan = ZOPlan([PlanEntry("w", w, 31)])
        mk.update_(plan, [1234], [1.0], lr=delta, rounding="stochastic", sr_seed=r, dist="rademacher",
                   backend=backend)
        results.append(w.double())
        zs = z_of(1234, 31, n, ref.DIST_RADEMACHER).double()
    res = torch.stack(results)
    for sgn in (1.0, -1.0):
        vals = res[:, zs == sgn].reshape(-1)
        exact = w_val - delta * sgn
        assert set(vals.unique().tolist()) <= {w_val, w_val - sgn * u}
        p = 0.1
        sigma = u * (p * (1 - p) / vals.numel()) ** 0.5
        assert abs(float(vals.mean()) - exact) < 5 * sigma, (sgn, float(vals.mean()), exact)
    # different sr_seeds round differently
    assert not torch.equal(res[0], res[1])
    # nearest rounding drops the whole update
    w = torch.full((n,), w_val, dtype=dtype)
    mk.update_(ZOPlan([PlanEntry("w", w, 31)]), [1234], [1.0], lr=delta, rounding="nearest", dist="rademacher",
               backend=backend)
    assert bool((w.double() == w_val).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_unbiased_on_random_weights(backend):
    n = 1 << 16
    w = randw(n, torch.bfloat16, 23)
    w0 = w.clone()
    lr, g = 3e-6, 1.0
    mk.update_(ZOPlan([PlanEntry("w", w, 44)]), [99], [g], lr=lr, rounding="stochastic", sr_seed=1, backend=backend)
    exact = w0.float().double() - lr * g * z_of(99, 44, n).double()
    r = (w.double() - exact) / ulp(exact, torch.bfloat16)
    ok = w0.float().abs() > 1e-3                          # stay away from tiny weights (subnormal-like grids)
    assert abs(float(r[ok].mean())) < 5 * 0.5 / ok.sum().item() ** 0.5
    w2 = w0.clone()
    mk.update_(ZOPlan([PlanEntry("w", w2, 44)]), [99], [g], lr=lr, rounding="nearest", backend=backend)
    assert float((ibits(w2) == ibits(w0)).double().mean()) > 0.9     # most of the update is lost


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_as_tensor(backend):
    w = randw(777, torch.bfloat16, 24)
    w0 = w.clone()
    ref_w = w0.clone()
    mk.update_(ZOPlan([("w", ref_w)]), [5], [0.37], lr=1e-2, sr_seed=2, backend=backend)
    for grads in (torch.tensor(0.37), torch.tensor([0.37]), torch.tensor([0.37], dtype=torch.float64)):
        w.copy_(w0)
        mk.update_(ZOPlan([("w", w)]), [5], grads, lr=1e-2, sr_seed=2, backend=backend)
        assert torch.equal(ibits(w), ibits(ref_w))
    ref2, w2 = w0.clone(), w0.clone()
    mk.update_(ZOPlan([("w", ref2)]), [5, 6], [0.37, -1.5], lr=1e-2, backend=backend)
    mk.update_(ZOPlan([("w", w2)]), [5, 6], torch.tensor([0.37, -1.5]), lr=1e-2, backend=backend)
    assert torch.equal(ibits(w2), ibits(ref2))


# ---------------------------------------------------------------- layout independence
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharding_and_plan_packing_do_not_change_the_noise(backend):
    full = randw((64, 50), torch.bfloat16, 25)
    other = randw(300, torch.float16, 26)
    a, b = full.clone(), other.clone()
    mk.perturb_(ZOPlan([PlanEntry("full", a, 8), PlanEntry("other", b, 9)]), 42, 0.01, backend=backend)
    # the same tensors in the other order, and the full tensor as two shards in separate plans
    s0, s1 = full[:20].clone(), full[20:].clone()
    b2 = other.clone()
    mk.perturb_(ZOPlan([PlanEntry("other", b2, 9), PlanEntry("s1", s1, 8, global_offset=20 * 50,
                                                               full_numel=full.numel())]), 42, 0.01, backend=backend)
    mk.perturb_(ZOPlan([PlanEntry("s0", s0, 8, global_offset=0, full_numel=full.numel())]), 42, 0.01, backend=backend)
    assert torch.equal(ibits(torch.cat([s0, s1])), ibits(a))
    assert torch.equal(ibits(b2), ibits(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbed_copy_equals_in_place_perturb(backend):
    ws = [randw((30, 20), torch.bfloat16, 27), randw(101, torch.float32, 28), randw(64, torch.float16, 29)]
    w0 = [w.clone() for w in ws]
    plan = ZOPlan([(f"p{i}", w) for i, w in enumerate(ws)], masks={"p0": ThresholdMask(0.02)})
    outs = [torch.full_like(w, float("nan")) for w in ws]
    ret = mk.perturbed_copy(plan, 3, -0.004, out=outs, backend=backend)
    assert all(r is o for r, o in zip(ret, outs))
    assert all(torch.equal(ibits(w), ibits(w_)) for w, w_ in zip(ws, w0))
    mk.perturb_(plan, 3, -0.004, backend=backend)
    assert all(torch.equal(ibits(w), ibits(o)) for w, o in zip(ws, outs))
    single = mk.perturbed_copy(plan.entries[1], 3, -0.004, backend=backend)    # a PlanEntry returns one tensor
    assert isinstance(single, torch.Tensor)


# ---------------------------------------------------------------- the op contract
def _op_cases():
    g = torch.Generator().manual_seed(30)
    cases = []
    for dtype in DTYPES:
        w = randw((16, 12), dtype, 31)
        sel = torch.rand(w.shape, generator=g) < 0.4
        cols = torch.tensor([[1, 4, 7]] * 16, dtype=torch.int32)
        for name, mask in (("none", None), ("bitmask", BitMask.from_bool(sel)), ("rowidx", RowIndexMask(cols)),
                           ("threshold", ThresholdMask(0.02))):
            plan = ZOPlan([PlanEntry("w", w.clone(), 3, weight_decay=0.01)], masks={"w": mask} if mask else None)
            cases.append((f"{dtype}-{name}", plan.groups[0]))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    op = torch.ops.mazo_kernels.zo_apply_.default
    for name, grp in _op_cases():
        t, m, meta, fv = grp.tensors, grp.masks, grp.meta, grp.fvals
        empty = torch.zeros(0, dtype=torch.float32)
        outs = [torch.full_like(x, float("nan")) for x in t]
        calls = [
            (t, [], m, meta, fv, [5], empty, ref.OP_PERTURB, 0, 0, 0, ref.THRESH_LATCH_WRITE, 1e-3, 0.0, 0.0),
            (t, [], m, meta, fv, [5], empty, ref.OP_PERTURB, 1, 0, 0, ref.THRESH_LATCH_READ, -1e-3, 1e-3, 0.0),
            (t, [], m, meta, fv, [5, -3, 9], torch.tensor([0.5, -0.25]), ref.OP_UPDATE, 0, 1, -7,
             ref.THRESH_LATCH_READ, 0.0, -1e-3, 1e-2),
            (t, outs, m, meta, fv, [5], empty, ref.OP_COPY, 0, 0, 0, ref.THRESH_EVAL, 1e-3, 0.0, 0.0),
            (t, [], m, meta, fv, [5, 5, 11], torch.tensor([0.5]), ref.OP_UPDATE_PERTURB, 2, 1, -7,
             ref.THRESH_LATCH_READ, 1e-3, -1e-3, 1e-2),
        ]
        for args in calls:
            res = torch.library.opcheck(op, args + (backend,), raise_exception=False)
            assert all(v == "SUCCESS" for v in res.values()), (name, args[7], res)
        # the seeds from a device tensor (what a captured CUDA graph uses): the same contract
        seed_dev = torch.tensor([5, -3, 9, -7], dtype=torch.int64)
        args = (t, [], m, meta, fv, [5, -3, 9], torch.tensor([0.5, -0.25]), ref.OP_UPDATE, 0, 1, -7,
                ref.THRESH_LATCH_READ, 0.0, -1e-3, 1e-2, backend, seed_dev)
        res = torch.library.opcheck(op, args, raise_exception=False)
        assert all(v == "SUCCESS" for v in res.values()), (name, "seed_dev", res)


def _gpu_or_interpreted_backends():
    out = []
    if mk.has_triton() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    if torch.cuda.is_available() and mk.has_cuda():
        out.append("cuda")
    return out


@pytest.mark.parametrize("backend", _gpu_or_interpreted_backends())
def test_opcheck_triton_and_cuda(backend):
    """The same op contract on the GPU backends (Triton interpreted on CPU-only machines)."""
    op = torch.ops.mazo_kernels.zo_apply_.default
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name, grp in _op_cases():
        t = [x.to(dev) for x in grp.tensors]
        m = [x.to(dev) for x in grp.masks]
        meta, fv = grp.meta.to(dev), grp.fvals.to(dev)
        empty = torch.zeros(0, dtype=torch.float32, device=dev)
        outs = [torch.full_like(x, float("nan")) for x in t]
        calls = [
            (t, [], m, meta, fv, [5], empty, ref.OP_PERTURB, 0, 0, 0, ref.THRESH_LATCH_WRITE, 1e-3, 0.0, 0.0),
            (t, [], m, meta, fv, [5, -3], torch.tensor([0.5], device=dev), ref.OP_UPDATE, 1, 1, -7,
             ref.THRESH_LATCH_READ, 0.0, -1e-3, 1e-2),
            (t, outs, m, meta, fv, [5], empty, ref.OP_COPY, 0, 0, 0, ref.THRESH_EVAL, 1e-3, 0.0, 0.0),
            (t, [], m, meta, fv, [5, 5, 11], torch.tensor([0.5], device=dev), ref.OP_UPDATE_PERTURB, 2, 1, -7,
             ref.THRESH_LATCH_READ, 1e-3, -1e-3, 1e-2),
        ]
        for args in calls:
            res = torch.library.opcheck(op, args + (backend,), raise_exception=False)
            assert all(v == "SUCCESS" for v in res.values()), (name, args[7], res)
