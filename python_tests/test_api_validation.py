"""The public API refuses bad input with a message that names the problem, before writing anything."""
from __future__ import annotations

import math
import os

import pytest
import torch

import mazo_kernels as mk
from mazo_kernels import BitMask, PlanEntry, RowIndexMask, ThresholdMask, ZOPlan


def _w(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.02).to(dtype)


def _bits(t):
    return t.detach().clone().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.fixture
def plan_and_snapshot():
    a, b = _w(64, 16, seed=1), _w(300, dtype=torch.float32, seed=2)
    plan = ZOPlan([("a", a), ("b", b)])
    before = [_bits(a), _bits(b)]

    def untouched():
        return all(torch.equal(_bits(t), s) for t, s in zip((a, b), before))
    return plan, untouched


# ---------------------------------------------------------------- plan construction
def test_empty_plan():
    with pytest.raises(ValueError, match="empty plan"):
        ZOPlan([])


def test_mixed_devices():
    with pytest.raises(ValueError, match="mixes devices"):
        ZOPlan([("a", _w(8)), ("b", torch.empty(8, dtype=torch.bfloat16, device="meta"))])


def test_non_contiguous():
    with pytest.raises(ValueError, match="not contiguous"):
        ZOPlan([("w", _w(8, 4).t())])
    with pytest.raises(ValueError, match="not contiguous"):
        ZOPlan([("w", _w(8, 4)[:, ::2])])


def test_overlapping_tensors():
    base = _w(100)
    with pytest.raises(ValueError, match="overlap in memory"):
        ZOPlan([("x", base[:60]), ("y", base[40:])])
    with pytest.raises(ValueError, match="overlap in memory"):
        ZOPlan([("x", base), ("y", base.view(10, 10))])   # the same storage under two names (tied weights)
    ZOPlan([("x", base[:50]), ("y", base[50:])])          # adjacent, not overlapping: fine


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64])
def test_unsupported_dtypes(dtype):
    t = torch.ones(8, dtype=dtype)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ZOPlan([("w", t)])


def test_not_a_tensor():
    with pytest.raises(TypeError, match="expected a tensor"):
        ZOPlan([[1.0, 2.0]])


def test_duplicate_tensor_ids():
    with pytest.raises(ValueError, match="same tensor id"):
        ZOPlan([PlanEntry("a", _w(8), 5), PlanEntry("b", _w(8, seed=1), 5)])
    with pytest.raises(ValueError, match="same tensor id"):
        ZOPlan([("model.w", _w(8)), ("module.model.w", _w(8, seed=1))])  # wrapper prefixes are canonicalised


def test_tensor_id_range():
    with pytest.raises(ValueError, match="32-bit unsigned"):
        ZOPlan([PlanEntry("a", _w(8), 2 ** 32)])
    with pytest.raises(ValueError, match="32-bit unsigned"):
        ZOPlan([PlanEntry("a", _w(8), -1)])


def test_shard_outside_full_tensor():
    with pytest.raises(ValueError, match="does not fit"):
        ZOPlan([PlanEntry("a", _w(8), 1, global_offset=4, full_numel=10)])
    with pytest.raises(ValueError, match="does not fit"):
        ZOPlan([PlanEntry("a", _w(8), 1, global_offset=-1, full_numel=10)])


def test_non_finite_multipliers():
    for k in ("scale_mult", "lr_mult", "weight_decay", "g_mult"):
        e = PlanEntry("a", _w(8), 1)
        setattr(e, k, math.nan)
        with pytest.raises(ValueError, match=f"{k} must be finite"):
            ZOPlan([e])


def test_bitmask_wrong_size_dtype_device():
    w = _w(20)   # needs 3 bytes
    with pytest.raises(ValueError, match="BitMask needs a 1-D uint8 tensor of 3 bytes"):
        ZOPlan([("w", w)], masks={"w": BitMask(torch.zeros(2, dtype=torch.uint8))})
    with pytest.raises(ValueError, match="BitMask needs a 1-D uint8 tensor of 3 bytes"):
        ZOPlan([("w", w)], masks={"w": BitMask(torch.zeros(3, dtype=torch.int32))})
    with pytest.raises(ValueError, match="BitMask needs a 1-D uint8 tensor"):
        ZOPlan([("w", w)], masks={"w": BitMask(torch.zeros(1, 3, dtype=torch.uint8))})
    with pytest.raises(ValueError, match="is on meta but the weight is on cpu"):
        ZOPlan([("w", w)], masks={"w": BitMask(torch.zeros(3, dtype=torch.uint8, device="meta"))})


