"""Public functional API: perturb_, update_, perturbed_copy, noise. Validation happens here, before any write."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _backends
from . import reference as ref
from .ops import zo_apply_
from .plan import PlanEntry, ZOPlan

_DISTS = {"gaussian": ref.DIST_GAUSSIAN, "rademacher": ref.DIST_RADEMACHER, "gaussian_fast": ref.DIST_GAUSSIAN_FAST}
_ROUNDINGS = {"nearest": ref.ROUND_NEAREST, "stochastic": ref.ROUND_STOCHASTIC}


def _seed_bits(seed, what="seed") -> int:
    if isinstance(seed, torch.Tensor):
        if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool or seed.numel() != 1:
            raise TypeError(f"{what} must be an int in [0, 2**64) or a one-element integer tensor, got {seed.dtype} "
                            f"tensor of shape {tuple(seed.shape)}")
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{what} must be an int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"{what} must be in [0, 2**64), got {seed}")
    return seed - 2 ** 64 if seed >= 2 ** 63 else seed  # carried as int64 bits through the schema


def _finite(x, what) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {x}")
    return x


def _dist(dist) -> int:
    if dist not in _DISTS:
        raise ValueError(f"dist must be one of {sorted(_DISTS)}, got {dist!r}")
    return _DISTS[dist]


def perturb_(plan: ZOPlan, seed: int, scale: float, *, prior: float = 0.0, dist: str = "gaussian",
             backend: str = "auto") -> None:
    """theta <- rne(base + scale * m * z(seed)), base = theta, or, when the weights currently carry
    prior * z(seed), base = rne(theta - prior * z(seed)) (the rounding inverted: see the spec)."""
    seed = _seed_bits(seed)
    scale, prior = _finite(scale, "scale"), _finite(prior, "prior")
    d = _dist(dist)
    b = _backends.resolve(backend, plan.device)
    _backends.require(b)
    mode = ref.THRESH_LATCH_WRITE if prior == 0.0 else ref.THRESH_LATCH_READ
    for g in plan.groups:
        gs = torch.zeros(0, dtype=torch.float32, device=plan.device)
        zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, [seed], gs, ref.OP_PERTURB, d, ref.ROUND_NEAREST, 0,
                  mode, scale, prior, 0.0, b, dense_aligned=g.dense_aligned)


def update_(plan: ZOPlan, seeds: Sequence[int], grads, *, lr: float, restore_seed: int | None = None,
            prior: float = 0.0, rounding: str = "stochastic", sr_seed: int = 0, dist: str = "gaussian",
            backend: str = "auto", next_seed: int | None = None, next_scale: float = 0.0) -> None:
    """Fused restore + ZO-SGD: base as in perturb_ (restore_seed, prior), then
    theta <- round(base - lr * lr_mult * (sum_k g_k * g_mult * m * z(seeds[k]) + wd * base)).

    grads: floats or a float32 tensor of len(seeds) on the plan's device (no host sync needed).
    next_seed: also apply the next ZO step's first perturbation in the same pass, bit for bit
        perturb_(plan, next_seed, next_scale) after this update (op 3; one pass where the backend fuses it)."""
    seeds = [_seed_bits(s) for s in seeds]
    if not seeds:
        raise ValueError("update_ needs at least one (seed, g) pair")
    lr, prior = _finite(lr, "lr"), _finite(prior, "prior")
    if restore_seed is None:
        if prior != 0.0:
            raise ValueError("prior != 0 needs the restore_seed whose noise the weights carry")
        restore_seed = 0
    rs = _seed_bits(restore_seed, "restore_seed")
    srs = _seed_bits(sr_seed, "sr_seed")
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    d = _dist(dist)
    if isinstance(grads, torch.Tensor):
        gs = grads.reshape(-1)
        if not gs.is_floating_point():
            raise TypeError(f"grads must be a floating tensor, got {gs.dtype}")
        if gs.device != plan.device:
            raise ValueError(f"grads are on {gs.device} but the plan is on {plan.device}")
        gs = gs.to(torch.float32).contiguous()
    else:
        gs = torch.tensor([_finite(g, "projected gradient") for g in grads], dtype=torch.float32,
                          device=plan.device)
    if gs.numel() != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {gs.numel()} projected gradients")
    op, tail, next_scale = ref.OP_UPDATE, [], _finite(next_scale, "next_scale")
    if next_seed is not None:
        op, tail = ref.OP_UPDATE_PERTURB, [_seed_bits(next_seed, "next_seed")]
    b = _backends.resolve(backend, plan.device)
    _backends.require(b)
    mode = ref.THRESH_LATCH_READ if prior != 0.0 else ref.THRESH_EVAL
    for g in plan.groups:
        zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, [rs] + seeds + tail, gs, op, d, _ROUNDINGS[rounding],
                  srs, mode, next_scale, prior, lr, b, dense_aligned=g.dense_aligned)


def perturbed_copy(entry: PlanEntry | ZOPlan, seed: int, scale: float, *, out=None, dist: str = "gaussian",
                   backend: str = "auto"):
    """out <- rne(theta + scale * m * z(seed)); theta is not touched (the transient mode). Returns out(s)."""
    plan = entry if isinstance(entry, ZOPlan) else ZOPlan([entry])
    seed = _seed_bits(seed)
    scale = _finite(scale, "scale")
    d = _dist(dist)
    b = _backends.resolve(backend, plan.device)
    _backends.require(b)
    if out is None:
        out = [torch.empty_like(e.tensor) for e in plan.entries]
    elif isinstance(out, torch.Tensor):
        out = [out]
    if len(out) != len(plan.entries):
        raise ValueError(f"{len(plan.entries)} tensors but {len(out)} outputs")
    for e, o in zip(plan.entries, out):
        if o.shape != e.tensor.shape or o.dtype != e.tensor.dtype or o.device != e.tensor.device:
            raise ValueError(f"output for {e.name!r} must match the weight's shape, dtype and device")
        if not o.is_contiguous():
            raise ValueError(f"output for {e.name!r} must be contiguous")
    index = {id(e): i for i, e in enumerate(plan.entries)}
    for g in plan.groups:
        gouts = [out[index[id(e)]] for e in g.entries]
        gs = torch.zeros(0, dtype=torch.float32, device=plan.device)
        zo_apply_(g.tensors, gouts, g.masks, g.meta, g.fvals, [seed], gs, ref.OP_COPY, d, ref.ROUND_NEAREST, 0,
                  ref.THRESH_EVAL, scale, 0.0, 0.0, b, dense_aligned=g.dense_aligned)
    return out[0] if isinstance(entry, PlanEntry) else out


def noise(seed: int, tensor_id: int, offset: int, n: int, *, dist: str = "gaussian", device="cpu",
          backend: str = "auto") -> torch.Tensor:
    """Materialised z[offset : offset + n] of tensor tensor_id under seed, float32 (for tests and other libraries).

    Computed as perturbed_copy of a zero tensor with scale 1, so every backend's noise() is its kernels' noise."""
    if not 0 <= int(tensor_id) < 2 ** 32:
        raise ValueError(f"tensor_id must be in [0, 2**32), got {tensor_id}")
    if offset < 0 or n < 0 or offset + n >= 2 ** 62:
        raise ValueError(f"noise range needs offset >= 0, n >= 0 and offset + n < 2**62; got offset={offset} n={n}")
    zeros = torch.zeros(n, dtype=torch.float32, device=device)
    e = PlanEntry("noise", zeros, int(tensor_id), global_offset=offset, full_numel=offset + n)
    return perturbed_copy(e, seed, 1.0, dist=dist, backend=backend)
