"""End to end: ZO steps on LLaMA-shaped models, ZOSGD against MeZO as users run it (issue 5).

    python bench/bench_e2e.py --model-shape 7b --batch 16,1 --seq 256,512 [--method all] [--dtype bf16]
                              [--steps 5] [--warmup 2] [--out bench/results/e2e/e2e_7b.json]
    python bench/bench_e2e.py --model-shape 30b --batch 1,4 --seq 512,256 --method zosgd,zosgd-transient,mezo-inplace \
                              --memory-cap h100-80gb
    python bench/bench_e2e.py --model-shape 125m --batch 16 --seq 256 --method zosgd --cuda-graph
    python bench/bench_e2e.py --model-shape tiny --device cpu --steps 1 --warmup 1     # CPU smoke test

The model is a random-init `transformers.LlamaForCausalLM` (weights ~ N(0, 0.02^2), norms 1, untied lm_head), built
on the meta device and materialised with `to_empty` directly on the target device in the target dtype, then filled
in place: a 30B model never exists twice, and building it takes seconds. The loss is the causal-LM loss of one fixed
batch of random token ids, `model(input_ids=ids, labels=ids, use_cache=False).loss`, with the model in eval mode.
`--batch` and `--seq` take comma lists, paired up (one value is repeated): `--batch 16,1 --seq 256,512` runs
16x256 and 1x512 in one process.

Methods (`--method`, a comma list, or all / dense / masked):

  zosgd             mk.ZOSGD(mode="inplace"): +eps pass, -eps pass (undoing the first's rounding), fused
                    restore + update pass; 3 passes over the weights, no host sync
  zosgd-lookahead   mk.ZOSGD(lookahead=True): the -eps pass and one fused pass (restore + update + the next step's
                    +eps, op 3); 2 passes per step, the same weights as zosgd at every step
  zosgd-transient   mk.ZOSGD(mode="transient"): perturbed copies inside the forwards (one launch per block of at
                    most --transient-group-bytes: by default one decoder layer), one update pass
  mezo              MeZO as written (princeton-nlp/MeZO large_models/trainer.py): torch.manual_seed(seed), per
                    parameter z = torch.normal(...), p.data = p.data + s*z*eps for s = +1, -2, +1 around the two
                    forwards (inference_mode), projected_grad via .item(), then zo_update regenerates z under the same
                    seed: p.data = p.data - lr*(g*z + wd*p.data). Four regenerations, every op out of place.
  mezo-inplace      the same loop with p.data.add_(z, alpha=s*eps) and p.data.add_(z, alpha=-lr*g)
  sparse-zosgd      ZOSGD with Sparse MeZO threshold masks (ThresholdMask(tau) per 2-D weight, tau from
                    --sparsity: the (1 - sparsity) smallest |w| of each matrix train); only the 2-D weights train
  sparse-mezo       the MeZO loop over the same weights with Sparse MeZO's dense mask, recomputed from the current
                    weights in every pass: z = z * (p.abs() <= tau)
  mazo-zosgd        ZOSGD with MaZO bitmasks (BitMask): per row the top-k of random scores, k = density * cols
                    (mazo_kernels.mask_builder.mask_from_scores, i.e. MaZO's mask rule on random importance scores:
                    no scorer run is needed to time a step)
  mazo-mezo         the MeZO loop with the same selection stored as a dense bool tensor per weight: z = z * mask
  sparse-mezo-inplace, mazo-mezo-inplace   the masked MeZO loops with in-place adds (not in "all")

For every method and batch shape, in one process, with CUDA events (time.perf_counter on the CPU):
  forwards   two forward+loss calls alone, in the context the method runs them in (no_grad / inference_mode)
  passes     the method's passes over the weights alone, in step order (ours: the optimizer's own launch tables;
             MeZO: its perturb / update functions), each timed; `one_pass_ms` is the first (theta + eps*z)
  step       whole optimizer steps (median of --steps after --warmup)
  breakdown  forwards, passes, rest = step - forwards - passes (Python, launches, .item(), allocator; can come out
             slightly negative when the separately timed parts ran slower than inside the step)
  overhead   step - forwards; `overhead_over_one_pass` is the issue's ratio (target <= 3.3 for ZOSGD in place)
  memory     weights' bytes, what was resident before the step, peak allocated during the forwards alone, during
             the passes alone and during the steps (torch.cuda.max_memory_allocated, reset per phase), peak reserved
Speedups compare step times within one batch shape: ours against `mezo` and `mezo-inplace`, masked ours against
their MeZO-style equivalents. Weights are re-initialised (deterministically) before every method and shape.

`--memory-cap h100-80gb` caps this process's allocator (torch.cuda.set_per_process_memory_fraction) at an H100
80GB's memory (85017493504 bytes as torch reports it) minus what this process already holds outside the allocator,
so that a run on a larger GPU shows whether a step fits on an 80 GB card; a number caps at that many GiB.

`--cuda-graph` (CUDA only) also tries to capture one ZOSGD step in a torch.cuda.CUDAGraph and replay it, and
records whether capture worked, whether a replay equals the eager step with the same seeds bit for bit, its time,
and what a captured step means (the seeds are captured with it: see the record's "semantics").

`--check-weights` (default on for models below 2e8 parameters) snapshots the initial weights on the host and
records, per method, the relative change after the timed steps and the drift of one lr = 0 step.

Writes one JSON file (`--out`): a header (device, versions, date, git commit, model, arguments, memory facts) and
per batch shape the per-method records, the comparisons and the issue's targets. The file is rewritten after every
method, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
try:
    import mazo_kernels as mk
except ImportError:     # run from a checkout without installing: the package is beside bench/
    sys.path.insert(0, os.path.dirname(HERE))
    import mazo_kernels as mk

from bench_zo_step import MezoStyle, _mezo_no_decay, environment  # noqa: E402  (MeZO's trainer code, shared)
from mazo_kernels import reference as ref  # noqa: E402
from mazo_kernels.api import _seed_bits  # noqa: E402
from mazo_kernels.mask_builder import mask_from_scores  # noqa: E402
from mazo_kernels.optim import DISTS, ROUNDINGS, run_pass, run_update, schedule  # noqa: E402
from mazo_kernels.sparse_mezo import frozen_count  # noqa: E402

FORMAT = "mazo_kernels.bench_e2e"
FORMAT_VERSION = 1
H100_80GB_BYTES = 85017493504        # torch.cuda.get_device_properties(...).total_memory on an H100 80GB HBM3
                                     # (bench/results/h100_2026-11-23/matrix_core.json)
SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),          # TinyLlama-1.1B's shape
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                num_key_value_heads=52, vocab_size=32000),        # LLaMA-30B (~32.5 B parameters)
}
# name: (implementation, mask kind, mode / in place)
METHODS = {
    "zosgd": ("ours", None, "inplace"),
    "zosgd-transient": ("ours", None, "transient"),
    "zosgd-lookahead": ("ours", None, "lookahead"),
    "mezo": ("mezo", None, False),
    "mezo-inplace": ("mezo", None, True),
    "sparse-zosgd": ("ours", "threshold", "inplace"),
    "sparse-mezo": ("mezo", "threshold", False),
    "mazo-zosgd": ("ours", "bits", "inplace"),
    "mazo-mezo": ("mezo", "bits", False),
    "sparse-mezo-inplace": ("mezo", "threshold", True),
    "mazo-mezo-inplace": ("mezo", "bits", True),
}
ALL = ["zosgd", "zosgd-transient", "zosgd-lookahead", "mezo", "mezo-inplace", "sparse-zosgd", "sparse-mezo",
       "mazo-zosgd", "mazo-mezo"]
GROUPS = {"all": ALL, "dense": ALL[:5], "masked": ALL[5:]}
# (ours, baseline): the comparisons the issue asks for
PAIRS = [("zosgd", "mezo"), ("zosgd", "mezo-inplace"), ("zosgd-lookahead", "mezo"), ("zosgd-lookahead", "mezo-inplace"),
         ("zosgd-transient", "mezo"),
         ("zosgd-transient", "mezo-inplace"), ("sparse-zosgd", "sparse-mezo"), ("sparse-zosgd", "sparse-mezo-inplace"),
         ("mazo-zosgd", "mazo-mezo"), ("mazo-zosgd", "mazo-mezo-inplace")]
# the targets (LLaMA-7B, bf16): overhead / one pass, and step speedup against MeZO as written per batch shape
TARGET_OVERHEAD_OVER_PASS = 3.3
TARGET_SPEEDUP_7B = {(16, 256): 1.5, (1, 512): 3.0}
_OOM = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", MemoryError))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INIT_STD = 0.02
_CHUNK = 1 << 26


# ---------------------------------------------------------------- model, weights, batch
def model_fields(shape: str, overrides: dict, seq: int) -> dict:
    fields = dict(SHAPES[shape], max_position_embeddings=max(2048, seq), tie_word_embeddings=False,
                  rms_norm_eps=1e-5, initializer_range=INIT_STD)
    fields.update(overrides)
    return fields


def build_model(fields: dict, dtype: torch.dtype, device: torch.device, seed: int):
    """LlamaForCausalLM built on the meta device, materialised on `device` with to_empty (no host copy, no second
    copy of the weights), its non-persistent buffers (rotary inv_freq) recomputed, its weights filled in place."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**fields)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.to_empty(device=device)
    _rebuild_buffers(model)
    init_weights(model, seed)
    model.eval()
    return model, cfg


