"""The seed log of a ZO run and its replay (docs/OPTIMIZER.md, "Seed log" and "Replay").

A ZO step is fully described by a handful of numbers: its seeds, the projected gradients, the hyper-parameters of
each param group. The log keeps them (gradients as exact float32 bit patterns), so `replay` can re-execute the
recorded kernel passes -- not the forwards -- from the initial weights and rebuild the trained weights bit-exactly,
on any backend, because every backend computes the same bits (docs/NOISE_SPEC.md).

Projected gradients are produced on the device; the log keeps them there and converts them in batches (at
`to_dict()` / `steps` access, or every FLUSH_EVERY steps), so a training step never waits for the device.
"""
from __future__ import annotations

import copy
import json
import math
import os

import torch

from .masks import BitMask, RowIndexMask, ThresholdMask
from .plan import stable_tensor_id
from . import reference as ref
from .reference import REPLAYABLE_SPEC_VERSIONS, SPEC_VERSION
from .version import __version__

FORMAT = "mazo_kernels.seed_log"
FORMAT_VERSION = 1
FLUSH_EVERY = 1024
NAN_BITS = 0x7FC00000


def mask_description(mask):
    """What the log records of a mask: a threshold is fully described by tau; packed bits and column indices are
    tensors the caller keeps (replay takes them through masks=)."""
    if mask is None:
        return None
    if isinstance(mask, ThresholdMask):
        return {"kind": "threshold", "tau": float(mask.tau)}
    if isinstance(mask, BitMask):
        return {"kind": "bitmask"}
    if isinstance(mask, RowIndexMask):
        return {"kind": "rowindex", "k": int(mask.cols.shape[1])}
    raise TypeError(f"unknown mask type {type(mask).__name__}")


def f32_bits(t: torch.Tensor) -> list:
    return [int(b) & 0xFFFFFFFF for b in t.detach().cpu().to(torch.float32).reshape(-1).view(torch.int32).tolist()]


def bits_f32(bits: list) -> torch.Tensor:
    signed = [b - (1 << 32) if b >= (1 << 31) else b for b in bits]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


def _readable(bits):
    return [v if math.isfinite(v) else None for v in bits_f32(bits).tolist()]


_STEP_KEYS = ("step", "seeds", "g", "g_bits", "skipped", "lr", "eps", "weight_decay", "eps_ref", "sr_seed",
              "forward_seed", "dist", "estimator", "sign", "rounding", "mode", "spec_version", "error",
              "settled_seed")