def test_rowindex_mask_errors():
    w = _w(6, 10)
    ok = torch.tensor([[0, 3, 9]] * 6, dtype=torch.int32)
    ZOPlan([("w", w)], masks={"w": RowIndexMask(ok)})
    with pytest.raises(ValueError, match=r"RowIndexMask needs int32 \[6, k\]"):
        ZOPlan([("w", w)], masks={"w": RowIndexMask(ok[:5].contiguous())})
    with pytest.raises(ValueError, match=r"RowIndexMask needs int32 \[6, k\]"):
        ZOPlan([("w", w)], masks={"w": RowIndexMask(ok.to(torch.int64))})
    bad = ok.clone()
    bad[2, 2] = 10
    with pytest.raises(ValueError, match="column index out of range"):
        ZOPlan([("w", w)], masks={"w": RowIndexMask(bad)})
    bad = ok.clone()
    bad[4, 0] = -1
    with pytest.raises(ValueError, match="column index out of range"):
        ZOPlan([("w", w)], masks={"w": RowIndexMask(bad)})
    bad = ok.clone()
    bad[1] = torch.tensor([3, 3, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="strictly increasing"):
        ZOPlan([("w", w)], masks={"w": RowIndexMask(bad)})
    with pytest.raises(ValueError, match="needs a 2-D weight"):
        ZOPlan([("v", _w(60))], masks={"v": RowIndexMask(ok)})


def test_threshold_and_unknown_masks():
    with pytest.raises(ValueError, match="tau must be finite and >= 0"):
        ThresholdMask(-1.0)
    with pytest.raises(ValueError, match="tau must be finite and >= 0"):
        ThresholdMask(math.inf)
    with pytest.raises(TypeError, match="unknown mask type"):
        ZOPlan([("w", _w(8))], masks={"w": torch.ones(8, dtype=torch.bool)})  # a dense mask is not accepted


# ---------------------------------------------------------------- ops: nothing is written when an op refuses
@pytest.mark.parametrize("seed", [-1, 2 ** 64, 2 ** 70])
def test_seed_range(plan_and_snapshot, seed):
    plan, untouched = plan_and_snapshot
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        mk.perturb_(plan, seed, 1e-3, backend="reference")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        mk.update_(plan, [1, seed], [0.5, 0.5], lr=1e-3, backend="reference")
    with pytest.raises(ValueError, match=r"restore_seed must be in \[0, 2\*\*64\)"):
        mk.update_(plan, [1], [0.5], lr=1e-3, restore_seed=seed, prior=1e-3, backend="reference")
    with pytest.raises(ValueError, match=r"sr_seed must be in \[0, 2\*\*64\)"):
        mk.update_(plan, [1], [0.5], lr=1e-3, sr_seed=seed, backend="reference")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        mk.perturbed_copy(plan, seed, 1e-3, backend="reference")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        mk.noise(seed, 0, 0, 4, backend="reference")
    assert untouched()


def test_seed_type(plan_and_snapshot):
    plan, untouched = plan_and_snapshot
    for bad in (1.5, "3", True):
        with pytest.raises(TypeError, match="seed must be an int"):
            mk.perturb_(plan, bad, 1e-3, backend="reference")
    assert untouched()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scalars(plan_and_snapshot, bad):
    plan, untouched = plan_and_snapshot
    with pytest.raises(ValueError, match="scale must be finite"):
        mk.perturb_(plan, 1, bad, backend="reference")
    with pytest.raises(ValueError, match="prior must be finite"):
        mk.perturb_(plan, 1, 1e-3, prior=bad, backend="reference")
    with pytest.raises(ValueError, match="lr must be finite"):
        mk.update_(plan, [1], [0.5], lr=bad, backend="reference")
    with pytest.raises(ValueError, match="prior must be finite"):
        mk.update_(plan, [1], [0.5], lr=1e-3, restore_seed=1, prior=bad, backend="reference")
    with pytest.raises(ValueError, match="projected gradient must be finite"):
        mk.update_(plan, [1, 2], [0.5, bad], lr=1e-3, backend="reference")
    with pytest.raises(ValueError, match="scale must be finite"):
        mk.perturbed_copy(plan, 1, bad, backend="reference")
    assert untouched()


def test_unknown_backend_dist_rounding(plan_and_snapshot):
    plan, untouched = plan_and_snapshot
    with pytest.raises(ValueError, match="unknown backend 'numpy'"):
        mk.perturb_(plan, 1, 1e-3, backend="numpy")
    with pytest.raises(ValueError, match="unknown backend 'CUDA'"):
        mk.update_(plan, [1], [0.5], lr=1e-3, backend="CUDA")
    with pytest.raises(ValueError, match="dist must be one of"):
        mk.perturb_(plan, 1, 1e-3, dist="uniform", backend="reference")
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
        mk.update_(plan, [1], [0.5], lr=1e-3, rounding="up", backend="reference")
    assert untouched()


def test_backend_device_mismatch(plan_and_snapshot):
    plan, untouched = plan_and_snapshot
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors"):
        mk.perturb_(plan, 1, 1e-3, backend="cuda")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
            mk.perturb_(plan, 1, 1e-3, backend="triton")
    assert untouched()


@pytest.mark.skipif(mk.has_cpu(), reason="the C++ extension is built here")
def test_missing_cpu_extension_says_how_to_build(plan_and_snapshot):
    plan, untouched = plan_and_snapshot
    with pytest.raises(mk.BackendUnavailable, match="pip install --no-build-isolation"):
        mk.perturb_(plan, 1, 1e-3, backend="cpu")
    assert untouched()


def test_prior_needs_restore_seed(plan_and_snapshot):
    plan, untouched = plan_and_snapshot
    with pytest.raises(ValueError, match="prior != 0 needs the restore_seed"):
        mk.update_(plan, [1], [0.5], lr=1e-3, prior=1e-3, backend="reference")
    assert untouched()


def test_seeds_and_grads_mismatch(plan_and_snapshot):
    plan, untouched = plan_and_snapshot
    with pytest.raises(ValueError, match="2 seeds but 1 projected gradients"):
        mk.update_(plan, [1, 2], [0.5], lr=1e-3, backend="reference")
    with pytest.raises(ValueError, match="1 seeds but 3 projected gradients"):
        mk.update_(plan, [1], torch.tensor([0.5, 0.1, 0.2]), lr=1e-3, backend="reference")
    with pytest.raises(ValueError, match="at least one"):
        mk.update_(plan, [], [], lr=1e-3, backend="reference")
    assert untouched()


def test_bad_grads_tensor(plan_and_snapshot):
    plan, untouched = plan_and_snapshot
    with pytest.raises(TypeError, match="grads must be a floating tensor"):
        mk.update_(plan, [1], torch.tensor([1]), lr=1e-3, backend="reference")
    with pytest.raises(ValueError, match="grads are on meta but the plan is on cpu"):
        mk.update_(plan, [1], torch.empty(1, device="meta"), lr=1e-3, backend="reference")
    assert untouched()


def test_perturbed_copy_bad_out(plan_and_snapshot):
    plan, untouched = plan_and_snapshot
    a, b = (e.tensor for e in plan.entries)
    with pytest.raises(ValueError, match="2 tensors but 1 outputs"):
        mk.perturbed_copy(plan, 1, 1e-3, out=[torch.empty_like(a)], backend="reference")
    with pytest.raises(ValueError, match="must match the weight's shape, dtype and device"):
        mk.perturbed_copy(plan, 1, 1e-3, out=[torch.empty_like(a), torch.empty_like(a)], backend="reference")
    with pytest.raises(ValueError, match="must match the weight's shape, dtype and device"):
        mk.perturbed_copy(plan, 1, 1e-3, out=[torch.empty_like(a, dtype=torch.float32), torch.empty_like(b)],
                          backend="reference")
    with pytest.raises(ValueError, match="must be contiguous"):
        mk.perturbed_copy(plan, 1, 1e-3, out=[torch.empty(16, 64, dtype=a.dtype).t(), torch.empty_like(b)],
                          backend="reference")
    assert untouched()


def test_noise_argument_ranges():
    with pytest.raises(ValueError, match=r"tensor_id must be in \[0, 2\*\*32\)"):
        mk.noise(1, 2 ** 32, 0, 4, backend="reference")
    with pytest.raises(ValueError, match="noise range needs offset"):
        mk.noise(1, 0, -1, 4, backend="reference")
    with pytest.raises(ValueError, match="noise range needs offset"):
        mk.noise(1, 0, 2 ** 62, 4, backend="reference")


def test_update_next_seed_and_scale(plan_and_snapshot):
    """update_(next_seed=...) (op 3): a bad next seed or scale is refused before any write."""
    plan, untouched = plan_and_snapshot
    for kw, exc, msg in ((dict(next_seed=-1), ValueError, r"next_seed must be in \[0, 2\*\*64\)"),
                         (dict(next_seed=2 ** 64), ValueError, "next_seed must be in"),
                         (dict(next_seed=1.5), TypeError, "next_seed must be an int"),
                         (dict(next_seed=3, next_scale=float("nan")), ValueError, "next_scale must be finite")):
        with pytest.raises(exc, match=msg):
            mk.update_(plan, [1], [0.5], lr=1e-3, backend="reference", **kw)
        assert untouched()