def _rebuild_buffers(model):
    """to_empty leaves buffers uninitialised; LLaMA's only ones are the rotary embedding's (computed, not learned)."""
    for name, mod in model.named_modules():
        bufs = dict(mod.named_buffers(recurse=False))
        if not bufs:
            continue
        if "RotaryEmbedding" in type(mod).__name__ and hasattr(mod, "config"):
            fresh = type(mod)(mod.config)          # on the host, float32 as transformers computes it
            for bname, b in fresh.named_buffers(recurse=False):
                getattr(mod, bname).copy_(b)
            if hasattr(fresh, "attention_scaling"):
                mod.attention_scaling = fresh.attention_scaling
            continue
        raise RuntimeError(f"bench_e2e: do not know how to initialise the buffers {sorted(bufs)} of {name!r} "
                           f"({type(mod).__name__}) after to_empty")


@torch.no_grad()
def init_weights(model, seed: int):
    """Deterministic in-place init: matrices ~ N(0, 0.02^2) (as transformers initialises LLaMA), norms 1. The same
    seed gives the same weights on the same device, so every method starts from the same weights."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for _, p in model.named_parameters():
        t = p.data
        if t.dim() == 1:
            t.fill_(1.0)
        else:
            for chunk in t.view(-1).split(_CHUNK):
                chunk.normal_(0.0, INIT_STD, generator=gen)


def make_batch(vocab: int, batch: int, seq: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- masks
def threshold_taus(named, sparsity: float):
    """Sparse MeZO's per-matrix tau, exactly mk.magnitude_threshold's definition (the (n_sel+1)-th smallest |w| in
    float32, n_sel = numel - frozen_count), computed with torch.sort rather than torch.kthvalue: on CUDA kthvalue
    runs one thread block per slice, slow for a 45M-element matrix (see `threshold_timing` in the JSON).
    Returns ({name: tau}, elements selected (|w| < tau))."""
    taus, selected = {}, 0
    for name, p in named:
        n = p.numel()
        n_frozen = frozen_count(n, sparsity)
        if n_frozen == 0:
            taus[name] = mk.sparse_mezo.TAU_ALL
            selected += n
            continue
        a = p.detach().reshape(-1).to(torch.float32).abs_()
        srt = torch.sort(a).values
        taus[name] = float(srt[n - n_frozen])
        selected += int(torch.searchsorted(srt, srt[n - n_frozen]))     # |w| < tau: ties with tau are frozen
        del a, srt
    return taus, selected


def mazo_bits(named, density: float, seed: int):
    """MaZO's top-k-per-row rule (mask_from_scores) on random scores: ({name: BitMask}, elements selected)."""
    out, selected = {}, 0
    device = named[0][1].device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 7919)
    for name, p in named:
        score = torch.rand(p.shape, generator=gen, device=device, dtype=torch.float32)
        out[name], info = mask_from_scores(score, density, format="bits")
        selected += info.selected
        del score
    return out, selected


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """Dense bool [shape] from packed bits (bit i % 8 of byte i // 8)."""
    n = math.prod(shape)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    out = torch.empty(n, dtype=torch.bool, device=bits.device)
    step = 1 << 24
    for b0 in range(0, bits.numel(), step):
        chunk = ((bits[b0:b0 + step, None] >> shifts) & 1).bool().reshape(-1)
        e0 = b0 * 8
        out[e0:e0 + chunk.numel()] = chunk[:max(0, n - e0)]
    return out.view(shape)