class SeedLog:
    """header: format, versions, base seed and the trained tensors (name, tensor id, param group, dtype, shape,
    mask); steps: one record per step (see docs/OPTIMIZER.md for the fields)."""

    def __init__(self, header: dict, steps: list):
        self.header = header
        self._steps = steps
        self._pending = []

    @classmethod
    def new(cls, base_seed: int, params: list) -> "SeedLog":
        return cls({"format": FORMAT, "format_version": FORMAT_VERSION, "spec_version": SPEC_VERSION,
                    "package_version": __version__, "base_seed": int(base_seed), "params": params}, [])

    def append(self, record: dict, g_raw: torch.Tensor | None = None, finite: torch.Tensor | None = None):
        rec = dict(record)
        if g_raw is None:
            rec["g"] = _readable(rec["g_bits"])
        else:   # device values: converted later, in one batch, so the step does not synchronise
            self._pending.append((rec, torch.cat([g_raw.detach().to(torch.float32).reshape(-1),
                                                  finite.detach().to(torch.float32).reshape(1)])))
        self._steps.append(rec)
        if len(self._pending) >= FLUSH_EVERY:
            self._flush()

    def mark_settled(self, seed: int):
        """After the last step (lookahead): the next step's first perturbation (seed) was applied and undone."""
        if self._steps:
            self._steps[-1]["settled_seed"] = int(seed)

    def _flush(self):
        if not self._pending:
            return
        flat = torch.cat([v for _, v in self._pending]).cpu()
        pos = 0
        for rec, v in self._pending:
            chunk = flat[pos:pos + v.numel()]
            pos += v.numel()
            rec["g_bits"] = f32_bits(chunk[:-1])
            rec["g"] = _readable(rec["g_bits"])
            rec["skipped"] = bool(chunk[-1] == 0)
        self._pending.clear()

    @property
    def steps(self) -> list:
        self._flush()
        return self._steps

    def __len__(self):
        return len(self._steps)

    def to_dict(self) -> dict:
        """Plain Python types only (safe for json and for torch.load(weights_only=True))."""
        steps = [{k: copy.deepcopy(r[k]) for k in _STEP_KEYS if k in r} for r in self.steps]
        return {**copy.deepcopy(self.header), "steps": steps}

    @classmethod
    def from_dict(cls, d: dict) -> "SeedLog":
        if isinstance(d, SeedLog):
            return cls(copy.deepcopy(d.header), copy.deepcopy(d.steps))
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a mazo_kernels seed log (expected format {FORMAT!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"seed log format version {d.get('format_version')} is not supported "
                             f"(this is version {FORMAT_VERSION})")
        header = {k: copy.deepcopy(v) for k, v in d.items() if k != "steps"}
        steps = copy.deepcopy(list(d.get("steps", [])))
        for r in steps:
            r["g"] = _readable(r["g_bits"])
        return cls(header, steps)

    def to_json(self, path: str | os.PathLike | None = None, indent: int | None = 1) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, path_or_text) -> "SeedLog":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(path_or_text) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def check_spec(self):
        versions = {self.header.get("spec_version")} | {r.get("spec_version") for r in self._steps}
        bad = sorted((v for v in versions if v not in REPLAYABLE_SPEC_VERSIONS), key=repr)
        if bad:
            raise ValueError(f"seed log was written under noise spec version {bad[0]}, but this mazo_kernels "
                             f"implements spec version {SPEC_VERSION} (and replays {list(REPLAYABLE_SPEC_VERSIONS)}): "
                             "its seeds would give other noise, so the run cannot be replayed (install the "
                             "mazo_kernels release of that spec version)")
        early = [r for r in self._steps if r.get("dist") == "gaussian_fast" and r.get("spec_version") == 1]
        if early:
            raise ValueError(f"seed log step {early[0].get('step')} uses dist 'gaussian_fast' under spec version 1, but "
                             "gaussian_fast exists only from spec version 2: the log is inconsistent, so it is not "
                             "replayed")


def _coerce(seed_log) -> SeedLog:
    if isinstance(seed_log, SeedLog):
        return seed_log
    if isinstance(seed_log, (str, os.PathLike)):
        return SeedLog.from_json(seed_log)
    if isinstance(seed_log, dict) and "seed_log" in seed_log and "format" not in seed_log:
        seed_log = seed_log["seed_log"]           # a ZOSGD state dict
    return SeedLog.from_dict(seed_log)


def _named_tensors(target):
    if isinstance(target, torch.nn.Module):
        return list(target.named_parameters())
    if isinstance(target, dict):
        return list(target.items())
    out = list(target)
    for x in out:
        if not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)):
            raise TypeError("replay needs a torch.nn.Module, a {name: tensor} dict or (name, tensor) pairs")
    return out


def _check_step(i, r, n_groups):
    from . import optim as O
    need = ("seeds", "g_bits", "skipped", "lr", "eps", "weight_decay", "eps_ref", "sr_seed", "dist", "estimator",
            "sign", "rounding", "mode")
    missing = [k for k in need if k not in r]
    if missing:
        raise ValueError(f"seed log step {i}: missing fields {missing}")
    if r["dist"] not in O.DISTS or r["estimator"] not in O.ESTIMATORS or r["mode"] not in O.MODES \
            or r["rounding"] not in O.ROUNDINGS:
        raise ValueError(f"seed log step {i}: unknown dist/estimator/mode/rounding "
                         f"{(r['dist'], r['estimator'], r['mode'], r['rounding'])}")
    if not r["seeds"] or len(r["g_bits"]) != len(r["seeds"]):
        raise ValueError(f"seed log step {i}: {len(r['seeds'])} seeds but {len(r['g_bits'])} gradients")
    if min(len(r["lr"]), len(r["eps"]), len(r["weight_decay"])) < n_groups:
        raise ValueError(f"seed log step {i}: hyper-parameters for fewer than {n_groups} param groups")
    if (r.get("error") or "").endswith("in a perturb pass"):
        raise ValueError(f"seed log step {i}: a kernel failed during that step, so the weights it left are not "
                         "defined by the log; it cannot be replayed")


