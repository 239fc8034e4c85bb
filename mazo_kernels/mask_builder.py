"""MaZO masks (top-k per row of the summed row-normalised task scores) and the one-file mask format.

docs/MASKS.md has the formulas, the tie rules and the file layout.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from .importance import ActivationScorer, GradientScorer, combine_task_scores
from .masks import BitMask, RowIndexMask, ThresholdMask

KINDS = ("threshold", "bits", "rows")
FILE_FORMAT = "mazo_kernels.masks"
FILE_VERSION = 1
_ROW_CHUNK_ELEMS = 1 << 24   # rows sorted at once: bounds the transient sort buffers (~200 MB)


@dataclass
class MaskInfo:
    """What a mask was built for. ``selected / numel`` is the density actually obtained.

    kind: "threshold" | "bits" | "rows"; shape: the weight's shape (None when unknown); target: the requested
    sparsity (threshold) or density (bits/rows); selected: selected elements when built; k: per-row count (MaZO).
    """
    kind: str
    shape: tuple | None = None
    target: float | None = None
    selected: int | None = None
    k: int | None = None

    @property
    def numel(self):
        return None if self.shape is None else math.prod(self.shape)

    @property
    def density(self):
        n = self.numel
        return None if n is None or self.selected is None or n == 0 else self.selected / n


class MaskDict(dict):
    """{name: mask}, usable wherever a masks dict is (ZOPlan, ZOSGD), plus ``info[name]``: a MaskInfo."""

    def __init__(self, *args, info=None, **kw):
        super().__init__(*args, **kw)
        self.info = dict(info or {})


def mask_kind(mask) -> str:
    if isinstance(mask, ThresholdMask):
        return "threshold"
    if isinstance(mask, BitMask):
        return "bits"
    if isinstance(mask, RowIndexMask):
        return "rows"
    raise TypeError(f"unknown mask type {type(mask).__name__}")


# ---------------------------------------------------------------------------------------------------- top-k
def check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0 < density <= 1):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def density_to_k(density, n_cols: int) -> int:
    """k = floor(density·n_cols + ½) (nearest, halves up), at least 1 so that no row is frozen whole."""
    density = check_density(density)
    return min(n_cols, max(1, math.floor(density * n_cols + 0.5)))


def topk_columns(score: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [rows, k]: each row's k highest scores, ascending column order.

    Ties are broken towards the lower column index (a stable descending sort), so the result is a function of the
    scores alone, on every device. Rows are sorted in chunks to bound the transient memory.
    """
    if score.dim() != 2:
        raise ValueError(f"scores must be 2-D [rows, cols], got shape {tuple(score.shape)}")
    rows, cols = score.shape
    if not 1 <= k <= cols:
        raise ValueError(f"k must be in [1, {cols}], got {k}")
    if not bool(torch.isfinite(score).all()):
        raise ValueError("scores contain NaN or infinity")
    out = torch.empty((rows, k), dtype=torch.int32, device=score.device)
    step = max(1, _ROW_CHUNK_ELEMS // max(1, cols))
    for r0 in range(0, rows, step):
        chunk = score[r0:r0 + step].to(torch.float32)
        idx = torch.sort(chunk, dim=1, descending=True, stable=True).indices[:, :k]
        out[r0:r0 + step] = idx.sort(dim=1).values.to(torch.int32)
    return out


def _pack_rows(cols_idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Packed bits (bit i % 8 of byte i // 8) of the selection given by per-row column indices."""
    rows = cols_idx.shape[0]
    n = rows * n_cols
    out = torch.zeros((n + 7) // 8, dtype=torch.uint8, device=cols_idx.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=cols_idx.device)
    # chunks of 8·m rows start on a byte boundary whatever n_cols is
    step = 8 * max(1, _ROW_CHUNK_ELEMS // (8 * max(1, n_cols)))
    for r0 in range(0, rows, step):
        c = cols_idx[r0:r0 + step].to(torch.int64)
        sel = torch.zeros((c.shape[0], n_cols), dtype=torch.uint8, device=c.device)
        sel.scatter_(1, c, 1)
        flat = sel.reshape(-1)
        m = flat.numel()
        pad = (-m) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        packed = (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)
        b0 = r0 * n_cols // 8
        out[b0:b0 + packed.numel()] = packed
    return out


def mask_bytes(kind: str, rows: int, cols: int, k: int) -> int:
    """Device bytes of a MaZO mask: packed bits ceil(rows·cols/8), row indices 4·rows·k."""
    return (rows * cols + 7) // 8 if kind == "bits" else 4 * rows * k


def choose_format(rows: int, cols: int, k: int) -> str:
    """The smaller of the two; bits on a tie. Row indices win when 32·k < cols, i.e. density below ~1/32."""
    return "rows" if mask_bytes("rows", rows, cols, k) < mask_bytes("bits", rows, cols, k) else "bits"


def mask_from_scores(score: torch.Tensor, density, *, format="auto", device=None):
    """(mask, MaskInfo) for one weight from its combined score [rows, cols]."""
    if format not in ("auto", "bits", "rows"):
        raise ValueError(f"format must be 'auto', 'bits' or 'rows', got {format!r}")
    if score.dim() != 2:
        raise ValueError(f"MaZO masks are per row and need 2-D scores, got shape {tuple(score.shape)}")
    rows, cols = score.shape
    k = density_to_k(density, cols)
    kind = choose_format(rows, cols, k) if format == "auto" else format
    idx = topk_columns(score, k)
    device = score.device if device is None else torch.device(device)
    if kind == "rows":
        mask = RowIndexMask(idx.to(device).contiguous())
    else:
        mask = BitMask(_pack_rows(idx, cols).to(device).contiguous())
    return mask, MaskInfo(kind, (rows, cols), float(density), rows * k, k)


# ---------------------------------------------------------------------------------------------------- MaZO
def mazo_masks(scorer_or_scores, density, *, names=None, format="auto", device=None, sort_device=None) -> MaskDict:
    """Top-k-per-row masks from a scorer (GradientScorer / ActivationScorer) or from scores.

    scorer_or_scores: a scorer with at least one task scored, or a dict {name: combined score [rows, cols]}, or a
      dict {name: [S_task0, S_task1, ...]} of raw per-task scores (combined here: row-normalised, summed).
    density: fraction of each row to keep, in (0, 1]; k = density_to_k(density, cols).
    names: the subset to build (default all); an unknown name is a ValueError.
    format: "auto" (smaller in bytes, docs/MASKS.md), "bits" (BitMask) or "rows" (RowIndexMask).
    device: where the masks go; default the scored weight's device (a scorer) or the scores' device (a dict).
    sort_device: where the per-row sort runs (default: where the scores are). Host accumulators with
      sort_device="cuda" move one weight's scores at a time to the GPU (a 4096x11008 weight: ~6 s on 2 CPU cores).
    One weight at a time: the transient memory is one weight's scores plus the sort buffers of a row chunk.
    """
    check_density(density)
    if isinstance(scorer_or_scores, Mapping):
        src = dict(scorer_or_scores)
        all_names = list(src)

        def get(n):
            v = src[n]
            if isinstance(v, torch.Tensor):
                return v, v.device
            v = list(v)
            if not v or not all(isinstance(t, torch.Tensor) for t in v):
                raise TypeError(f"scores for {n!r}: expected a tensor or a list of per-task tensors")
            return combine_task_scores(v), v[0].device
    elif hasattr(scorer_or_scores, "combined_score") and hasattr(scorer_or_scores, "names"):
        sc = scorer_or_scores
        all_names = list(sc.names)

        def get(n):
            return sc.combined_score(n), sc.param(n).device
    else:
        raise TypeError("mazo_masks takes a scorer (GradientScorer, ActivationScorer) or a dict of scores, got "
                        f"{type(scorer_or_scores).__name__}")
    if names is None:
        names = all_names
    else:
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in all_names:
                raise ValueError(f"unknown parameter name {n!r}: no scores for it")
    out = MaskDict()
    for n in names:
        s, dev = get(n)
        if sort_device is not None:
            s = s.to(sort_device)
        if s.dim() != 2:
            raise ValueError(f"scores for {n!r} have shape {tuple(s.shape)}; MaZO masks need 2-D weights")
        mask, info = mask_from_scores(s, density, format=format, device=dev if device is None else device)
        out[n] = mask
        out.info[n] = info
    return out


def build_mazo_masks(model, task_batches: Mapping, density, *, scorer="gradient", alpha=1.0, beta=0.0,
                     loss_fn=None, forward_fn=None, format="auto", names=None, include=None, exclude=None,
                     exclude_embeddings=True, device="cpu", dtype=torch.float32, sort_device=None) -> MaskDict:
    """Score every task in ``task_batches`` ({task: iterable of batches}) and build the masks in one call.

    scorer="gradient": GradientScorer(model, alpha, beta, device=device, dtype=dtype), loss_fn as in score_task.
    scorer="activation": ActivationScorer(model) with forward_fn (alpha, beta, device, dtype do not apply).
    """
    if not isinstance(task_batches, Mapping) or not task_batches:
        raise ValueError("task_batches must be a non-empty dict {task_name: batches}")
    check_density(density)
    if scorer == "gradient":
        sc = GradientScorer(model, alpha, beta, device=device, dtype=dtype, names=names, include=include,
                            exclude=exclude, exclude_embeddings=exclude_embeddings)
        for task, batches in task_batches.items():
            sc.score_task(batches, loss_fn, task=task)
    elif scorer == "activation":
        sc = ActivationScorer(model, names=names, include=include, exclude=exclude,
                              exclude_embeddings=exclude_embeddings)
        for task, batches in task_batches.items():
            sc.score_task(batches, forward_fn, task=task)
    else:
        raise ValueError(f"scorer must be 'gradient' or 'activation', got {scorer!r}")
    return mazo_masks(sc, density, format=format, sort_device=sort_device)


# ---------------------------------------------------------------------------------------------------- files
def _header_entry(name, mask, info):
    kind = mask_kind(mask)
    e = {"kind": kind}
    if info is not None:
        if info.kind != kind:
            raise ValueError(f"info for {name!r} says {info.kind!r} but the mask is {kind!r}")
        d = asdict(info)
        d.pop("kind")
        d["shape"] = None if info.shape is None else [int(x) for x in info.shape]
        e.update(d)
    if kind == "threshold":
        e["tau"] = float(mask.tau)
    return e


def save_masks(path, masks: Mapping, *, shapes: Mapping | None = None, format=None) -> None:
    """Write masks to one file: safetensors when installed (format="safetensors"), else torch.save ("torch").

    Tensors: "<name>/bits" (uint8) or "<name>/cols" (int32), on CPU. Header (JSON; the safetensors metadata key
    "mazo_kernels.masks", or the "header" entry of the torch file): {"format", "version", "masks": {name: {"kind",
    "shape", "target", "selected", "k", "tau"}}}. tau is written as a JSON number, which round-trips a Python float
    exactly. ``shapes`` fills in the weight shapes of masks that did not come from this package's builders.
    """
    if format is None:
        format = "safetensors" if _have_safetensors() else "torch"
    if format not in ("safetensors", "torch"):
        raise ValueError(f"format must be 'safetensors' or 'torch', got {format!r}")
    info = getattr(masks, "info", {}) or {}
    header = {"format": FILE_FORMAT, "version": FILE_VERSION, "masks": {}}
    tensors = {}
    for name, mask in masks.items():
        if not isinstance(name, str) or "/" in name:
            raise ValueError(f"mask names must be strings without '/', got {name!r}")
        try:
            e = _header_entry(name, mask, info.get(name))
        except TypeError as err:
            raise TypeError(f"mask for {name!r}: {err}") from None
        if shapes is not None and name in shapes:
            e["shape"] = [int(x) for x in shapes[name]]
        header["masks"][name] = e
        if e["kind"] == "bits":
            tensors[f"{name}/bits"] = mask.bits.detach().to("cpu").contiguous()
        elif e["kind"] == "rows":
            tensors[f"{name}/cols"] = mask.cols.detach().to("cpu").contiguous()
    text = json.dumps(header)   # insertion order: masks load in the order they were saved
    if format == "safetensors":
        if not _have_safetensors():
            raise ImportError("format='safetensors' needs the safetensors package: pip install safetensors")
        from safetensors.torch import save_file
        save_file(tensors, os.fspath(path), metadata={FILE_FORMAT: text})
    else:
        torch.save({"header": text, "tensors": tensors}, os.fspath(path))


def load_masks(path, device="cpu") -> MaskDict:
    """Read a file written by save_masks (either format, detected from the file) onto ``device``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":    # torch.save's zip container
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "header" not in blob:
            raise ValueError(f"{path}: a torch file, but not one written by save_masks")
        text, tensors = blob["header"], blob["tensors"]
    else:
        if not _have_safetensors():
            raise ImportError(f"{path} is not a torch file; reading safetensors needs: pip install safetensors")
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise ValueError(f"{path}: not a mask file ({err})") from None
        if FILE_FORMAT not in meta:
            raise ValueError(f"{path}: a safetensors file without the {FILE_FORMAT!r} header")
        text = meta[FILE_FORMAT]
    header = json.loads(text)
    if header.get("format") != FILE_FORMAT:
        raise ValueError(f"{path}: not a mask file (format {header.get('format')!r})")
    if header.get("version") != FILE_VERSION:
        raise ValueError(f"{path}: mask file version {header.get('version')!r}; this package reads {FILE_VERSION}")
    out = MaskDict()
    for name, e in header["masks"].items():
        kind = e["kind"]
        if kind == "threshold":
            out[name] = ThresholdMask(float(e["tau"]))
        elif kind == "bits":
            out[name] = BitMask(tensors[f"{name}/bits"].to(device).contiguous())
        elif kind == "rows":
            out[name] = RowIndexMask(tensors[f"{name}/cols"].to(device).contiguous())
        else:
            raise ValueError(f"{path}: unknown mask kind {kind!r} for {name!r}")
        shape = e.get("shape")
        out.info[name] = MaskInfo(kind, None if shape is None else tuple(shape), e.get("target"),
                                  e.get("selected"), e.get("k"))
    return out


def _have_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True