class MaskCache:
    """Masks of the current mask kind; dropped when a method of another kind starts (so dense methods never carry
    them in their memory figures)."""

    def __init__(self):
        self.clear()

    def get(self, kind, named, args, timer):
        if kind != self.kind:
            self.clear()
            t0 = time.perf_counter()
            if kind == "threshold":
                self.value, self.selected = threshold_taus(named, args.sparsity)
            elif kind == "bits":
                self.value, self.selected = mazo_bits(named, args.density, args.seed)
            timer.sync()
            self.kind, self.build_s = kind, time.perf_counter() - t0
        return self.value

    def clear(self):
        self.kind, self.value, self.selected, self.build_s = None, None, None, 0.0


# ---------------------------------------------------------------- MeZO as users run it, plus its variants
class MezoBaseline(MezoStyle):
    """princeton-nlp/MeZO's perturb / forward / update code (bench_zo_step.MezoStyle, whose `step` with its
    `.item()` is used unchanged) over a given parameter list, optionally with in-place adds and Sparse MeZO / MaZO
    masks applied to z the way MeZO-style masked code does (a dense mask multiplied into z)."""

    def __init__(self, model, named, lr, eps, weight_decay=0.0, *, inplace=False, mask_kind=None, taus=None,
                 dense=None, seed=0):
        super().__init__(model, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed)
        self.named_parameters_to_optim = list(named)
        self.inplace, self.mask_kind, self.taus, self.dense = inplace, mask_kind, taus, dense

    def _z(self, name, param):
        z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
        if self.mask_kind == "threshold":      # Sparse MeZO: the mask is recomputed from the weights in every pass
            z = z * (param.data.abs() <= self.taus[name])
        elif self.mask_kind == "bits":         # a stored dense bool mask
            z = z * self.dense[name]
        return z

    def zo_perturb_parameters(self, scaling_factor=1):
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = self._z(name, param)
            if self.inplace:
                param.data.add_(z, alpha=scaling_factor * self.eps)
            else:
                param.data = param.data + scaling_factor * z * self.eps

    def zo_update(self):
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = self._z(name, param)
            decay = self.weight_decay if not _mezo_no_decay(name) else 0.0
            if self.inplace:
                if decay:
                    param.data.mul_(1.0 - self.lr * decay)
                param.data.add_(z, alpha=-self.lr * self.projected_grad)
            elif not _mezo_no_decay(name):
                param.data = param.data - self.lr * (self.projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (self.projected_grad * z)

    def set_lr(self, lr):
        self.lr = lr

    def pass_fns(self):
        """The step's four regeneration passes, without the forwards (g = 0, so the update leaves the weights)."""
        def setup():
            self.zo_random_seed = 123456789
            self.projected_grad = 0.0
        setup()
        return (["perturb +eps", "perturb -2eps", "perturb +eps", "update"],
                [lambda: self.zo_perturb_parameters(1), lambda: self.zo_perturb_parameters(-2),
                 lambda: self.zo_perturb_parameters(1), self.zo_update])


# ---------------------------------------------------------------- ours: the passes of a step, alone
def ours_pass_fns(opt: mk.ZOSGD):
    """The optimizer's own launches of one step without its forwards, in step order, through the engine functions
    ZOSGD.step itself calls (mazo_kernels.optim.run_pass / run_update) on the optimizer's launch tables. g = 0, so
    the final update only restores. Transient mode: one sweep of the per-block perturbed copies stands for the copies
    made inside each forward (they are made by the forward hooks in the real step).
    Lookahead: the first function is the +eps pass a plain step would run (timed as `one_pass_ms`, not part of the
    step); then the -eps pass and the fused restore + update + next +eps pass. Returns (labels, fns, skip): skip = 1
    where the first function is not one of the step's passes."""
    dist, backend = DISTS[opt.dist], opt.backend
    seed, sr_seed = 0x243F6A8885A308D3, 0x13198A2E03707344
    items, final = schedule(opt.mode, opt.estimator, [seed])
    dev = opt._device
    gs = torch.zeros(1, dtype=torch.float32, device=dev)
    finite = torch.ones((), dtype=torch.bool, device=dev)
    labels, fns = [], []
    if hasattr(opt, "_run_pass"):           # the optimizer's own per-device loop (models split over devices)
        one_pass = lambda it: opt._run_pass(it, dist)  # noqa: E731
        update = lambda: opt._run_update([seed], final, gs, finite, dist, sr_seed)  # noqa: E731
    else:
        one_pass = lambda it: run_pass(opt._tables, it, dist, backend, opt._empty)  # noqa: E731
        update = lambda: run_update(opt._tables, [seed], final, gs, finite, dist,  # noqa: E731
                                    ROUNDINGS[opt.rounding], sr_seed, backend, opt._lr_col)
    skip = 0
    if getattr(opt, "lookahead", False):
        nxt = seed ^ 0x5BD1E995

        def update():
            for pt in opt._parts:
                run_update(pt.tables, [seed], final, gs, finite, dist, ROUNDINGS[opt.rounding], sr_seed, pt.backend,
                           pt.lr_col, next_seed=nxt)
        skip = 1
    if opt.mode == "inplace":
        for i, it in enumerate(items):
            if it[0] == "P":
                labels.append(("not in the step: " if skip and i == 0 else "") +
                              f"perturb scale {it[2]:+g} prior {it[3]:+g}")
                fns.append(lambda it=it: one_pass(it))
    else:
        tp = opt._transient

        def sweep(scale):
            for _mod, own, tables in tp._owners:
                tp._swap_in(own, tables, _seed_bits(seed), scale, dist, backend)
                tp._swap_out(own)
        for it in items:
            if it[0] == "F":
                labels.append(f"copies, {tp.launch_groups} launch groups, scale {it[3]:+g}")
                fns.append(lambda s=it[3]: sweep(s))
    labels.append(("restore + update + next +eps" if skip else "restore + update") if opt.mode == "inplace"
                  else "update")
    fns.append(update)
    return labels, fns, skip


# ---------------------------------------------------------------- timing
class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def sequence(self, fns, n: int, warmup: int):
        """Run the functions in order, n times after warmup; returns (per-function ms lists, host ms per round).
        CUDA: events recorded between the calls, read after one synchronisation (device time, and no added sync)."""
        for _ in range(warmup):
            for f in fns:
                f()
        self.sync()
        per = [[] for _ in fns]
        host = []
        if not self.cuda:
            for _ in range(n):
                t_round = time.perf_counter()
                for i, f in enumerate(fns):
                    t0 = time.perf_counter()
                    f()
                    per[i].append((time.perf_counter() - t0) * 1e3)
                host.append((time.perf_counter() - t_round) * 1e3)
            return per, host
        rounds = []
        for _ in range(n):
            evs = [torch.cuda.Event(enable_timing=True) for _ in range(len(fns) + 1)]
            t_round = time.perf_counter()
            evs[0].record()
            for f, e in zip(fns, evs[1:]):
                f()
                e.record()
            host.append((time.perf_counter() - t_round) * 1e3)
            rounds.append(evs)
        self.sync()
        for evs in rounds:
            for i in range(len(fns)):
                per[i].append(evs[i].elapsed_time(evs[i + 1]))
        return per, host


class Memory:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def allocated(self):
        return int(torch.cuda.memory_allocated()) if self.cuda else None

    def peak(self):
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())

    def peak_reserved(self):
        return int(torch.cuda.max_memory_reserved()) if self.cuda else None