def replay(model_or_named_params, seed_log, backend: str = "auto", *, masks: dict | None = None) -> int:
    """Rebuild trained weights from the initial ones by re-executing the logged kernel passes, in place.

    model_or_named_params: a module, a {name: tensor} dict or (name, tensor) pairs holding the *initial* weights
        (tensors are matched to the log by stable tensor id, so wrapper prefixes do not matter).
    seed_log: a SeedLog, its to_dict(), a ZOSGD state_dict, or the path of a JSON log.
    masks: {name: BitMask | RowIndexMask} for tensors the run masked with packed bits or column indices (threshold
        masks are rebuilt from the log).
    In-place steps replay all three passes (+eps, -eps, update), not the update alone: the in-place restore is
    inexact where a perturbed value lands in a coarser binade, and those bits must be lost exactly as in the run.
    Everything is validated before the first write. Returns the number of steps replayed."""
    from . import optim as O
    log = _coerce(seed_log)
    log.check_spec()
    header, steps = log.header, log.steps
    by_id = {}
    for n, t in _named_tensors(model_or_named_params):
        by_id.setdefault(stable_tensor_id(n), (n, t))
    masks = dict(masks or {})
    entries, group_of = [], {}
    for p in header["params"]:
        hit = by_id.get(p["tensor_id"])
        if hit is None:
            raise ValueError(f"seed log parameter {p['name']!r} (tensor id {p['tensor_id']}) is not among the "
                             "given tensors")
        n, t = hit
        if str(t.dtype).replace("torch.", "") != p["dtype"] or list(t.shape) != list(p["shape"]):
            raise ValueError(f"{p['name']!r}: the log has {p['dtype']} {tuple(p['shape'])}, the given tensor is "
                             f"{t.dtype} {tuple(t.shape)}")
        desc, mask = p.get("mask"), None
        if desc is not None:
            if desc["kind"] == "threshold":
                mask = ThresholdMask(desc["tau"])
            else:
                mask = masks.get(p["name"], masks.get(n))
                want = BitMask if desc["kind"] == "bitmask" else RowIndexMask
                if not isinstance(mask, want):
                    raise ValueError(f"{p['name']!r} was trained with a {want.__name__}; pass it as "
                                     f"masks={{{p['name']!r}: ...}}")
        # A sharded (DTensor) parameter replays on its local shard, with the noise of its global indices.
        entries.append(O.plan_entry(p["name"], t, p["tensor_id"], mask=mask))
        group_of[p["name"]] = p["group"]
    n_groups = max(group_of.values()) + 1
    for i, r in enumerate(steps):
        _check_step(i, r, n_groups)
    parts = O.build_parts(entries, group_of, backend)      # one plan per device (device_map="auto" models)
    for r in steps:
        q = len(r["seeds"])
        mults = [O.group_mults(e, lr, wd, r["eps_ref"], q, r["sign"])
                 for lr, e, wd in zip(r["lr"], r["eps"], r["weight_decay"])]
        items, final = O.schedule(r["mode"], r["estimator"], r["seeds"])
        dist = O.DISTS[r["dist"]]
        for pt in parts:
            for t in pt.tables:
                t.sync(mults)
            for item in items:
                if item[0] == "P":
                    O.run_pass(pt.tables, item, dist, pt.backend, pt.empty)
            finite = torch.tensor(not r["skipped"], device=pt.device)
            gs = O.kernel_grads(bits_f32(r["g_bits"]).to(pt.device), finite, r["sign"])
            O.run_update(pt.tables, r["seeds"], final, gs, finite, dist, O.ROUNDINGS[r["rounding"]], r["sr_seed"],
                         pt.backend, pt.lr_col)
            if r.get("settled_seed") is not None:   # a lookahead run settled here: its perturb and restore
                s = r["settled_seed"]
                O.run_pass(pt.tables, ("P", s, 1.0, 0.0, ref.THRESH_LATCH_WRITE), dist, pt.backend, pt.empty)
                O.run_pass(pt.tables, ("P", s, 0.0, 1.0, ref.THRESH_LATCH_READ), dist, pt.backend, pt.empty)
    return len(steps)
