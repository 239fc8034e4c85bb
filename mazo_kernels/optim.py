"""ZOSGD: MeZO-style zeroth-order SGD on top of the fused kernels (docs/OPTIMIZER.md).

A step perturbs the trainable weights (+eps*z), evaluates the closure, perturbs to -eps*z (undoing the first
perturbation exactly where the spec allows), evaluates again, and then restores and updates the weights in one fused
pass per dtype. The projected gradient stays a 0-d device tensor throughout: a step issues no host synchronisation.
Every step is appended to a seed log from which `mazo_kernels.replay` rebuilds the trained weights bit-exactly.

The engine functions below (tables, pass schedule, update launch) are shared by the optimizer and by replay, so a
replayed step issues exactly the kernel calls of the original step.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch

from . import _backends
from . import reference as ref
from .api import _seed_bits
from .ops import zo_apply_
from .plan import PlanEntry, ZOPlan, stable_tensor_id
from .seed_log import SeedLog, mask_description
from .transient import TransientPerturber

M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15           # SplitMix64 increment (golden ratio)

DISTS = {"gaussian": ref.DIST_GAUSSIAN, "rademacher": ref.DIST_RADEMACHER, "gaussian_fast": ref.DIST_GAUSSIAN_FAST}
ROUNDINGS = {"nearest": ref.ROUND_NEAREST, "stochastic": ref.ROUND_STOCHASTIC}
ESTIMATORS = ("two_sided", "one_sided")
MODES = ("inplace", "transient")
FORWARD_MODES = ("eval", "train")


# ---------------------------------------------------------------- seeds
def _mix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea, Flood 2014): a bijection of 64-bit words with full avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def step_seeds(base_seed: int, step: int, num_perturbations: int = 1):
    """Seeds of step `step` (0-based, counting skipped steps) of a run with base seed `base_seed`.

    key = mix64(base + (step + 1)*G), sub(j) = mix64(key + (j + 1)*G) (mod 2**64, G = 0x9E3779B97F4A7C15):
    sub(0) is the stochastic-rounding seed, sub(1) the forward (dropout) seed, sub(2 + i) the i-th direction seed.
    Returns (direction seeds, sr_seed, forward_seed). Pure integer arithmetic: identical on every machine."""
    key = _mix64((base_seed + (step + 1) * _GAMMA) & M64)

    def sub(j):
        return _mix64((key + (j + 1) * _GAMMA) & M64)

    return [sub(2 + i) for i in range(num_perturbations)], sub(0), sub(1)


# ---------------------------------------------------------------- launch tables
def group_mults(eps: float, lr: float, wd: float, eps_ref: float, q: int, sign: bool):
    """Per-tensor plan multipliers (scale_mult, lr_mult, weight_decay, g_mult) of a param group.

    The kernel computes, per tensor, s = scale*scale_mult, p = prior*scale_mult and
    w' = base - (lr*lr_mult)*(sum_k (g_k*g_mult)*z_k + weight_decay*base). The optimizer launches with scale, prior in
    {+1, -1, 0}, lr = 1 and g_k = projected gradient at the reference eps (eps_ref, the first non-empty group's eps), so:
    scale_mult = eps (the group's own perturbation size), lr_mult = lr, weight_decay = wd, and
    g_mult = (eps_ref / eps) / q turns g_k into the group's own estimate (L+ - L-)/(2 eps) averaged over q directions
    (1/q alone for the sign variant, where sign(g) does not depend on eps)."""
    g_mult = (1.0 if sign else eps_ref / eps) / q
    return (float(eps), float(lr), float(wd), float(g_mult))


class _Table:
    """One dtype group of a plan, with its own float table and, per param group, the rows it owns."""

    def __init__(self, group, group_of: dict, device):
        self.entries, self.tensors, self.masks, self.meta = group.entries, group.tensors, group.masks, group.meta
        self.dense_aligned = group.dense_aligned
        self.fvals = group.fvals.clone()
        self.dtype = group.dtype
        rows = defaultdict(list)
        for i, e in enumerate(group.entries):
            rows[group_of[e.name]].append(i)
        self.rows = {k: torch.tensor(v, dtype=torch.int64, device=device) for k, v in rows.items()}
        self.applied: dict = {}

    def sync(self, mults: list):
        """Write changed multipliers with device-side fills (no host-to-device copy, so no synchronisation)."""
        for k, idx in self.rows.items():
            m = mults[k]
            if self.applied.get(k) != m:
                for col, v in enumerate(m):
                    self.fvals[:, col].index_fill_(0, idx, v)
                self.applied[k] = m


def build_tables(plan: ZOPlan, group_of: dict):
    return [_Table(g, group_of, plan.device) for g in plan.groups]


def schedule(mode: str, estimator: str, seeds: list):
    """The passes and forwards of one step, in order, and the final update's (restore seed, prior, threshold mode).

    Items: ("P", seed, scale, prior, threshold_mode) an in-place perturb pass (scale/prior in units of the group's
    eps); ("F", label, seed, scale) a forward (seed/scale: the transient perturbation, None in place)."""
    items = []
    two = estimator == "two_sided"
    if not two:
        items.append(("F", ("0", 0), None, 0.0))
    if mode == "transient":
        for i, s in enumerate(seeds):
            items.append(("F", ("+", i), s, 1.0))
            if two:
                items.append(("F", ("-", i), s, -1.0))
        return items, (0, 0.0, ref.THRESH_EVAL)
    last = -1.0 if two else 1.0
    for i, s in enumerate(seeds):
        if i:   # undo the previous direction before the next: its seed differs
            items.append(("P", seeds[i - 1], 0.0, last, ref.THRESH_LATCH_READ))
        items.append(("P", s, 1.0, 0.0, ref.THRESH_LATCH_WRITE if i == 0 else ref.THRESH_LATCH_READ))
        items.append(("F", ("+", i), None, 0.0))
        if two:
            items.append(("P", s, -1.0, 1.0, ref.THRESH_LATCH_READ))
            items.append(("F", ("-", i), None, 0.0))
    return items, (seeds[-1], last, ref.THRESH_LATCH_READ)


def loss_keys(estimator: str, q: int) -> list:
    """The forwards' labels in the order the losses are stacked: two-sided [+0..+q-1, -0..-q-1], one-sided
    [0, +0..+q-1]."""
    if estimator == "two_sided":
        return [("+", i) for i in range(q)] + [("-", i) for i in range(q)]
    return [("0", 0)] + [("+", i) for i in range(q)]


def run_pass(tables, item, dist: int, backend: str, empty: torch.Tensor, seed_dev: torch.Tensor | None = None):
    """seed_dev (optional): [seed, anything] on the device, read by the kernels in place of the item's seed value."""
    _, seed, scale, prior, tmode = item
    for t in tables:
        zo_apply_(t.tensors, [], t.masks, t.meta, t.fvals, [_seed_bits(seed)], empty, ref.OP_PERTURB, dist,
                  ref.ROUND_NEAREST, 0, tmode, scale, prior, 0.0, backend, seed_dev, t.dense_aligned)


def run_update(tables, seeds, final, gs, finite, dist: int, rounding: int, sr_seed: int, backend: str, lr_col,
               seed_dev: torch.Tensor | None = None, next_seed: int | None = None):
    """The fused restore + update. Where `finite` is False the learning rate is zeroed on the device (gs must then
    be 0): the pass leaves the restored weights, exactly as a step with lr = 0 (weight decay included).
    seed_dev (optional): [restore seed, seeds..., sr_seed] on the device, read in place of the values.
    next_seed (lookahead): the same pass then applies the next step's first perturbation (+1 in units of eps, the
    threshold latch written), bit for bit that step's first pass (op 3)."""
    restore_seed, prior, tmode = final
    sbits = [_seed_bits(restore_seed)] + [_seed_bits(s) for s in seeds]
    op, scale = ref.OP_UPDATE, 0.0
    if next_seed is not None:
        op, scale = ref.OP_UPDATE_PERTURB, 1.0
        sbits.append(_seed_bits(next_seed))
    for t in tables:
        fv = t.fvals.masked_fill(lr_col & ~finite, 0.0)
        zo_apply_(t.tensors, [], t.masks, t.meta, fv, sbits, gs, op, dist, rounding,
                  _seed_bits(sr_seed), tmode, scale, prior, 1.0, backend, seed_dev, t.dense_aligned)


class _Part:
    """The trainable tensors on one device: their plan, backend, launch tables and small device constants."""

    def __init__(self, plan: ZOPlan, group_of: dict, backend: str):
        self.plan, self.device = plan, plan.device
        self.backend = _backends.resolve(backend, self.device)
        _backends.require(self.backend)
        self.tables = build_tables(plan, group_of)
        self.lr_col = lr_column(self.device)
        self.empty = torch.zeros(0, dtype=torch.float32, device=self.device)


def _device_key(t: torch.Tensor):
    return t.device


def build_parts(entries: list, group_of: dict, backend: str) -> list:
    """One plan per device (a model split by device_map="auto" gets one per GPU), in order of first appearance."""
    by_dev: dict = {}
    for e in entries:
        by_dev.setdefault(_device_key(e.tensor), []).append(e)
    return [_Part(ZOPlan(es), group_of, backend) for es in by_dev.values()]


_DTENSOR = []


def is_dtensor(t) -> bool:
    """True for torch.distributed.tensor.DTensor parameters (FSDP2 / fully_shard shards)."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except Exception:                 # noqa: BLE001 -- torch built without distributed
            DTensor = ()
        _DTENSOR.append(DTensor)
    return bool(_DTENSOR[0]) and isinstance(t, _DTENSOR[0])


def plan_entry(name: str, p: torch.Tensor, tensor_id: int | None = None, mask=None) -> PlanEntry:
    """The plan entry of a parameter: the tensor itself, or for a DTensor its local shard with the shard's offset
    in the full tensor (the noise of every element is then that of its global index)."""
    tid = stable_tensor_id(name) if tensor_id is None else tensor_id
    if is_dtensor(p):
        from .distributed import local_shard
        local, offset, full = local_shard(p, name)
        return PlanEntry(name, local, tid, global_offset=offset, full_numel=full, mask=mask)
    return PlanEntry(name, p.detach(), tid, mask=mask)


def lr_column(device):
    col = torch.zeros(5, dtype=torch.bool)
    col[1] = True
    return col.to(device)


def kernel_grads(g_raw: torch.Tensor, finite: torch.Tensor, sign: bool) -> torch.Tensor:
    """What the update consumes: g (or sign(g)), or 0 for a skipped step."""
    g = torch.sign(g_raw) if sign else g_raw
    return torch.where(finite, g, torch.zeros_like(g))


# ---------------------------------------------------------------- the optimizer
def _fsdp_modules(module) -> list:
    """The FSDP2 (fully_shard) modules of `module`, root first; [] without torch.distributed or FSDP."""
    if module is None or not isinstance(module, torch.nn.Module):
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:                     # noqa: BLE001 -- torch built without distributed
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _normalize_params(params):
    """Param groups with (name, tensor) pairs; tied weights (one tensor listed twice) kept once, first name."""
    if isinstance(params, torch.Tensor):
        raise TypeError("ZOSGD params must be an iterable of (name, tensor) pairs or param-group dicts, "
                        "e.g. model.named_parameters(), not a tensor")
    params = list(params)
    if not params:
        raise ValueError("ZOSGD got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    seen, aliases, out = {}, {}, []
    for gi, g in enumerate(groups):
        if not isinstance(g, dict):
            raise TypeError(f"param group {gi}: expected a dict, got {type(g).__name__} (do not mix groups and "
                            "parameters)")
        g = dict(g)
        ps = g.get("params")
        if ps is None:
            raise ValueError(f"param group {gi} has no 'params'")
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        names = g.pop("param_names", None)
        if names is not None and len(names) != len(ps):
            raise ValueError(f"param group {gi}: {len(ps)} params but {len(names)} param_names")
        items = []
        for j, p in enumerate(ps):
            if isinstance(p, tuple) and len(p) == 2:
                n, t = p
            elif isinstance(p, torch.Tensor):
                if names is None:
                    raise TypeError(
                        "ZOSGD needs parameter names: they key the noise (stable tensor ids) and the seed log. Pass "
                        "model.named_parameters(), (name, tensor) pairs, or param groups with 'param_names'; got a "
                        "bare tensor in param group {gi}".format(gi=gi))
                n, t = names[j], p
            else:
                raise TypeError(f"param group {gi}: expected (name, tensor) pairs or tensors, got "
                                f"{type(p).__name__}")
            if not isinstance(n, str) or not isinstance(t, torch.Tensor):
                raise TypeError(f"param group {gi}: expected (name: str, tensor) pairs, got ({type(n).__name__}, "
                                f"{type(t).__name__})")
            if id(t) in seen:
                aliases[n] = seen[id(t)]
                continue
            seen[id(t)] = n
            items.append((n, t))
        g["params"] = items
        out.append(g)
    return out, aliases


def _check_group_values(k, lr, eps, wd):
    lr, eps, wd = float(lr), float(eps), float(wd)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"Invalid learning rate {lr} in param group {k}: must be finite and >= 0")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"Invalid eps {eps} in param group {k}: the perturbation size must be finite and > 0")
    if not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"Invalid weight_decay {wd} in param group {k}: must be finite and >= 0")
    return lr, eps, wd


class ZOSGD(torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO) with fused, bit-reproducible kernels. See docs/OPTIMIZER.md.

    params: model.named_parameters(), (name, tensor) pairs, or param-group dicts ({"params": pairs or tensors,
        "param_names": [...], "lr", "eps", "weight_decay"}). Names are required: they give the stable tensor ids that
        key the noise. Parameters with requires_grad=False are kept in the groups but never perturbed or updated.
    lr, eps, weight_decay: defaults for the groups; read from param_groups at every step (LR schedulers work).
    lookahead: each step's update also applies the next step's first perturbation in the same pass (one pass
        fewer per step; the weights are the same bits at every step). Between steps the weights then carry that
        perturbation: call settle() before evaluating or saving them (the seed log records it, so replay matches).
        In-place two-sided steps only (docs/OPTIMIZER.md, "Lookahead").
    transient_group_bytes (mode="transient"): the perturbed copies are made per block of at most this many bytes
        (one launch per block and dtype; the extra memory is one block). None: 5% of the trainable bytes, at least
        64 MiB (one decoder layer of a 7B-30B LLaMA); 0: one launch per owning module (docs/OPTIMIZER.md).
    inference_mode: run the closure under torch.inference_mode() (as MeZO's code runs its forwards; cheaper on the
        host than no_grad, which is what a small-batch forward is bound by), else under torch.no_grad(). Tensors the
        closure creates are then inference tensors. FSDP2 models always use no_grad.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 dist: str = "gaussian", estimator: str = "two_sided", num_perturbations: int = 1,
                 sign: bool = False, rounding: str | None = None, masks: dict | None = None,
                 mode: str = "inplace", module: torch.nn.Module | None = None, forward_mode: str = "eval",
                 seed: int = 0, backend: str = "auto", loss_reduce=None,
                 transient_group_bytes: int | None = None, inference_mode: bool = True, lookahead: bool = False):
        _check_group_values("defaults", lr, eps, weight_decay)
        if not isinstance(lookahead, bool):
            raise TypeError(f"lookahead must be True or False, got {lookahead!r}")
        if lookahead and (mode != "inplace" or estimator != "two_sided"):
            raise ValueError("lookahead=True needs mode='inplace' and estimator='two_sided' (the next step must begin "
                             f"with the +eps pass the update applies), got mode={mode!r}, estimator={estimator!r}")
        if transient_group_bytes is not None and (isinstance(transient_group_bytes, bool) or
                                                  not isinstance(transient_group_bytes, int) or
                                                  transient_group_bytes < 0):
            raise ValueError("transient_group_bytes must be None (the default rule) or an int >= 0 (0: one copy "
                             f"launch per owning module), got {transient_group_bytes!r}")
        if dist not in DISTS:
            raise ValueError(f"dist must be one of {sorted(DISTS)}, got {dist!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be 'two_sided' or 'one_sided', got {estimator!r}")
        if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int) or num_perturbations < 1:
            raise ValueError(f"num_perturbations must be an int >= 1, got {num_perturbations!r}")
        if rounding is not None and rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be None, 'nearest' or 'stochastic', got {rounding!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be 'inplace' or 'transient', got {mode!r}")
        if mode == "transient" and module is None:
            raise ValueError("mode='transient' needs module= (the model whose forward the closure runs): the "
                             "perturbed copies are swapped in by forward hooks on its submodules")
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be 'eval' or 'train', got {forward_mode!r}")
        if not isinstance(inference_mode, bool):
            raise TypeError(f"inference_mode must be True or False, got {inference_mode!r}")
        if loss_reduce is not None and not callable(loss_reduce):
            raise TypeError("loss_reduce must be callable (losses -> reduced losses), got "
                            f"{type(loss_reduce).__name__}")
        self._base_seed = _seed_bits(seed, "seed") & M64
        self._fsdp_modules = _fsdp_modules(module)
        for m in self._fsdp_modules:      # sharded parameters are registered only while the modules are resharded
            m.reshard()
        groups, aliases = _normalize_params(params)
        super().__init__(groups, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        self.dist, self.estimator, self.num_perturbations = dist, estimator, num_perturbations
        self.sign, self.mode, self.module, self.forward_mode = bool(sign), mode, module, forward_mode
        self.rounding = "stochastic" if rounding is None else rounding
        # FSDP2's all-gathered parameters must stay normal tensors (they are resharded, in place, outside the forward)
        self.inference_mode = inference_mode and not self._fsdp_modules

        masks = dict(masks or {})
        entries, group_of, by_param, shapes = [], {}, {}, {}
        for k, g in enumerate(self.param_groups):
            for n, p in zip(g["param_names"], g["params"]):
                if not p.requires_grad:
                    continue
                e = plan_entry(n, p)
                entries.append(e)
                shapes[n] = list(p.shape)
                group_of[n] = k
                by_param[id(p)] = (p, e)
        if not entries:
            raise ValueError("ZOSGD: none of the given parameters requires grad; nothing to train")
        known = {e.name: e for e in entries}
        unknown = []
        for name, m in masks.items():
            target = known.get(name) or known.get(aliases.get(name, ""))
            if target is None:
                unknown.append(name)
            else:
                target.mask = m
        if unknown:
            raise ValueError(f"masks given for unknown parameter names {sorted(unknown)}; masks are keyed by the "
                             f"names of trainable parameters in the optimizer (e.g. {sorted(known)[:3]})")
        sharded = [e.name for e in entries if e.full_numel is not None]
        if self._fsdp_modules and len(sharded) < len(entries):
            plain = [e.name for e in entries if e.full_numel is None]
            raise ValueError(f"ZOSGD: module= is an FSDP2 model but parameters {plain[:3]} are not sharded DTensors: "
                             "they were listed while FSDP had them unsharded (after a forward). Pass "
                             "model.named_parameters() itself (the optimizer reshards first), or call reshard() on "
                             "the FSDP modules before listing them")
        if sharded and not self._fsdp_modules:
            raise ValueError(f"ZOSGD: parameters {sharded[:3]} are sharded (DTensor) but module= is not an FSDP2 "
                             "(fully_shard) model; pass module=model so the optimizer can reshard it before every "
                             "forward (docs/DISTRIBUTED.md)")
        if sharded and mode == "transient":
            raise ValueError("ZOSGD: mode='transient' does not support sharded (FSDP2) parameters; use 'inplace'")
        self._group_of = group_of
        self._parts = build_parts(entries, group_of, backend)
        home = self._parts[0]
        self._plan, self._device, self._backend = home.plan, home.device, home.backend
        self._tables, self._lr_col, self._empty = home.tables, home.lr_col, home.empty
        self._transient = None
        if mode == "transient":
            if len({pt.backend for pt in self._parts}) > 1:
                raise ValueError("ZOSGD: mode='transient' needs one kernel backend for every device, got "
                                 f"{sorted({pt.backend for pt in self._parts})}")
            if transient_group_bytes is None:   # blocks of at most 5% of the trainable bytes (at least 64 MiB)
                total = sum(e.tensor.numel() * e.tensor.element_size() for e in entries)
                transient_group_bytes = max(64 << 20, total // 20)
            self._transient = TransientPerturber(module, by_param, lambda plan: build_tables(plan, group_of),
                                                 transient_group_bytes)
        self.loss_reduce = loss_reduce
        self.lookahead = lookahead
        # lookahead: (seed, per-group eps) of the perturbation the weights carry between steps, or None
        self._carry = None
        self._step_count = 0
        self._log = SeedLog.new(self._base_seed, [
            {"name": e.name, "tensor_id": e.tensor_id, "group": group_of[e.name],
             "dtype": str(e.tensor.dtype).replace("torch.", ""), "shape": shapes[e.name],
             "mask": mask_description(e.mask)} for e in entries])

    # -------------------------------------------------------------- torch.optim.Optimizer conventions
    def add_param_group(self, param_group):
        if getattr(self, "_plan", None) is not None:
            raise RuntimeError("ZOSGD: add_param_group after construction is not supported (the plan and the seed "
                               "log describe a fixed parameter set); build a new optimizer")
        _check_group_values(len(self.param_groups), *(param_group.get(k, self.defaults[k])
                                                      for k in ("lr", "eps", "weight_decay")))
        super().add_param_group(param_group)

    @property
    def seed_log(self) -> SeedLog:
        return self._log

    @property
    def plan(self) -> ZOPlan:
        """The plan of the trainable tensors (the first device's, when the model spans several: see plans)."""
        return self._plan

    @property
    def plans(self) -> list:
        """One plan per device holding trainable tensors (several for a model split by device_map)."""
        return [pt.plan for pt in self._parts]

    @property
    def backend(self) -> str:
        return self._backend

    def state_dict(self):
        sd = super().state_dict()
        sd["seed_log"] = self._log.to_dict()
        sd["zo"] = {"step": self._step_count, "seed": self._base_seed,
                    "carry": None if self._carry is None else [self._carry[0], list(self._carry[1])]}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        log = state_dict.pop("seed_log", None)
        zo = state_dict.pop("zo", None)
        if log is None or zo is None:
            raise ValueError("not a ZOSGD state dict: 'seed_log' and 'zo' entries are missing")
        log = SeedLog.from_dict(log)
        log.check_spec()
        mine = [(p["name"], p["tensor_id"], p["group"], p["dtype"], p["shape"]) for p in self._log.header["params"]]
        theirs = [(p["name"], p["tensor_id"], p["group"], p["dtype"], p["shape"]) for p in log.header["params"]]
        if mine != theirs:
            diff = sorted(set(mine) ^ set(theirs))[:4]
            raise ValueError(f"state dict was written for other parameters (differences: {diff}); load it into an "
                             "optimizer built over the same named parameters and groups")
        super().load_state_dict(state_dict)
        self._log = log
        self._step_count = int(zo["step"])
        self._base_seed = int(zo["seed"])
        carry = zo.get("carry")
        # the model's weights saved with this state carry that perturbation (lookahead, not settled)
        self._carry = None if carry is None else (int(carry[0]), tuple(float(e) for e in carry[1]))

    # -------------------------------------------------------------- the step
    def _group_values(self):
        vals = [_check_group_values(k, g["lr"], g["eps"], g["weight_decay"]) for k, g in enumerate(self.param_groups)]
        used = sorted(set(self._group_of.values()))
        eps_ref = vals[used[0]][1]
        return vals, eps_ref

    @contextlib.contextmanager
    def _forward_mode(self):
        if self.forward_mode != "eval" or self.module is None:
            yield
            return
        training = [m for m in self.module.modules() if m.training]
        if not training:                   # already in eval mode: nothing to set or restore
            yield
            return
        # Only the flags that change, written straight into each module's __dict__: what Module.__setattr__ does for
        # a bool after its type checks, which cost ~1 ms per step on a 7B model's ~400 modules (the step's host time
        # before its first launch, when the GPU waits). A module class with its own train() gets train(False).
        custom = any(type(m).train is not torch.nn.Module.train for m in training)
        if custom:
            self.module.eval()
        else:
            for m in training:
                m.__dict__["training"] = False
        try:
            yield
        finally:
            for m in training:
                m.__dict__["training"] = True

    @contextlib.contextmanager
    def _rng(self, fwd_seed):
        """train mode: every forward of a step starts from the same RNG state (same dropout masks), and the global
        RNG streams are left as they were."""
        if self.forward_mode != "train":
            yield
            return
        devices = sorted({pt.device.index if pt.device.index is not None else torch.cuda.current_device()
                          for pt in self._parts if pt.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(fwd_seed)
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(fwd_seed)
            yield

    def _forward(self, closure, fwd_seed, transient):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(self._rng(fwd_seed))
            if transient is not None:
                stack.enter_context(self._transient.perturbed(*transient))
            for m in self._fsdp_modules:   # the forward must all-gather the shards as the passes left them
                m.reshard()
            try:
                # innermost, so that nothing the step keeps (transient copies, shards) is made an inference tensor;
                # not inference_mode(False), which would turn grad mode back on inside no_grad
                with torch.inference_mode() if self.inference_mode else contextlib.nullcontext():
                    loss = closure()
            finally:
                for m in self._fsdp_modules:   # FSDP2 keeps the root unsharded after a forward: free it
                    m.reshard()
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
            return loss.detach().reshape(()).to(device=self._device, dtype=torch.float32)
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return torch.tensor(float(loss), dtype=torch.float32, device=self._device)
        raise TypeError(f"the closure must return the loss as a 0-d tensor, got {type(loss).__name__}")

    def _begin_step(self):
        """Validate the groups, write their multipliers to the device tables and draw step k's seeds (k = the
        step counter, not advanced here). Returns (seeds, sr_seed, forward_seed, eps_ref, the seed-log record)."""
        vals, eps_ref = self._group_values()
        q, sign = self.num_perturbations, self.sign
        k = self._step_count
        if self._carry is not None and self._carry != (step_seeds(self._base_seed, k, q)[0][0],
                                                       tuple(v[1] for v in vals)):
            self.settle()   # the carried perturbation is not this step's first (eps changed): undone first
        mults = [group_mults(eps, lr, wd, eps_ref, q, sign) for lr, eps, wd in vals]
        for pt in self._parts:
            for t in pt.tables:
                t.sync(mults)
        if self._transient is not None:
            self._transient.sync(mults)
        seeds, sr_seed, fwd_seed = step_seeds(self._base_seed, k, q)
        record = {"step": k, "seeds": seeds, "sr_seed": sr_seed, "forward_seed": fwd_seed,
                  "lr": [v[0] for v in vals], "eps": [v[1] for v in vals], "weight_decay": [v[2] for v in vals],
                  "eps_ref": eps_ref, "dist": self.dist, "estimator": self.estimator, "sign": sign,
                  "rounding": self.rounding, "mode": self.mode, "spec_version": ref.SPEC_VERSION}
        return seeds, sr_seed, fwd_seed, eps_ref, record

    def step(self, closure=None):
        """One ZO step; returns the loss estimate at the pre-step weights (0-d device tensor, no host sync):
        L(theta) for one_sided, the mean of the L+/L- evaluations for two_sided."""
        if closure is None:
            raise ValueError("ZOSGD.step needs a closure: closure() runs a forward (no backward) and returns the loss")
        seeds, sr_seed, fwd_seed, eps_ref, record = self._begin_step()   # validated before any weight is touched
        q, sign = self.num_perturbations, self.sign
        items, final = schedule(self.mode, self.estimator, seeds)
        if self._carry is not None:       # lookahead: the previous step's update applied the first pass
            items = items[1:]
            self._carry = None
        dist, backend = DISTS[self.dist], self._backend
        losses, error, pos = {}, None, 0
        two = self.estimator == "two_sided"
        keys = loss_keys(self.estimator, q)        # the order loss_reduce sees
        reduced, reduce_called = None, False
        self._step_count += 1        # the seeds of step k are spent even if the step fails
        with self._forward_mode():
            try:
                for pos, item in enumerate(items):
                    if item[0] == "P":
                        self._run_pass(item, dist)
                    else:
                        tr = None if item[2] is None else (_seed_bits(item[2]), item[3], dist, backend)
                        losses[item[1]] = self._forward(closure, fwd_seed, tr)
            except BaseException as exc:          # noqa: BLE001 -- restore the weights, then re-raise
                if items[pos][0] == "P":          # a kernel failed: the weights' state is unknown
                    self._log.append({**record, "g_bits": [0x7FC00000] * q, "skipped": True,
                                      "error": f"{type(exc).__name__} in a perturb pass"})
                    self._reduce_nan(len(keys))
                    raise
                error = exc
        if error is None:
            vec = torch.stack([losses[key] for key in keys])
            if self.loss_reduce is not None:
                # Data parallel: the one collective of the step (every rank's losses, combined in rank order). An
                # exception here (e.g. replicas found to diverge) skips the step like a failing closure.
                reduce_called = True
                try:
                    reduced = self._reduce(vec)
                except BaseException as exc:      # noqa: BLE001
                    error = exc
            else:
                reduced = vec
        if error is not None:
            # Finish the step's remaining passes without forwards, then update with g = 0 and lr = 0: the weights end
            # exactly as after a step with lr = 0 (and replay, which runs the same passes, reproduces them).
            for item in items[pos + 1:]:
                if item[0] == "P":
                    self._run_pass(item, dist)
            if not reduce_called:
                self._reduce_nan(len(keys))       # keep the other ranks' collective matched (they skip the step)
            zero = torch.zeros(q, dtype=torch.float32, device=self._device)
            no = torch.zeros((), dtype=torch.bool, device=self._device)
            self._run_update(seeds, final, zero, no, dist, sr_seed, record)
            self._log.append({**record, "g_bits": [0x7FC00000] * q, "skipped": True,
                              "error": f"{type(error).__name__}: {error}"[:200]})
            raise error
        # keys: two-sided [+0..+q-1, -0..-q-1], one-sided [0, +0..+q-1]; slices keep the step free of host->device
        # index copies (list indexing would upload an index tensor every step)
        lp = reduced[:q] if two else reduced[1:1 + q]
        if two:
            lm = reduced[q:2 * q]
            g_raw = (lp - lm) / torch.full((), 2.0 * eps_ref, dtype=torch.float32, device=self._device)
            estimate = torch.cat([lp, lm]).mean()
        else:
            l0 = reduced[0]
            g_raw = (lp - l0) / torch.full((), eps_ref, dtype=torch.float32, device=self._device)
            estimate = l0
        finite = torch.isfinite(g_raw).all()
        gs = kernel_grads(g_raw, finite, sign)
        self._run_update(seeds, final, gs, finite, dist, sr_seed, record)
        self._log.append({**record, "error": None}, g_raw=g_raw, finite=finite)
        return estimate

    def settle(self):
        """lookahead: undo the next step's first perturbation that the last update applied, so that the weights are
        the trained ones (to evaluate or save them). The next step then begins with its own +eps pass. The restore
        is the spec's (exact except where a perturbed value landed in a coarser binade: the -eps pass's restore is
        the same), and the seed log records it, so replay rebuilds the settled weights bit for bit. A no-op when
        nothing is carried."""
        if self._carry is None:
            return
        seed = self._carry[0]
        self._run_pass(("P", seed, 0.0, 1.0, ref.THRESH_LATCH_READ), DISTS[self.dist])
        self._carry = None
        self._log.mark_settled(seed)

    @property
    def carries_perturbation(self) -> bool:
        """True between lookahead steps: the weights hold the next step's +eps perturbation (see settle)."""
        return self._carry is not None

    # -------------------------------------------------------------- passes over every device's plan
    def _run_pass(self, item, dist):
        for pt in self._parts:
            run_pass(pt.tables, item, dist, pt.backend, pt.empty)

    def _run_update(self, seeds, final, gs, finite, dist, sr_seed, record=None):
        nxt = step_seeds(self._base_seed, self._step_count, self.num_perturbations)[0][0] if self.lookahead else None
        for pt in self._parts:
            g, f = (gs, finite) if pt.device == self._device else (gs.to(pt.device), finite.to(pt.device))
            run_update(pt.tables, seeds, final, g, f, dist, ROUNDINGS[self.rounding], sr_seed, pt.backend, pt.lr_col,
                       next_seed=nxt)
        if nxt is not None:   # lookahead: step() passes the step's record, whose eps the carried +eps used
            self._carry = (nxt, tuple(record["eps"]))

    def _reduce(self, vec: torch.Tensor) -> torch.Tensor:
        out = self.loss_reduce(vec)
        if not isinstance(out, torch.Tensor) or out.shape != vec.shape:
            raise TypeError(f"loss_reduce must return a tensor of shape {tuple(vec.shape)}, got "
                            f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        return out.to(device=self._device, dtype=torch.float32)

    def _reduce_nan(self, n: int):
        """After a failure on this rank: take part in the step's collective with NaN losses, so that the other
        ranks do not wait forever and skip the step too (a NaN loss skips it everywhere)."""
        if self.loss_reduce is None:
            return
        try:
            self.loss_reduce(torch.full((n,), float("nan"), dtype=torch.float32, device=self._device))
        except BaseException:                     # noqa: BLE001 -- the original error is the one to report
            pass