def median(xs):
    return float(statistics.median(xs)) if xs else None


# ---------------------------------------------------------------- one method, one batch shape
def trained_params(model, mask_kind):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in named if p.dim() == 2] if mask_kind else named


def make_method(method, model, args, masks, dense):
    impl, mask_kind, mode = METHODS[method]
    named = trained_params(model, mask_kind)
    if impl == "ours":
        m = None
        if mask_kind == "threshold":
            m = {n: mk.ThresholdMask(masks[n]) for n, _ in named}
        elif mask_kind == "bits":
            m = {n: masks[n] for n, _ in named}
        opt = mk.ZOSGD(named, lr=args.lr, eps=args.eps, weight_decay=args.weight_decay,
                       mode="inplace" if mode == "lookahead" else mode, module=model, masks=m, backend=args.backend,
                       seed=args.seed, dist=args.dist, transient_group_bytes=args.transient_group_bytes,
                       lookahead=mode == "lookahead")
        return opt, named
    opt = MezoBaseline(model, named, args.lr, args.eps, args.weight_decay, inplace=mode, mask_kind=mask_kind,
                       taus=masks if mask_kind == "threshold" else None, dense=dense, seed=args.seed)
    return opt, named


def set_lr(opt, lr):
    if isinstance(opt, MezoBaseline):
        opt.set_lr(lr)
    else:
        for g in opt.param_groups:
            g["lr"] = lr


def weight_stats(named, snapshot):
    """RMS(theta - theta0) / RMS(theta0) over the trained weights, fraction of their elements that changed, and
    whether all are finite."""
    num = den = 0.0
    changed = total = 0
    finite = True
    for n, p in named:
        s = snapshot[n]
        w = p.detach().to("cpu", torch.float32)
        d = (w - s).double()
        num += float(d.pow(2).sum())
        den += float(s.double().pow(2).sum())
        changed += int((w != s).sum())
        total += s.numel()
        finite = finite and bool(torch.isfinite(w).all())
    return {"rel_rms_change": math.sqrt(num / den) if den else None, "changed_fraction": changed / max(1, total),
            "finite": finite}


