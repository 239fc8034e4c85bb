"""The torch.library op. One schema; the backend argument picks the implementation."""
from __future__ import annotations

from typing import Optional

import torch

from . import _backends


@torch.library.custom_op("mazo_kernels::zo_apply_", mutates_args=("params", "outs", "masks"))
def zo_apply_(params: list[torch.Tensor], outs: list[torch.Tensor], masks: list[torch.Tensor],
              meta: torch.Tensor, fvals: torch.Tensor, seeds: list[int], gs: torch.Tensor, op: int, dist: int,
              rounding: int, sr_seed: int, threshold_mode: int, scale: float, prior: float, lr: float,
              backend: str, seed_dev: Optional[torch.Tensor] = None, dense_aligned: bool = False) -> None:
    """seed_dev: None, or an int64 tensor of len(seeds) + 1 values (the seeds, then sr_seed; uint64 bits) on the
    params' device that the kernels read in place of `seeds` and `sr_seed`, so that a captured CUDA graph replays
    with the seeds written there before each replay. `seeds` then gives the count, and must have the same equality
    pattern as the values (a backend may specialise on seeds[1] == seeds[0]).

    dense_aligned: the caller's promise that every tensor is unmasked (mask kind none in `meta`) at a global offset
    that is a multiple of 8 (plans compute it: PlanGroup.dense_aligned). The CUDA backend then runs kernels without
    the masked and unaligned paths (fewer registers, same bits) where the tensors are also 16-byte aligned and a
    multiple of 8 long. A broken promise is an error: the CPU backend raises before writing, a CUDA kernel stops with
    a device-side trap; Triton and the reference ignore the flag.

    op 3 (update then perturb, in place): seeds = [restore, update..., next]; update_ with seeds[:-1], then the next
    step's first perturbation (scale, prior 0, threshold latch written) with seeds[-1], fused into one pass where the
    backend can (reference.zo_apply_ defines it as the two ops)."""
    if seed_dev is not None:
        if seed_dev.dtype != torch.int64 or seed_dev.dim() != 1 or seed_dev.numel() < len(seeds) + 1:
            raise ValueError(f"seed_dev must be a 1-D int64 tensor of at least len(seeds) + 1 = {len(seeds) + 1} "
                             f"values, got {seed_dev.dtype} of shape {tuple(seed_dev.shape)}")
        if params and seed_dev.device != params[0].device:
            raise ValueError(f"seed_dev is on {seed_dev.device} but the params are on {params[0].device}")
    if op == 3:  # reference.OP_UPDATE_PERTURB
        if len(seeds) < 3:
            raise ValueError(f"op 3 (update then perturb) needs seeds [restore, update..., next]: at least 3, "
                             f"got {len(seeds)}")
        if len(outs):
            raise ValueError("op 3 (update then perturb) is in place only: outs must be empty")
    if backend == "fastest":   # cuda or triton, per pass: the same bits, the time measured smaller
        backend = _backends.pass_backend(op, dist, prior, params[0].dtype, masks) if len(params) else "cuda"
    fn = _backends.kernel(backend)
    outs_ = list(outs) if len(outs) else list(params)
    if backend == "reference":
        if seed_dev is not None:
            vals = [int(v) & (2 ** 64 - 1) for v in seed_dev[:len(seeds) + 1].tolist()]
            seeds, sr_seed = vals[:-1], vals[-1]
        fn(params, outs_, masks, meta, fvals, [s & (2 ** 64 - 1) for s in seeds], gs, op, dist, rounding,
           sr_seed & (2 ** 64 - 1), threshold_mode, scale, prior, lr)
    elif backend == "triton":
        fn(params, list(outs), masks, meta, fvals, seeds, gs, op, dist, rounding, sr_seed, threshold_mode,
           scale, prior, lr, seed_dev=seed_dev)
    else:
        fn(params, list(outs), masks, meta, fvals, seeds, gs, op, dist, rounding, sr_seed, threshold_mode,
           scale, prior, lr, seed_dev, dense_aligned)


@zo_apply_.register_fake
def _(params, outs, masks, meta, fvals, seeds, gs, op, dist, rounding, sr_seed, threshold_mode, scale, prior, lr,
      backend, seed_dev=None, dense_aligned=False):
    return None
