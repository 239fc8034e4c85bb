"""ZOPlan: the small table that lets one launch per pass per dtype cover any number of tensors."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import reference as ref
from .masks import BitMask, RowIndexMask, ThresholdMask, validate_mask

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.",
                     "base_model.model.")


def canonical_name(name: str) -> str:
    """Drop the prefixes that DDP, torch.compile, FSDP, activation checkpointing and PEFT add."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
        for p in _WRAPPER_PREFIXES:
            name, n = name.replace("." + p, "."), name.count("." + p)
            changed = changed or n > 0
    return name


def stable_tensor_id(name: str) -> int:
    """32-bit FNV-1a of the canonical parameter name: survives save/load, re-creation and wrapping."""
    h = 0x811C9DC5
    for byte in canonical_name(name).encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


@dataclass
class PlanEntry:
    name: str
    tensor: torch.Tensor
    tensor_id: int
    global_offset: int = 0
    full_numel: int | None = None
    mask: object = None
    scale_mult: float = 1.0
    lr_mult: float = 1.0
    weight_decay: float = 0.0
    g_mult: float = 1.0


@dataclass
class PlanGroup:
    """Tensors of one dtype on one device, described by device-side tables."""
    entries: list
    tensors: list
    masks: list
    meta: torch.Tensor    # int64 [T, 4]: tensor_id, global_offset, mask_kind, row_len
    fvals: torch.Tensor   # float32 [T, 5]: scale_mult, lr_mult, weight_decay, g_mult, tau
    # every tensor unmasked at a global offset that is a multiple of 8: the promise zo_apply_'s dense_aligned makes
    dense_aligned: bool = False

    @property
    def dtype(self):
        return self.tensors[0].dtype

    @property
    def has_threshold(self):
        return any(isinstance(e.mask, ThresholdMask) for e in self.entries)


def _ranges_overlap(tensors, names):
    spans = []
    for t, n in zip(tensors, names):
        if t.numel() == 0:
            continue
        start = t.data_ptr()
        spans.append((start, start + t.numel() * t.element_size(), n))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"tensors {n0!r} and {n1!r} overlap in memory; a plan needs distinct storage "
                             "(tied weights: include the shared tensor once)")


class ZOPlan:
    """Describe the trainable tensors once; every pass of every step reuses the description.

    params: an iterable of tensors, of (name, tensor) pairs, or of PlanEntry. Names give stable ids
    (stable_tensor_id); bare tensors get ids from their position, which is stable only while the list is.
    """

    def __init__(self, params, *, masks: dict | None = None):
        entries = []
        for i, p in enumerate(params):
            if isinstance(p, PlanEntry):
                e = p
            elif isinstance(p, tuple):
                name, t = p
                e = PlanEntry(name, t, stable_tensor_id(name))
            elif isinstance(p, torch.Tensor):
                e = PlanEntry(f"param{i}", p, stable_tensor_id(f"param{i}"))
            else:
                raise TypeError(f"plan entry {i}: expected a tensor, (name, tensor) or PlanEntry, got {type(p).__name__}")
            if masks and e.name in masks:
                e.mask = masks[e.name]
            entries.append(e)
        if not entries:
            raise ValueError("empty plan: no tensors given")
        self.entries = entries
        self._validate()
        self.groups = self._build_groups()

    def _validate(self):
        for e in self.entries:
            if not isinstance(e.tensor, torch.Tensor):
                raise TypeError(f"{e.name!r} is not a tensor (got {type(e.tensor).__name__})")
        devices = {e.tensor.device for e in self.entries}
        if len(devices) > 1:
            raise ValueError(f"plan mixes devices {sorted(map(str, devices))}; build one plan per device")
        ids = {}
        for e in self.entries:
            t = e.tensor
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{e.name!r} is not a tensor")
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{e.name!r} has dtype {t.dtype}; ZO kernels take float32, float16 or bfloat16 weights")
            if not t.is_contiguous():
                raise ValueError(f"{e.name!r} is not contiguous; call .contiguous() on the parameter's data first")
            if not (0 <= e.tensor_id < 2 ** 32):
                raise ValueError(f"{e.name!r}: tensor_id must be a 32-bit unsigned integer, got {e.tensor_id}")
            if e.tensor_id in ids:
                raise ValueError(f"{e.name!r} and {ids[e.tensor_id]!r} have the same tensor id {e.tensor_id}")
            ids[e.tensor_id] = e.name
            full = t.numel() if e.full_numel is None else e.full_numel
            if e.global_offset < 0 or e.global_offset + t.numel() > full or full >= 2 ** 62:
                raise ValueError(f"{e.name!r}: shard [{e.global_offset}, {e.global_offset + t.numel()}) does not fit "
                                 f"in a full tensor of {full} elements")
            for k in ("scale_mult", "lr_mult", "weight_decay", "g_mult"):
                if not math.isfinite(getattr(e, k)):
                    raise ValueError(f"{e.name!r}: {k} must be finite")
            validate_mask(e.name, e.mask, t)
        _ranges_overlap([e.tensor for e in self.entries], [e.name for e in self.entries])

    def _build_groups(self):
        device = self.entries[0].tensor.device
        groups = []
        for dtype in SUPPORTED_DTYPES:
            es = [e for e in self.entries if e.tensor.dtype == dtype]
            if not es:
                continue
            meta, fvals, masks = [], [], []
            for e in es:
                kind, row_len, tau = ref.MASK_NONE, 0, 0.0
                m = torch.empty(0, dtype=torch.uint8, device=device)
                if isinstance(e.mask, ThresholdMask):
                    kind, tau = ref.MASK_THRESHOLD, e.mask.tau
                    m = torch.zeros((e.tensor.numel() + 7) // 8, dtype=torch.uint8, device=device)  # the latch
                elif isinstance(e.mask, BitMask):
                    kind, m = ref.MASK_BITMASK, e.mask.bits
                elif isinstance(e.mask, RowIndexMask):
                    kind, m, row_len = ref.MASK_ROWIDX, e.mask.cols, e.tensor.shape[1]
                meta.append([e.tensor_id, e.global_offset, kind, row_len])
                fvals.append([e.scale_mult, e.lr_mult, e.weight_decay, e.g_mult, tau])
                masks.append(m)
            dense_aligned = all(row[2] == ref.MASK_NONE and row[1] % 8 == 0 for row in meta)
            groups.append(PlanGroup(es, [e.tensor for e in es], masks,
                                    torch.tensor(meta, dtype=torch.int64, device=device),
                                    torch.tensor(fvals, dtype=torch.float32, device=device), dense_aligned))
        return groups

    @property
    def device(self):
        return self.entries[0].tensor.device

    def __len__(self):
        return len(self.entries)

    @classmethod
    def from_module(cls, module: torch.nn.Module, *, masks: dict | None = None, trainable_only: bool = True):
        """One entry per distinct parameter (tied weights appear once, under their first name)."""
        seen, params = set(), []
        for name, p in module.named_parameters():
            if (trainable_only and not p.requires_grad) or id(p) in seen:
                continue
            seen.add(id(p))
            params.append((name, p.data))
        return cls(params, masks=masks)