def run_method(rec, model, ids, args, clock, mem, cache, snapshot):
    """Fills `rec` as it goes (so a failure keeps what was measured; rec["phase"] says where it stopped)."""
    method = rec["method"]
    impl, mask_kind, mode = METHODS[method]
    rec.update(impl=impl, mask=mask_kind, mode=mode if impl == "ours" else ("inplace" if mode else "out_of_place"),
               phase="setup")
    init_weights(model, args.seed)
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
    named = trained_params(model, mask_kind)
    masks = cache.get(mask_kind, named, args, clock) if mask_kind else None
    rec["mask_build_s"] = cache.build_s if mask_kind else None
    dense = None
    t0 = time.perf_counter()
    if mask_kind == "bits" and impl == "mezo":
        dense = {n: unpack_bits(masks[n].bits, tuple(p.shape)) for n, p in named}
    opt, named = make_method(method, model, args, masks, dense)
    clock.sync()
    rec["setup_s"] = time.perf_counter() - t0
    rec["backend"] = getattr(opt, "backend", "torch")
    rec["trained_params"] = sum(p.numel() for _, p in named)
    rec["trained_bytes"] = nbytes([p for _, p in named])
    if mask_kind == "bits":
        rec["mask_bytes"] = nbytes([masks[n].bits for n, _ in named]) if impl == "ours" else nbytes(dense.values())
    elif mask_kind == "threshold":
        rec["mask_bytes"] = 0 if impl == "mezo" else sum((p.numel() + 7) // 8 for _, p in named)   # our latch bits
    if mask_kind:
        rec["mask_selected_fraction"] = cache.selected / rec["trained_params"]
    rec["mem_resident_before_bytes"] = mem.allocated()

    def closure():
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    # 1. the two forwards alone, in the method's forward context
    rec["phase"] = "forwards"
    ctx = torch.inference_mode if impl == "mezo" or opt.inference_mode else torch.no_grad
    rec["forward_context"] = ctx.__name__

    def fwd():
        with ctx():
            closure()
    mem.reset()
    per, _ = clock.sequence([fwd, fwd], args.steps, args.warmup)
    rec["fwd2_ms"] = median([a + b for a, b in zip(*per)])
    rec["fwd_ms"] = [median(x) for x in per]
    rec["mem_peak_forward_bytes"] = mem.peak()

    # 2. the passes of one step alone
    rec["phase"] = "passes"
    labels, fns, skip = (*opt.pass_fns(), 0) if impl == "mezo" else ours_pass_fns(opt)
    mem.reset()
    with torch.no_grad():
        per, _ = clock.sequence(fns, args.steps, max(1, args.warmup // 2))
    rec["pass_labels"] = labels
    rec["pass_ms"] = [median(x) for x in per]
    rec["passes_ms"] = median([sum(r[skip:]) for r in zip(*per)])
    rec["one_pass_ms"] = rec["pass_ms"][0]
    rec["mem_peak_passes_bytes"] = mem.peak()

    # 3. whole steps
    rec["phase"] = "steps"
    init_weights(model, args.seed)
    losses = []

    def step():
        losses.append(opt.step(closure))
    mem.reset()
    per, host = clock.sequence([step], args.steps, args.warmup)
    rec["step_ms"] = median(per[0])
    rec["step_ms_all"] = per[0]
    rec["host_ms"] = median(host)
    rec["mem_peak_step_bytes"] = mem.peak()
    rec["mem_peak_reserved_bytes"] = mem.peak_reserved()
    if clock.cuda:
        wb = nbytes(model.parameters())
        rec["mem_peak_step_over_weights"] = rec["mem_peak_step_bytes"] / wb
        rec["mem_step_minus_forward_bytes"] = rec["mem_peak_step_bytes"] - rec["mem_peak_forward_bytes"]
        rec["mem_passes_minus_resident_bytes"] = rec["mem_peak_passes_bytes"] - rec["mem_resident_before_bytes"]
    last = losses[-1]
    rec["loss_last"] = float(last) if isinstance(last, torch.Tensor) else float(last)
    rec["losses_finite"] = all(math.isfinite(float(x)) for x in losses)

    # 4. (--paired) the two forwards and a step in one round, n rounds: the overhead as the median of each round's
    # step minus its own forwards, so drift between the separate loops above (clocks, other processes) cancels
    if getattr(args, "paired", False):
        rec["phase"] = "paired"
        per, _ = clock.sequence([fwd, fwd, step], args.steps, args.warmup)
        diffs = [s_ - (a + b) for a, b, s_ in zip(*per)]
        ovh = median(diffs)
        rec["paired"] = {"rounds": args.steps, "fwd2_ms": median([a + b for a, b in zip(per[0], per[1])]),
                         "step_ms": median(per[2]), "overhead_ms": ovh, "overhead_ms_all": diffs,
                         "overhead_over_one_pass": ovh / rec["one_pass_ms"] if rec["one_pass_ms"] else None}
    losses.clear()

    # breakdown and ratios
    fw, ps, st = rec["fwd2_ms"], rec["passes_ms"], rec["step_ms"]
    rec["breakdown_ms"] = {"forwards": fw, "passes": ps, "rest": st - fw - ps}
    rec["overhead_ms"] = st - fw
    rec["overhead_over_one_pass"] = (st - fw) / rec["one_pass_ms"] if rec["one_pass_ms"] else None
    rec["step_over_fwd2"] = st / fw if fw else None

    # weights: changed by the timed steps? restored by an lr = 0 step?
    rec["phase"] = "check"
    settle = getattr(opt, "settle", lambda: None)   # lookahead: the weights carry the next +eps between steps
    if snapshot is not None:
        settle()
        rec["check"] = {"after_timed_steps": weight_stats(named, snapshot),
                        "timed_steps": args.warmup + args.steps, "lr": args.lr}
        init_weights(model, args.seed)
        set_lr(opt, 0.0)
        opt.step(closure)
        settle()
        clock.sync()
        rec["check"]["after_one_lr0_step"] = weight_stats(named, snapshot)
    del opt, dense
    rec["phase"] = "done"
    return rec


def safe_run_method(method, model, ids, args, clock, mem, cache, snapshot, label=None):
    """`label` names the record when it is not the method itself (a method run on --compare-backend)."""
    rec = {"method": method}
    try:
        run_method(rec, model, ids, args, clock, mem, cache, snapshot)
        rec["status"] = "ok"
    except Exception as exc:    # noqa: BLE001 -- record and go on with the next method
        oom = isinstance(exc, _OOM) or "out of memory" in str(exc).lower()
        rec.update(status="oom" if oom else "error", error=f"{type(exc).__name__}: {exc}"[:1500])
        if not oom:
            rec["traceback"] = traceback.format_exc()[-4000:]
            traceback.print_exc()
        if clock.cuda:
            rec["mem_peak_bytes_at_failure"] = int(torch.cuda.max_memory_allocated())
        del exc
    if label is not None:
        rec.update(method=label, base_method=method)
    gc.collect()
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return rec


def backend_ab(results, other):
    """Each of our methods against itself on --compare-backend (records `<method>@<other>`), in one process."""
    ok = {r["method"]: r for r in results if r.get("status") == "ok"}
    out = []
    for name, r in ok.items():
        b = ok.get(f"{name}@{other}")
        if b is None:
            continue
        out.append({"method": name, "backend": r.get("backend"), "other_backend": b.get("backend"),
                    "step_ms": r["step_ms"], "other_step_ms": b["step_ms"],
                    "passes_ms": r["passes_ms"], "other_passes_ms": b["passes_ms"],
                    "passes_ratio": r["passes_ms"] / b["passes_ms"] if b["passes_ms"] else None,
                    "step_ratio": r["step_ms"] / b["step_ms"]})
    return out


# ---------------------------------------------------------------- comparisons and targets
def compare(results):
    ok = {r["method"]: r for r in results if r.get("status") == "ok"}
    out = []
    for a, b in PAIRS:
        if a in ok and b in ok:
            ra, rb = ok[a], ok[b]
            out.append({"ours": a, "baseline": b, "step_speedup": rb["step_ms"] / ra["step_ms"],
                        "overhead_ratio": rb["overhead_ms"] / ra["overhead_ms"] if ra["overhead_ms"] > 0 else None,
                        "passes_speedup": rb["passes_ms"] / ra["passes_ms"] if ra["passes_ms"] else None})
    return out


def targets(shape, batch, seq, results, comps):
    ok = {r["method"]: r for r in results if r.get("status") == "ok"}
    out = []
    for m in ("zosgd", "zosgd-lookahead", "sparse-zosgd", "mazo-zosgd"):
        if m in ok and ok[m]["overhead_over_one_pass"] is not None:
            v = ok[m]["overhead_over_one_pass"]
            out.append({"what": f"{m}: (step - 2 forwards) / one pass", "value": v,
                        # a negative value means the forwards, timed apart, took longer than the whole step
                        # (timing noise, not a result): never "met"
                        "target": f"<= {TARGET_OVERHEAD_OVER_PASS}", "met": 0 <= v <= TARGET_OVERHEAD_OVER_PASS})
    want = TARGET_SPEEDUP_7B.get((batch, seq)) if shape == "7b" else None
    if want is not None:
        for c in comps:
            if c["baseline"] == "mezo" and c["ours"] in ("zosgd", "zosgd-lookahead"):
                out.append({"what": f"{c['ours']} step speedup vs MeZO as written", "value": c["step_speedup"],
                            "target": f">= {want}", "met": c["step_speedup"] >= want})
        for ours, base in (("sparse-zosgd", "sparse-mezo"), ("mazo-zosgd", "mazo-mezo")):
            for c in comps:
                if c["ours"] == ours and c["baseline"] == base:
                    out.append({"what": f"{ours} step speedup vs {base}", "value": c["step_speedup"],
                                "target": f">= {want} (the dense target, applied to the masked pair)",
                                "met": c["step_speedup"] >= want})
    return out


# ---------------------------------------------------------------- CUDA graph (small models)
GRAPH_SEMANTICS = (
    "mk.GraphedZOStep captures one whole ZOSGD step (both passes, both forwards, the loss difference and the fused "
    "restore + update) in a CUDA graph. The kernels read the step's seeds from a device tensor written before each "
    "replay (from the same mk.step_seeds as an eager step), the multipliers from the plan's device tables, and the "
    "seed log gets every replayed step with its projected gradient: a replay loop is a training loop. The check runs "
    "the eager ZOSGD and the graphed one from the same initial weights for the same steps and compares losses, "
    "weights and the seed logs' projected gradients bit for bit.")


def cuda_graph_experiment(model, ids, args, clock, write, res=None):
    """Eager ZOSGD step vs the same step captured in a CUDA graph (and two forwards eager vs captured). Fills `res`
    in place (so that `write()` saves what is known before a risky call)."""
    res = {} if res is None else res
    la = bool(getattr(args, "graph_lookahead", False))
    res.update(method="zosgd-lookahead" if la else "zosgd", semantics=GRAPH_SEMANTICS, attempts=[], lookahead=la)
    init_weights(model, args.seed)

    def closure():
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def fwd2():
        with torch.no_grad():
            closure()
            closure()

    def new_opt():
        return mk.ZOSGD(model.named_parameters(), lr=args.lr, eps=args.eps, module=model, backend=args.backend,
                        seed=args.seed, dist=args.dist, lookahead=la)

    opt = new_opt()
    res["backend"] = opt.backend
    per, host = clock.sequence([lambda: opt.step(closure)], args.steps, args.warmup)
    res["eager_step_ms"], res["eager_host_ms"] = median(per[0]), median(host)
    per, _ = clock.sequence([fwd2], args.steps, args.warmup)
    res["eager_fwd2_ms"] = median(per[0])

    # two forwards captured (the floor a captured step can reach)
    try:
        g2 = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fwd2()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g2):
            fwd2()
        per, _ = clock.sequence([g2.replay], args.steps, args.warmup)
        res["graph_fwd2_ms"] = median(per[0])
        del g2
        # does a captured forward give the eager forward's loss bit for bit (same weights)? If not, a replayed
        # step cannot equal the eager one whatever the ZO kernels do (cuBLAS may pick other GEMM algorithms
        # inside a capture)
        with torch.no_grad():
            eager_loss = closure().detach().clone()
            g1 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g1):
                static_loss = closure()
            g1.replay()
            torch.cuda.synchronize()
            res["captured_forward_loss_equals_eager"] = bool(torch.equal(static_loss, eager_loss))
            res["captured_forward_loss"], res["eager_forward_loss"] = float(static_loss), float(eager_loss)
            del g1, static_loss
    except Exception as exc:  # noqa: BLE001
        res["graph_fwd2_error"] = f"{type(exc).__name__}: {exc}"[:1500]
    write()

    # the step in a graph: eager reference run first, then the graphed run from the same weights
    nsteps = 2 + max(3, args.steps)        # 2 warm-up (eager) steps inside GraphedZOStep, then replays
    init_weights(model, args.seed)
    opt = new_opt()
    eager_losses = [opt.step(closure).clone() for _ in range(nsteps)]
    torch.cuda.synchronize()
    w_eager = {n: p.detach().clone() for n, p in model.named_parameters()}
    g_eager = [r["g_bits"] for r in opt.seed_log.steps]
    init_weights(model, args.seed)
    opt = new_opt()
    att = {"how": "mk.GraphedZOStep(opt, closure, warmup=2)"}
    res["attempts"].append(att)
    try:
        t0 = time.perf_counter()
        step = mk.GraphedZOStep(opt, closure, warmup=2)
        torch.cuda.synchronize()
        att["captured"] = True
        att["warmup_and_capture_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001
        att["captured"] = False
        att["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        att["traceback"] = traceback.format_exc()[-3000:]
        res["capturable"] = False
        write()
        return res
    res["capturable"] = True
    graph_losses = [None, None] + [step().clone() for _ in range(nsteps - 2)]
    torch.cuda.synchronize()
    same_w = all(torch.equal(w_eager[n], p.detach()) for n, p in model.named_parameters())
    same_l = all(torch.equal(a, b) for a, b in zip(eager_losses[2:], graph_losses[2:]))
    same_g = [r["g_bits"] for r in opt.seed_log.steps] == g_eager
    res["steps_compared"] = nsteps
    res["replay_equals_eager_step"] = bool(same_w and same_l and same_g)
    res["replay_equals_eager"] = {"weights": bool(same_w), "losses": bool(same_l), "seed_log_g": bool(same_g)}
    res["replay_losses"] = [float(x) for x in graph_losses[2:]]
    res["eager_losses"] = [float(x) for x in eager_losses[2:]]
    del w_eager
    per, host = clock.sequence([step], args.steps, args.warmup)
    res["graph_step_ms"], res["graph_host_ms"] = median(per[0]), median(host)
    res["seed_log_steps_after_replays"] = len(opt.seed_log)
    res["step_counter_after_replays"] = opt._step_count
    res["graph_speedup_vs_eager_step"] = res["eager_step_ms"] / res["graph_step_ms"]
    if res.get("graph_fwd2_ms"):
        res["graph_step_minus_graph_fwd2_ms"] = res["graph_step_ms"] - res["graph_fwd2_ms"]
    del step
    return res


# ---------------------------------------------------------------- output
def _clean(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path, doc):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(doc), f, indent=1)
    os.replace(tmp, path)


def _ms(x):
    return "-" if x is None else f"{x:.2f}"


def print_config(cfg):
    print(f"\n== batch {cfg['batch']} x seq {cfg['seq']}")
    print(f"{'method':<20}{'step':>9}{'fwd2':>9}{'passes':>9}{'rest':>8}{'1 pass':>8}{'ovh/pass':>9}"
          f"{'host':>8}{'peak GiB':>9}")
    for r in cfg["results"]:
        if r.get("status") != "ok":
            print(f"{r['method']:<20}{r.get('status')}: {r.get('error', '')[:80]}")
            continue
        pk = r["mem_peak_step_bytes"]
        print(f"{r['method']:<20}{_ms(r['step_ms']):>9}{_ms(r['fwd2_ms']):>9}{_ms(r['passes_ms']):>9}"
              f"{_ms(r['breakdown_ms']['rest']):>8}{_ms(r['one_pass_ms']):>8}"
              f"{_ms(r['overhead_over_one_pass']):>9}{_ms(r['host_ms']):>8}"
              f"{'-' if pk is None else f'{pk / 2**30:.2f}':>9}")
    for c in cfg.get("comparisons", []):
        print(f"  {c['ours']} vs {c['baseline']}: step x{c['step_speedup']:.2f}")
    for r in cfg["results"]:
        pr = r.get("paired")
        if r.get("status") == "ok" and pr and pr.get("overhead_over_one_pass") is not None:
            print(f"  {r['method']} paired: step - its own 2 forwards {pr['overhead_ms']:.2f} ms = "
                  f"{pr['overhead_over_one_pass']:.2f} passes ({pr['rounds']} rounds)")
    for c in cfg.get("backend_ab", []):
        print(f"  {c['method']} {c['backend']} / {c['other_backend']}: passes x{c['passes_ratio']:.3f}, "
              f"step x{c['step_ratio']:.3f}")
    for t in cfg.get("targets", []):
        print(f"  target {t['what']}: {t['value']:.2f} ({t['target']}) {'met' if t['met'] else 'NOT met'}")


def parse_methods(text):
    out = []
    for m in text.split(","):
        m = m.strip()
        if not m:
            continue
        if m in GROUPS:
            out += GROUPS[m]
        elif m in METHODS:
            out.append(m)
        else:
            raise SystemExit(f"--method: unknown {m!r}; choose from {sorted(METHODS)} or {sorted(GROUPS)}")
    order = list(METHODS)      # canonical order: masks built once per kind, dense methods never carry them
    return sorted(dict.fromkeys(out), key=order.index)


def parse_shapes(batch: str, seq: str):
    bs = [int(x) for x in str(batch).split(",") if x.strip()]
    ss = [int(x) for x in str(seq).split(",") if x.strip()]
    if len(bs) == 1:
        bs = bs * len(ss)
    if len(ss) == 1:
        ss = ss * len(bs)
    if len(bs) != len(ss) or not bs or min(bs + ss) < 1:
        raise SystemExit("--batch and --seq: comma lists of positive ints of equal length (or one value)")
    return list(zip(bs, ss))


def parse_config(text):
    if not text:
        return {}
    if os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise SystemExit("--config must be a JSON object of LlamaConfig fields")
    return cfg


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--config", default=None, help="JSON object (or file) of LlamaConfig fields overriding the shape")
    ap.add_argument("--batch", default="16", help="batch size(s), comma list paired with --seq")
    ap.add_argument("--seq", default="256", help="sequence length(s), comma list paired with --batch")
    ap.add_argument("--method", "--methods", dest="method", default="all",
                    help=f"comma list of {list(METHODS)} or all / dense / masked")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", help="ZOSGD backend (auto, cuda, triton, fastest, cpu, reference)")
    ap.add_argument("--compare-backend", default=None,
                    help="also run each of our methods on this backend, in the same process (records <method>@<it>)")
    ap.add_argument("--paired", action="store_true",
                    help="also time rounds of (forward, forward, step): the overhead as each step minus its own "
                         "forwards (record['paired'])")
    ap.add_argument("--steps", type=int, default=5, help="timed repetitions of each measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--sparsity", type=float, default=0.75, help="Sparse MeZO: fraction of each matrix frozen")
    ap.add_argument("--density", type=float, default=0.1, help="MaZO: fraction of each row trained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transient-group-bytes", type=int, default=None,
                    help="zosgd-transient: ZOSGD(transient_group_bytes=...); default the optimizer's rule, 0 one "
                         "copy launch per owning module")
    ap.add_argument("--dist", choices=["gaussian", "gaussian_fast", "rademacher"], default="gaussian",
                    help="noise of the ZOSGD methods (the MeZO baselines always draw Gaussian, as MeZO does)")
    ap.add_argument("--memory-cap", default="none",
                    help="none | h100-80gb | GiB: cap the allocator to emulate a smaller card (CUDA)")
    ap.add_argument("--cuda-graph", action="store_true", help="also capture a ZOSGD step in a CUDA graph")
    ap.add_argument("--graph-lookahead", action="store_true",
                    help="--cuda-graph with ZOSGD(lookahead=True): two passes per captured step")
    ap.add_argument("--check-weights", dest="check_weights", action="store_true", default=None)
    ap.add_argument("--no-check-weights", dest="check_weights", action="store_false")
    ap.add_argument("--label", default="", help="free text stored in the JSON")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/e2e/e2e_<shape>.json)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    methods = parse_methods(args.method)
    shapes = parse_shapes(args.batch, args.seq)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps >= 1, --warmup >= 0")
    out = args.out or os.path.join("bench", "results", "e2e", f"e2e_{args.model_shape}.json")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    clock, mem = Clock(device), Memory(device)
    t_start = time.perf_counter()

    header = environment(str(device))
    if os.environ.get("MAZO_RUN_COMMIT"):   # the commit that ran, where the device copy's git metadata lags
        header["git_commit_as_run"] = os.environ["MAZO_RUN_COMMIT"]
    header.update({"model_shape": args.model_shape, "dtype": args.dtype, "args": vars(args), "methods": methods,
                   "shapes": [list(s) for s in shapes], "label": args.label, "dist": args.dist})
    memory = {}
    if device.type == "cuda":
        torch.zeros(1, device=device)          # create the context
        free, total = torch.cuda.mem_get_info(device)
        memory["total_bytes"] = int(total)
        memory["outside_allocator_bytes_start"] = int(total - free - torch.cuda.memory_reserved(device))
        cap = None
        if args.memory_cap == "h100-80gb":
            cap = H100_80GB_BYTES - memory["outside_allocator_bytes_start"]
            memory["cap_basis"] = ("an H100 80GB's total memory as torch reports it (85017493504 bytes) minus what "
                                   "this process holds outside the allocator at the start (CUDA context)")
        elif args.memory_cap not in ("none", "", None):
            cap = int(float(args.memory_cap) * 2**30)
            memory["cap_basis"] = f"--memory-cap {args.memory_cap} GiB"
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
            memory["allocator_cap_bytes"] = int(cap)
    header["memory"] = memory

    fields = model_fields(args.model_shape, parse_config(args.config), max(s for _, s in shapes))
    t0 = time.perf_counter()
    model, cfg = build_model(fields, dtype, device, args.seed)
    clock.sync()
    header["build_s"] = time.perf_counter() - t0
    params = list(model.parameters())
    header["model_config"] = dict(fields, attn_implementation=getattr(cfg, "_attn_implementation", None))
    header["n_params"] = sum(p.numel() for p in params)
    header["weights_bytes"] = nbytes(params)
    if device.type == "cuda":
        header["memory"]["allocated_after_build_bytes"] = int(torch.cuda.memory_allocated(device))
        header["memory"]["peak_during_build_bytes"] = int(torch.cuda.max_memory_allocated(device))
    print(json.dumps({k: header.get(k) for k in ("device", "torch", "triton", "transformers", "model_shape",
                                                 "n_params", "weights_bytes", "build_s")}), flush=True)

    check = args.check_weights if args.check_weights is not None else header["n_params"] <= 2e8
    snapshot = None
    if check:
        snapshot = {n: p.detach().to("cpu", torch.float32).clone() for n, p in model.named_parameters()}
    header["check_weights"] = bool(check)

    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "header": header,
           "configs": [{"batch": b, "seq": s, "tokens": "uniform random ids, fixed", "results": []}
                       for b, s in shapes],
           "cuda_graph": None}

    def write():
        header["total_wall_s"] = time.perf_counter() - t_start
        write_json(out, doc)

    if any(METHODS[m][1] == "threshold" for m in methods):
        doc["header"]["threshold_timing"] = threshold_timing(model, clock)
    batches = {(b, s): make_batch(fields["vocab_size"], b, s, device, args.seed + 1) for b, s in shapes}
    cache = MaskCache()
    stamp = lambda: time.strftime("%H:%M:%S")  # noqa: E731
    other = args.compare_backend
    if other:
        other_args = argparse.Namespace(**dict(vars(args), backend=other))
    for method in methods:                    # method outer: a mask kind is built once and dropped after
        for ci, (b, s) in enumerate(shapes):
            runs = [(args, None)]
            if other and METHODS[method][0] == "ours":     # the A/B of backends, one after the other per shape
                runs.append((other_args, f"{method}@{other}"))
            for run_args, label in runs:
                name = label or method
                print(f"[{stamp()}] {args.model_shape} {b}x{s} {name} ...", flush=True)
                rec = safe_run_method(method, model, batches[(b, s)], run_args, clock, mem, cache, snapshot, label)
                doc["configs"][ci]["results"].append(rec)
                msg = (f"step {rec['step_ms']:.2f} ms, fwd2 {rec['fwd2_ms']:.2f}, passes {rec['passes_ms']:.2f}"
                       if rec.get("status") == "ok" else f"{rec['status']}: {rec.get('error', '')[:200]}")
                print(f"[{stamp()}]   {msg}", flush=True)
                write()
        nxt = methods[methods.index(method) + 1] if method != methods[-1] else None
        if nxt is None or METHODS[nxt][1] != METHODS[method][1]:
            cache.clear()
    for cfg_rec in doc["configs"]:
        cfg_rec["comparisons"] = compare(cfg_rec["results"])
        if other:
            cfg_rec["backend_ab"] = backend_ab(cfg_rec["results"], other)
        cfg_rec["targets"] = targets(args.model_shape, cfg_rec["batch"], cfg_rec["seq"], cfg_rec["results"],
                                     cfg_rec["comparisons"])
        ok = [r for r in cfg_rec["results"] if r.get("status") == "ok"]
        if ok:
            f2 = [r["fwd2_ms"] for r in ok]
            cfg_rec["fwd2_ms_spread"] = (max(f2) - min(f2)) / statistics.median(f2)
        if device.type == "cuda":
            fits = {}
            free, total = torch.cuda.mem_get_info(device)
            outside = int(total - free - torch.cuda.memory_reserved(device))
            for r in ok:
                need = r["mem_peak_reserved_bytes"] + outside
                fits[r["method"]] = {"peak_reserved_plus_outside_bytes": need, "fits_h100_80gb": need <= H100_80GB_BYTES}
            cfg_rec["fits_h100_80gb"] = fits
            header["memory"]["outside_allocator_bytes_end"] = outside
        print_config(cfg_rec)
    write()

    if args.cuda_graph:
        if device.type != "cuda":
            doc["cuda_graph"] = {"attempted": False, "why": "CUDA graphs need a CUDA device"}
        else:
            b, s = shapes[0]
            print(f"[{stamp()}] cuda graph experiment, {b}x{s}", flush=True)
            res = {}
            doc["cuda_graph"] = {"batch": b, "seq": s, "result": res}
            try:
                cuda_graph_experiment(model, batches[(b, s)], args, clock, write, res)
            except Exception as exc:  # noqa: BLE001
                doc["cuda_graph"]["error"] = f"{type(exc).__name__}: {exc}"[:1500]
                doc["cuda_graph"]["traceback"] = traceback.format_exc()[-3000:]
                traceback.print_exc()
            print(json.dumps({k: v for k, v in res.items() if k != "semantics"}), flush=True)
        write()
    print(f"wrote {out} ({time.perf_counter() - t_start:.1f} s)")
    return 0


def threshold_timing(model, clock):
    """mk.magnitude_threshold (torch.kthvalue) vs the torch.sort computation used here, on (up to) 2^20 elements of
    the first matrix: why the bench does not call mk.sparse_mezo_masks on large models."""
    w = next(p for p in model.parameters() if p.dim() == 2).detach().reshape(-1)[: 1 << 20].contiguous()
    out = {"numel": w.numel()}
    for name, fn in (("kthvalue_ms", lambda: mk.magnitude_threshold(w, 0.75)),
                     ("sort_ms", lambda: threshold_taus([("w", w)], 0.75)[0]["w"])):
        fn()
        clock.sync()
        t0 = time.perf_counter()
        v = fn()
        clock.sync()
        out[name] = (time.perf_counter() - t0) * 1e3
        out[name.replace("_ms", "_tau")] = v
    out["equal"] = out["kthvalue_tau"] == out["sort_tau"]
    return out


if __name__ == "__main__":
    sys.exit(main())
