"""Sparse MeZO masks: per-tensor magnitude thresholds fixed from the initial weights.

Sparse MeZO perturbs and updates only the small weights. ``sparsity`` s is the fraction of each tensor, the largest
in |θ|, that is frozen. The threshold is computed once, here; the kernels evaluate |float32(θ)| < tau on every step
(docs/API.md, ThresholdMask), so a frozen weight is never written and stays frozen, while a trained weight that
grows past tau becomes frozen from the next step on. docs/MASKS.md states the rule and its ties exactly.
"""
from __future__ import annotations

import math

import torch

from .importance import select_weights
from .mask_builder import MaskDict, MaskInfo
from .masks import ThresholdMask

# tau when nothing is frozen: |w| < FLT_MAX holds for every finite float32, bf16 and fp16 value, now and later.
TAU_ALL = float(torch.finfo(torch.float32).max)


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0 <= sparsity < 1):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def frozen_count(numel: int, sparsity) -> int:
    """Elements to freeze: floor(s·n + ½), the nearest integer to s·n with halves frozen (computed in float64)."""
    return min(numel, math.floor(check_sparsity(sparsity) * numel + 0.5))


def magnitude_threshold(w: torch.Tensor, sparsity) -> float:
    """tau such that |float32(w)| < tau selects the numel - frozen_count smallest magnitudes (up to ties).

    With n_sel = numel - frozen_count(numel, s): tau = the (n_sel+1)-th smallest of |float32(w)| (kthvalue, exact:
    an order statistic, no interpolation), i.e. the smallest frozen magnitude. tau is a float32 value, so the
    kernels' float32 comparison sees it unrounded. Every element equal to tau is frozen: when ties straddle the
    boundary, fewer than n_sel elements are selected, never more. With nothing frozen (s·n < ½), tau = FLT_MAX.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"magnitude_threshold needs a floating tensor, got {type(w).__name__}")
    n = w.numel()
    if n == 0:
        raise ValueError("magnitude_threshold: empty tensor")
    n_frozen = frozen_count(n, sparsity)
    if n_frozen == 0:
        return TAU_ALL
    a = w.detach().reshape(-1).to(torch.float32).abs()
    if not bool(torch.isfinite(a).all()):
        raise ValueError("weights contain NaN or infinity; no magnitude threshold is meaningful")
    return float(torch.kthvalue(a, n - n_frozen + 1).values)


def sparse_mezo_masks(named_params_or_module, sparsity, *, names=None, include=None, exclude=None, dims=(2,),
                      exclude_embeddings=False) -> MaskDict:
    """{name: ThresholdMask(tau)} for each selected weight, tau from magnitude_threshold(weight, sparsity).

    named_params_or_module: an nn.Module, or (name, tensor) pairs / a dict (names must match what the plan or
      optimizer will use, e.g. model.named_parameters()).
    sparsity: in [0, 1): the fraction of each tensor (largest |θ|) that is frozen.
    names / include / exclude / exclude_embeddings: as in importance.select_weights.
    dims: ranks that get masks; default (2,) = weight matrices only. (1, 2) also masks norms and biases.
      Weights left out get no mask, so a plan trains them densely; freeze them (requires_grad=False) if they should
      not train at all.
    The returned MaskDict's info[name] records shape, target sparsity and the selected count at construction.
    """
    check_sparsity(sparsity)
    dims = tuple(dims)
    if not dims or not all(isinstance(d, int) and d >= 1 for d in dims):
        raise ValueError(f"dims must be a tuple of tensor ranks >= 1, got {dims!r}")
    chosen = select_weights(named_params_or_module, names=names, include=include, exclude=exclude, dims=dims,
                            exclude_embeddings=exclude_embeddings, what="sparse_mezo_masks")
    out = MaskDict()
    for name, w in chosen.items():
        tau = magnitude_threshold(w, sparsity)
        selected = int((w.detach().to(torch.float32).abs() < torch.tensor(tau, dtype=torch.float32,
                                                                          device=w.device)).sum())
        out[name] = ThresholdMask(tau)
        out.info[name] = MaskInfo("threshold", tuple(w.shape), float(sparsity), selected, None)
    return out
