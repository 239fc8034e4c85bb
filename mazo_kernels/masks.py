"""Mask descriptions. None of them is a dense tensor: a rule, packed bits, or per-row column indices."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import reference as ref


@dataclass
class ThresholdMask:
    """Select |theta| < tau (Sparse MeZO). Evaluated by the kernel on the weights at the start of a step.

    In-place passes change theta, and no rule evaluated on a perturbed value can tell every selected element
    from every unselected one (docs/NOISE_SPEC.md, "Threshold masks"). So the first pass of a step latches
    its selection into 1 bit per element and the step's later passes read the latch.
    """
    tau: float

    def __post_init__(self):
        if not math.isfinite(self.tau) or self.tau < 0:
            raise ValueError(f"ThresholdMask: tau must be finite and >= 0, got {self.tau}")


@dataclass
class BitMask:
    """Packed selection: bit i % 8 of byte i // 8 (little-endian bit order). uint8, ceil(numel / 8) bytes."""
    bits: torch.Tensor

    @staticmethod
    def from_bool(sel: torch.Tensor) -> "BitMask":
        return BitMask(ref.pack_bits(sel.detach().cpu()).to(sel.device))


@dataclass
class RowIndexMask:
    """For a 2-D weight [rows, cols] viewed row-major: int32 [rows, k] sorted, distinct column indices per row."""
    cols: torch.Tensor


def validate_mask(name: str, mask, t: torch.Tensor) -> None:
    if mask is None or isinstance(mask, ThresholdMask):
        return
    if isinstance(mask, BitMask):
        b = mask.bits
        if b.dtype != torch.uint8 or b.dim() != 1 or b.numel() != (t.numel() + 7) // 8:
            raise ValueError(f"mask for {name!r}: BitMask needs a 1-D uint8 tensor of {(t.numel() + 7) // 8} bytes "
                             f"for {t.numel()} elements, got {tuple(b.shape)} {b.dtype}")
        if b.device != t.device:
            raise ValueError(f"mask for {name!r} is on {b.device} but the weight is on {t.device}")
        if not b.is_contiguous():
            raise ValueError(f"mask for {name!r} must be contiguous")
        return
    if isinstance(mask, RowIndexMask):
        c = mask.cols
        if t.dim() != 2:
            raise ValueError(f"mask for {name!r}: RowIndexMask needs a 2-D weight, got shape {tuple(t.shape)}")
        if c.dtype != torch.int32 or c.dim() != 2 or c.shape[0] != t.shape[0]:
            raise ValueError(f"mask for {name!r}: RowIndexMask needs int32 [{t.shape[0]}, k], got "
                             f"{tuple(c.shape)} {c.dtype}")
        if c.device != t.device:
            raise ValueError(f"mask for {name!r} is on {c.device} but the weight is on {t.device}")
        if not c.is_contiguous():
            raise ValueError(f"mask for {name!r} must be contiguous")
        if c.numel():
            cc = c.cpu()
            if int(cc.min()) < 0 or int(cc.max()) >= t.shape[1]:
                raise ValueError(f"mask for {name!r}: column index out of range [0, {t.shape[1]})")
            if c.shape[1] > 1 and not bool((cc[:, 1:] > cc[:, :-1]).all()):
                raise ValueError(f"mask for {name!r}: column indices must be strictly increasing in each row")
        return
    raise TypeError(f"mask for {name!r}: unknown mask type {type(mask).__name__}")
