"""The torch.library op. One schema; the backend argument picks the implementation."""
from __future__ import annotations

import torch

from . import _backends


@torch.library.custom_op("mazo_kernels::zo_apply_", mutates_args=("params", "outs", "masks"))
def zo_apply_(params: list[torch.Tensor], outs: list[torch.Tensor], masks: list[torch.Tensor],
              meta: torch.Tensor, fvals: torch.Tensor, seeds: list[int], gs: torch.Tensor, op: int, dist: int,
              rounding: int, sr_seed: int, threshold_mode: int, scale: float, prior: float, lr: float,
              backend: str) -> None:
    fn = _backends.kernel(backend)
    outs_ = list(outs) if len(outs) else list(params)
    if backend == "reference":
        fn(params, outs_, masks, meta, fvals, [s & (2 ** 64 - 1) for s in seeds], gs, op, dist, rounding,
           sr_seed & (2 ** 64 - 1), threshold_mode, scale, prior, lr)
    else:
        fn(params, list(outs), masks, meta, fvals, seeds, gs, op, dist, rounding, sr_seed, threshold_mode,
           scale, prior, lr)


@zo_apply_.register_fake
def _(params, outs, masks, meta, fvals, seeds, gs, op, dist, rounding, sr_seed, threshold_mode, scale, prior, lr,
      backend):
    return None
