"""The C++ CPU backend against the reference, bit for bit, through the public API.

MAZO_TEST_BACKEND=cuda runs the same checks against the CUDA backend (tensors on the GPU, reference on the CPU)."""
import math
import os
import zlib

import pytest
import torch

import mazo_kernels as mk
from mazo_kernels import reference as ref
from mazo_kernels.ops import zo_apply_

BK = os.environ.get("MAZO_TEST_BACKEND", "cpu")
DEV = "cuda" if BK == "cuda" else "cpu"
if BK == "cuda":
    pytestmark = pytest.mark.skipif(not (mk.has_cuda() and torch.cuda.is_available()), reason="needs CUDA backend")
else:
    pytestmark = pytest.mark.skipif(not mk.has_cpu(), reason="C++ extension mazo_kernels._C not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DISTS = ["gaussian", "rademacher", "gaussian_fast"]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# rowidx: a third of each row (the element path: every element visited); rowidx_sparse: a tenth (the entry path:
# only the listed elements visited; csrc/zo_apply_common.h, rowidx_as_elements)
MASK_KINDS = ["none", "threshold", "bitmask", "rowidx", "rowidx_sparse"]
TAU = 0.02


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _bits(t):
    return t.detach().cpu().contiguous().view(BITS[t.dtype])


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _edge_values(dtype):
    """Values at and around binade edges of bf16/fp16, the threshold, tiny and subnormal numbers (as float32)."""
    vals = []
    for k in list(range(-30, 17, 3)) + [-24, -14, -15, -25, -126, -127, -133]:
        p = 2.0 ** k
        vals += [p, p * (1 + 2 ** -8), p * (1 - 2 ** -9), p * (1 + 2 ** -11), p * (1 - 2 ** -12), p * 1.5]
    vals += [TAU, math.nextafter(TAU, 0), math.nextafter(TAU, 1), 0.0, 1e-45, 3e-39, 6e-8, 5.9604645e-08, 65504.0,
             65519.0]
    t = torch.tensor(vals, dtype=torch.float32)
    t = torch.cat([t, -t])
    return t.to(dtype)


def _weights(gen, n, dtype, kind="normal"):
    """Fresh weights: N(0, 0.02^2), a wide log-uniform range, or a mix with edge values."""
    if kind == "normal":
        w = torch.randn(n, generator=gen) * 0.02
    elif kind == "wide":
        mag = torch.exp2(torch.rand(n, generator=gen) * 50 - 40)
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        w = mag * sign
    else:
        w = torch.randn(n, generator=gen) * 0.02
        e = _edge_values(torch.float32)
        if n:
            idx = torch.randint(0, n, (min(n, 2 * e.numel()),), generator=gen)
            w[idx] = e[torch.randint(0, e.numel(), (idx.numel(),), generator=gen)]
    if dtype == torch.float16:
        w = w.clamp(-60000, 60000)
    w = w.to(dtype)
    if kind == "mixed" and n:
        # exactly tau in the storage dtype, and its neighbours
        tau_s = torch.tensor(TAU, dtype=torch.float32).to(dtype)
        w[: min(n, 3)] = tau_s
    return w


def _mask(kind, t, gen):
    if kind == "none":
        return None
    if kind == "threshold":
        return mk.ThresholdMask(TAU)
    if kind == "bitmask":
        return mk.BitMask.from_bool(torch.rand(t.numel(), generator=gen) < 0.4)
    if kind in ("rowidx", "rowidx_sparse"):
        rows, cols = t.shape
        k = max(1, cols // (3 if kind == "rowidx" else 10))
        idx = torch.stack([torch.randperm(cols, generator=gen)[:k].sort().values for _ in range(rows)])
        return mk.RowIndexMask(idx.to(torch.int32).reshape(rows, k))
    raise AssertionError(kind)


SHAPES = [(37, 29), (1, 1), (5, 8), (3, 141)]  # 2-D so every mask kind applies; odd sizes


def _to(mask, device):
    if isinstance(mask, mk.BitMask):
        return mk.BitMask(mask.bits.to(device))
    if isinstance(mask, mk.RowIndexMask):
        return mk.RowIndexMask(mask.cols.to(device))
    return mask


def _make_pair(gen, dtype, mask_kind, wkind="mixed", shapes=SHAPES, entry_kw=None):
    """Two plans over identical weights with identical masks: (reference on the CPU, backend under test on DEV)."""
    plans = []
    ws = [_weights(gen, math.prod(s), dtype, wkind).reshape(s) for s in shapes]
    masks = [_mask(mask_kind, w, gen) for w in ws]
    for device in ("cpu", DEV):
        entries = []
        for i, (w, m) in enumerate(zip(ws, masks)):
            kw = (entry_kw or {}).get(i, {})
            entries.append(mk.PlanEntry(f"l{i}.weight", w.clone().to(device), mk.stable_tensor_id(f"l{i}.weight"),
                                        mask=_to(m, device), **kw))
        plans.append(mk.ZOPlan(entries))
    return plans


def _assert_plans_equal(pa, pb):
    for ea, eb in zip(pa.entries, pb.entries):
        assert _same(ea.tensor, eb.tensor), ea.name
    for ga, gb in zip(pa.groups, pb.groups):
        for ma, mb in zip(ga.masks, gb.masks):
            assert torch.equal(ma.cpu(), mb.cpu())


ENTRY_KW = {1: dict(scale_mult=0.5, lr_mult=3.0, weight_decay=0.1, g_mult=-2.0),
            2: dict(global_offset=2 ** 33 + 5, full_numel=2 ** 34),
            3: dict(global_offset=2 ** 32 - 3, full_numel=2 ** 32 + 1000, weight_decay=0.01)}


# ---------------------------------------------------------------- noise
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("seed,tid,offset,n", [(0, 0, 0, 1000), (1, 7, 3, 1), (2 ** 64 - 1, 2 ** 32 - 1, 5, 777),
                                                (2 ** 63, 12345, 2 ** 33 + 5, 513), (99, 1, 2 ** 32 - 9, 300),
                                                (5, 5, 0, 0), (2 ** 62 - 1, 3, 2 ** 61 - 11, 100)])
def test_noise(dist, seed, tid, offset, n):
    a = mk.noise(seed, tid, offset, n, dist=dist, backend="reference")
    b = mk.noise(seed, tid, offset, n, dist=dist, device=DEV, backend=BK)
    assert _same(a, b)


def test_noise_matches_reference_functions():
    idx = torch.arange(2 ** 33 - 100, 2 ** 33 + 100)
    z = mk.noise(17, 3, 2 ** 33 - 100, 200, device=DEV, backend=BK)
    assert _same(z, ref.gaussian(17, 3, idx))
    z = mk.noise(17, 3, 2 ** 33 - 100, 200, dist="rademacher", device=DEV, backend=BK)
    assert _same(z, ref.rademacher(17, 3, idx))


# ---------------------------------------------------------------- perturb_
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_perturb(dtype, dist, mask_kind):
    gen = torch.Generator().manual_seed(_seed(str(dtype), dist, mask_kind))
    pr, pc = _make_pair(gen, dtype, mask_kind, entry_kw=ENTRY_KW)
    seed = 2 ** 64 - 17
    for plan, b in ((pr, "reference"), (pc, BK)):
        mk.perturb_(plan, seed, 1e-3, dist=dist, backend=b)       # latch write
    _assert_plans_equal(pr, pc)
    for plan, b in ((pr, "reference"), (pc, BK)):
        mk.perturb_(plan, seed, -1e-3, prior=1e-3, dist=dist, backend=b)  # latch read, restore
    _assert_plans_equal(pr, pc)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wkind", ["normal", "wide", "mixed"])
def test_perturb_value_ranges(dtype, wkind):
    gen = torch.Generator().manual_seed(_seed(str(dtype), wkind))
    pr, pc = _make_pair(gen, dtype, "threshold", wkind=wkind, shapes=[(64, 65), (1, 3)])
    for scale, prior in ((1e-3, 0.0), (0.5, 0.0), (3e-7, 0.0), (-1e-3, 1e-3), (2.0, -1e-2)):
        for plan, b in ((pr, "reference"), (pc, BK)):
            mk.perturb_(plan, 123456789, scale, prior=prior, backend=b)
        _assert_plans_equal(pr, pc)


# ---------------------------------------------------------------- update_
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_update(dtype, dist, mask_kind, rounding):
    gen = torch.Generator().manual_seed(_seed(str(dtype), dist, mask_kind, rounding))
    pr, pc = _make_pair(gen, dtype, mask_kind, entry_kw=ENTRY_KW)
    seeds = [2 ** 64 - 1, 3, 2 ** 40 + 7]
    grads = [0.7, -1.3, 2.5e-3]
    for plan, b in ((pr, "reference"), (pc, BK)):
        mk.update_(plan, seeds, grads, lr=1e-2, rounding=rounding, sr_seed=2 ** 63 + 11, dist=dist, backend=b)
    _assert_plans_equal(pr, pc)
    # with a restore (prior) and a tensor of grads
    for plan, b in ((pr, "reference"), (pc, BK)):
        mk.perturb_(plan, 77, 1e-3, dist=dist, backend=b)
        mk.update_(plan, seeds[:1], torch.tensor([4.0], device=plan.device), lr=0.3, restore_seed=77, prior=1e-3, rounding=rounding,
                   sr_seed=9, dist=dist, backend=b)
    _assert_plans_equal(pr, pc)


# (64, 72) and (8, 16) at offset 0: a dense_aligned plan (CUDA's dense-only kernels, which fuse op 3); the rest the
# odd shapes, offsets and multipliers of the other tests (the backends' two-op path, or Triton's general blocks)
ALIGNED = [(64, 72), (8, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS + ["aligned"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_update_then_perturb(dtype, dist, mask_kind, rounding):
    """update_(next_seed=...) (op 3): the update, then the next step's first perturbation (latch written), as one
    call, against the reference's two ops; then the next step's -eps pass and update restore it as usual."""
    gen = torch.Generator().manual_seed(_seed(str(dtype), dist, mask_kind, rounding, "op3"))
    if mask_kind == "aligned":
        pr, pc = _make_pair(gen, dtype, "none", shapes=ALIGNED, entry_kw={1: dict(scale_mult=0.5, g_mult=-2.0)})
        assert all(g.dense_aligned for g in pc.groups)
    else:
        pr, pc = _make_pair(gen, dtype, mask_kind, entry_kw=ENTRY_KW)
    eps, seed, nxt = 1e-3, 2 ** 64 - 5, 2 ** 63 + 3
    for plan, b in ((pr, "reference"), (pc, BK)):
        mk.perturb_(plan, seed, eps, dist=dist, backend=b)
        mk.perturb_(plan, seed, -eps, prior=eps, dist=dist, backend=b)
    _assert_plans_equal(pr, pc)
    for seeds, grads in (([seed], [-40.0]), ([seed, 3], [0.7, -1.3])):
        for plan, b in ((pr, "reference"), (pc, BK)):
            gs = torch.tensor(grads, device=plan.device)
            mk.update_(plan, seeds, gs, lr=1e-2, restore_seed=seed, prior=-eps, rounding=rounding, sr_seed=17,
                       dist=dist, backend=b, next_seed=nxt, next_scale=eps)
        _assert_plans_equal(pr, pc)
        for plan, b in ((pr, "reference"), (pc, BK)):
            mk.perturb_(plan, nxt, -eps, prior=eps, dist=dist, backend=b)
        _assert_plans_equal(pr, pc)
        seed, nxt = nxt, nxt ^ 0xABCDEF


@pytest.mark.parametrize("mask_kind", ["aligned", "threshold"])
def test_update_then_perturb_with_device_seeds(mask_kind):
    """op 3 with its seeds in a device tensor (what a captured graph passes: the seeds, the next seed, then sr_seed;
    the int seeds give only the count and the equality pattern) against the reference with the values as ints."""
    gen = torch.Generator().manual_seed(_seed("op3 seed_dev", mask_kind))
    if mask_kind == "aligned":
        pr, pc = _make_pair(gen, torch.bfloat16, "none", shapes=ALIGNED)
    else:
        pr, pc = _make_pair(gen, torch.bfloat16, "threshold", entry_kw=ENTRY_KW)
    eps, seed, nxt, srs = 1e-3, 2 ** 64 - 9, 2 ** 62 + 1, 12345
    signed = [mk.api._seed_bits(v) for v in (seed, seed, nxt, srs)]
    for plan, b in ((pr, "reference"), (pc, BK)):
        mk.perturb_(plan, seed, eps, dist="gaussian_fast", backend=b)
        mk.perturb_(plan, seed, -eps, prior=eps, dist="gaussian_fast", backend=b)
    for plan, b in ((pr, "reference"), (pc, BK)):
        dev = plan.device
        for g in plan.groups:
            sd = torch.tensor(signed, dtype=torch.int64, device=dev) if b == BK else None
            ints = [7, 7, 8] if b == BK else signed[:3]    # with seed_dev: placeholders with the values' pattern
            zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, ints, torch.tensor([0.8], device=dev),
                      ref.OP_UPDATE_PERTURB, ref.DIST_GAUSSIAN_FAST, ref.ROUND_STOCHASTIC,
                      0 if b == BK else signed[3], ref.THRESH_LATCH_READ, eps, -eps, 1e-2, b, sd, g.dense_aligned)
    _assert_plans_equal(pr, pc)


def test_update_then_perturb_is_the_two_ops():
    """The reference's op 3 against update_ then perturb_ (latch written) on the same plan: the definition."""
    gen = torch.Generator().manual_seed(5)
    pa, _ = _make_pair(gen, torch.bfloat16, "threshold", entry_kw=ENTRY_KW)
    gen = torch.Generator().manual_seed(5)
    pb, _ = _make_pair(gen, torch.bfloat16, "threshold", entry_kw=ENTRY_KW)
    for plan in (pa, pb):
        mk.perturb_(plan, 9, 1e-2, backend="reference")
    mk.update_(pa, [9], [3.0], lr=0.1, restore_seed=9, prior=1e-2, sr_seed=1, backend="reference", next_seed=10,
               next_scale=2e-2)
    mk.update_(pb, [9], [3.0], lr=0.1, restore_seed=9, prior=1e-2, sr_seed=1, backend="reference")
    before = [e.tensor.clone() for e in pb.entries]
    mk.perturb_(pb, 10, 2e-2, backend="reference")
    assert any(not torch.equal(a, e.tensor) for a, e in zip(before, pb.entries))
    _assert_plans_equal(pa, pb)


def test_update_then_perturb_rejects_bad_calls():
    gen = torch.Generator().manual_seed(6)
    _, pc = _make_pair(gen, torch.float32, "none")
    g = pc.groups[0]
    before = [t.clone() for t in g.tensors]
    for b in ("reference", BK):
        with pytest.raises(ValueError, match="at least 3"):
            zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, [1, 2], torch.ones(1, device=DEV), 3, 0, 0, 0, 2,
                         0.1, 0.1, 1.0, b)
        with pytest.raises(ValueError, match="in place only"):
            zo_apply_(g.tensors, [t.clone() for t in g.tensors], g.masks, g.meta, g.fvals, [1, 1, 2],
                         torch.ones(1, device=DEV), 3, 0, 0, 0, 2, 0.1, 0.1, 1.0, b)
    for a, t in zip(before, g.tensors):
        assert _same(a, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wkind", ["wide", "mixed"])
def test_update_value_ranges(dtype, wkind):
    gen = torch.Generator().manual_seed(_seed(str(dtype), wkind, "u"))
    pr, pc = _make_pair(gen, dtype, "none", wkind=wkind, shapes=[(50, 41)],
                        entry_kw={0: dict(weight_decay=0.5, lr_mult=0.25)})
    for lr, g in ((1e-2, [1.0, -2.0]), (10.0, [3e3, 1e-5]), (1e-6, [0.5, 0.5])):
        for plan, b in ((pr, "reference"), (pc, BK)):
            mk.update_(plan, [11, 12], g, lr=lr, rounding="stochastic", sr_seed=4, backend=b)
        _assert_plans_equal(pr, pc)


# ---------------------------------------------------------------- perturbed_copy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_perturbed_copy(dtype, dist, mask_kind):
    gen = torch.Generator().manual_seed(_seed(str(dtype), dist, mask_kind, "c"))
    pr, pc = _make_pair(gen, dtype, mask_kind, entry_kw=ENTRY_KW)
    before = [e.tensor.clone() for e in pc.entries]
    outs_r = [torch.full_like(e.tensor, float("nan")) for e in pr.entries]
    outs_c = [torch.full_like(e.tensor, float("nan")) for e in pc.entries]
    mk.perturbed_copy(pr, 2 ** 64 - 2, 1e-2, out=outs_r, dist=dist, backend="reference")
    res = mk.perturbed_copy(pc, 2 ** 64 - 2, 1e-2, out=outs_c, dist=dist, backend=BK)
    assert all(r is o for r, o in zip(res, outs_c))
    for a, b in zip(outs_r, outs_c):
        assert _same(a, b)
        assert not torch.isnan(b.float()).any().item()
    for a, e in zip(before, pc.entries):
        assert _same(a, e.tensor)  # theta untouched


# ---------------------------------------------------------------- structure
def test_grouping_does_not_matter():
    gen = torch.Generator().manual_seed(5)
    ws = [_weights(gen, n, dt, "mixed") for n, dt in ((1000, torch.bfloat16), (7, torch.float16), (1, torch.float32),
                                                       (0, torch.bfloat16), (333, torch.bfloat16),
                                                       (129, torch.float16), (2049, torch.float32))]
    kws = [dict(global_offset=o, full_numel=o + w.numel() + 10) for o, w in zip((0, 3, 2 ** 33 + 5, 0, 17, 1, 8), ws)]

    def entries(device):
        return [mk.PlanEntry(f"t{i}", w.clone().to(device), 1000 + i,
                             mask=(mk.ThresholdMask(TAU) if i % 2 else None), **kw)
                for i, (w, kw) in enumerate(zip(ws, kws))]

    together = entries(DEV)
    single = entries(DEV)
    reference = entries("cpu")
    pt = mk.ZOPlan(together)
    ps = [mk.ZOPlan([e]) for e in single]
    prf = mk.ZOPlan(reference)
    for p, b in [(pt, BK), (prf, "reference")] + [(p, BK) for p in ps]:
        mk.perturb_(p, 42, 1e-3, backend=b)
        mk.perturb_(p, 42, -1e-3, prior=1e-3, backend=b)
        mk.update_(p, [42, 43], [0.5, -0.25], lr=1e-2, restore_seed=42, prior=-1e-3, sr_seed=8, backend=b)
    for a, b, c in zip(together, single, reference):
        assert _same(a.tensor, c.tensor), a.name
        assert _same(b.tensor, c.tensor), b.name


@pytest.mark.skipif(BK != "cpu", reason="CPU threads")
def test_thread_count_does_not_matter():
    gen = torch.Generator().manual_seed(6)
    w = _weights(gen, 300001, torch.bfloat16, "normal")
    outs = []
    old = torch.get_num_threads()
    try:
        for nt in (1, max(2, old)):
            torch.set_num_threads(nt)
            t = w.clone()
            p = mk.ZOPlan([mk.PlanEntry("w", t, 1, mask=mk.ThresholdMask(TAU))])
            mk.perturb_(p, 3, 1e-3, backend="cpu")
            mk.update_(p, [4, 5], [1.0, 2.0], lr=1e-2, restore_seed=3, prior=1e-3, backend="cpu")
            outs.append((t, p.groups[0].masks[0].clone()))
    finally:
        torch.set_num_threads(old)
    assert _same(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    # and a slice of it against the reference
    t = w[:5000].clone()
    p = mk.ZOPlan([mk.PlanEntry("w", t, 1, mask=mk.ThresholdMask(TAU))])
    mk.perturb_(p, 3, 1e-3, backend="reference")
    mk.update_(p, [4, 5], [1.0, 2.0], lr=1e-2, restore_seed=3, prior=1e-3, backend="reference")
    assert _same(outs[0][0][:5000], t)


def test_empty_and_single_element():
    for dt in DTYPES:
        for n in (0, 1):
            a = torch.full((n,), 0.3).to(dt)
            b = a.clone().to(DEV)
            for t, be in ((a, "reference"), (b, BK)):
                p = mk.ZOPlan([mk.PlanEntry("x", t, 9, global_offset=2 ** 40 + 1, full_numel=2 ** 41)])
                mk.perturb_(p, 1, 0.1, backend=be)
                mk.update_(p, [2], [1.0], lr=0.1, restore_seed=1, prior=0.1, backend=be)
            assert _same(a, b)


def test_threshold_latch_bits_and_boundary():
    """Elements exactly at tau are unselected, just below are selected; every latch bit is rewritten."""
    for dt in DTYPES:
        tau_s = torch.tensor(TAU).to(dt)
        below = torch.tensor(math.nextafter(float(tau_s.float()), 0)).to(dt)
        vals = torch.stack([tau_s, below, -tau_s, -below, torch.tensor(0.0).to(dt)]).repeat(5)[:23]
        res = []
        for be, dev in (("reference", "cpu"), (BK, DEV)):
            t = vals.clone().to(dev)
            p = mk.ZOPlan([mk.PlanEntry("x", t, 4, mask=mk.ThresholdMask(float(tau_s.float())))])
            p.groups[0].masks[0].fill_(0xFF)  # stale latch: must be fully rewritten
            mk.perturb_(p, 10, 1e-4, backend=be)
            res.append((t, p.groups[0].masks[0].clone()))
        assert _same(res[0][0], res[1][0])
        assert torch.equal(res[0][1], res[1][1].cpu())
        sel = ref.unpack_bits(res[1][1].cpu(), vals.numel())
        assert torch.equal(sel, vals.float().abs() < tau_s.float())


def test_bitmask_all_and_none():
    gen = torch.Generator().manual_seed(8)
    w = _weights(gen, 77, torch.bfloat16)
    for sel in (torch.ones(77, dtype=torch.bool), torch.zeros(77, dtype=torch.bool)):
        a, b = w.clone(), w.clone().to(DEV)
        for t, be in ((a, "reference"), (b, BK)):
            m = mk.BitMask.from_bool(sel.to(t.device))
            mk.perturb_(mk.ZOPlan([mk.PlanEntry("x", t, 4, mask=m)]), 1, 1e-2, backend=be)
        assert _same(a, b)
    assert _same(b, w)  # nothing selected: untouched


def test_direct_op_out_of_place():
    """The op with explicit outs for perturb/update: only selected outputs are written."""
    gen = torch.Generator().manual_seed(9)
    w = _weights(gen, 100, torch.float16)
    sel = torch.rand(100, generator=gen) < 0.5
    results = []
    for be, dev in (("reference", "cpu"), (BK, DEV)):
        plan = mk.ZOPlan([mk.PlanEntry("x", w.to(dev), 4, mask=mk.BitMask.from_bool(sel.to(dev)))])
        g = plan.groups[0]
        out = torch.full_like(g.tensors[0], 7.0)
        for op in (ref.OP_PERTURB, ref.OP_UPDATE):
            gs = torch.tensor([0.5], device=dev)
            mk.ops.zo_apply_(g.tensors, [out], g.masks, g.meta, g.fvals, [3, 4], gs, op, 0, 1, 5, 0, 1e-2, 0.0,
                             0.1, be)
            results.append(out.clone())
    for a, b in zip(results[:2], results[2:]):
        assert _same(a, b)
    assert torch.equal(results[2].cpu()[~sel], torch.full((int((~sel).sum()),), 7.0, dtype=torch.float16))


def test_dense_aligned_promise():
    """PlanGroup.dense_aligned holds where every tensor is unmasked at an 8-aligned global offset; the op computes
    the same bits with the promise, and a broken promise is an error before any weight is written (the CPU backend
    reads the table on the host; the CUDA kernel traps: test_gpu_backends.py)."""
    gen = torch.Generator().manual_seed(21)
    ws = [_weights(gen, n, torch.bfloat16).to(DEV) for n in (64, 1000, 24)]
    dense = mk.ZOPlan([mk.PlanEntry("a", ws[0].clone(), 1), mk.PlanEntry("b", ws[1].clone(), 2, global_offset=16,
                                                                          full_numel=2000)])
    assert dense.groups[0].dense_aligned
    assert not mk.ZOPlan([mk.PlanEntry("a", ws[0].clone(), 1, global_offset=4, full_numel=100)]).groups[0].dense_aligned
    masked = mk.ZOPlan([mk.PlanEntry("a", ws[0].clone(), 1), mk.PlanEntry("c", ws[2].clone(), 3,
                                                                           mask=mk.ThresholdMask(TAU))])
    assert not masked.groups[0].dense_aligned
    # the same bits with and without the promise
    g = dense.groups[0]
    outs = {}
    for flag in (False, True):
        o = [torch.full_like(t, float("nan")) for t in g.tensors]
        mk.ops.zo_apply_(g.tensors, o, g.masks, g.meta, g.fvals, [77], torch.zeros(0, device=DEV), ref.OP_COPY,
                         ref.DIST_GAUSSIAN, ref.ROUND_NEAREST, 0, ref.THRESH_EVAL, 0.5, 0.0, 0.0, BK,
                         dense_aligned=flag)
        outs[flag] = o
    assert all(_same(a, b) for a, b in zip(outs[False], outs[True]))
    assert not _same(outs[True][0], g.tensors[0])
    if BK != "cpu":
        return
    # broken promises: a masked tensor (the second, after an unmasked one), an unaligned offset
    for plan, what in ((masked, "mask kind 1"), (mk.ZOPlan([mk.PlanEntry("a", ws[0].clone(), 1),
                                                            mk.PlanEntry("b", ws[1].clone(), 2, global_offset=12,
                                                                         full_numel=2000)]), "global offset 12")):
        g = plan.groups[0]
        before = [t.clone() for t in g.tensors]
        with pytest.raises(RuntimeError, match=what):
            mk.ops.zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, [77], torch.zeros(0), ref.OP_PERTURB,
                             ref.DIST_GAUSSIAN, ref.ROUND_NEAREST, 0, ref.THRESH_LATCH_WRITE, 1e-2, 0.0, 0.0, "cpu",
                             dense_aligned=True)
        assert all(_same(a, b) for a, b in zip(before, g.tensors)), "weights written before the error"
