"""Microbenchmark matrix of the ZO ops against the copy floor and the MeZO baselines, all in one process.

    op (perturb_, perturb_prior = perturb_ with a prior, update_ with restore + stochastic rounding, perturbed_copy,
    update0 = update_ with prior 0 and stochastic rounding: the transient mode's update, update_next = update_ then
    the next step's +eps perturbation in one pass: ZOSGD(lookahead=True)'s fused pass, op 3)
    x dtype (bf16, fp16, fp32)
    x mask (none, threshold, bitmask, rowindex) x distribution (gaussian, rademacher, gaussian_fast) x backend (cuda, triton)
    over a model's parameter list built as ONE plan (one launch per pass per dtype).

Models: `7b` (LLaMA-7B's 291 tensors, 6.74 B parameters), `125m` (OPT-125m's 196 tensors: launch overhead), `1t`
(one tensor of 2^30 elements, the size the earlier notes used), `tiny` (a CPU smoke test).

Floors. A large device-to-device copy measured in the same process gives the bandwidth (bytes read + written).
floor_ms = the bytes the pass must move / that bandwidth: 2 x element size per element (read + write of the
weights, or of weights -> out for perturbed_copy), plus the mask's own bytes: the threshold latch (1 bit per element,
written by perturb_ with prior 0, read by perturb_prior and update_ (prior != 0), not touched by perturbed_copy and
update0, which evaluate the rule), the packed bitmask (1 bit per element, read), row-index columns (4 bytes per selected element, read).
Masks select half of the elements: tau = 0.6745 * std for weights drawn from N(0, std), random bytes for the bitmask,
k = n_cols // 2 random sorted columns per row (2-D tensors; 1-D tensors get no row-index mask).

Timing: warm-up, then per iteration an L2 flush (a 256 MiB memset), a GPU sleep of twice the longest host enqueue
of the call measured just before (at least 0.2 ms; `timing` in each record: sleep, enqueue times, and `host_bound`
if an enqueue still outlasted the sleep), and CUDA events around one pass; the median is `ms` (device time). `ms_host` is the median with the GPU idle before
the call (host work included: what a synchronous caller sees). Memory: torch.cuda.max_memory_allocated during a warm
pass minus the memory allocated before it (`extra_bytes`; the plan's tables are already built), and for the first
pass (`extra_bytes_first`). Launches: kernels seen by torch.profiler in one pass.

Baselines (per model, dtype and distribution, same weights):
  * `mezo_add` (baseline_ms): torch.manual_seed, then per parameter z = torch.normal(0, 1, p.size(), dtype=p.dtype)
    (Rademacher: z = bernoulli(0.5) * 2 - 1 in p.dtype) and p.add_(z, alpha=eps);
  * `mezo_as_written` (baseline_as_written_ms): the same with `p.data = p.data + scale * z * eps`;
  * `sparse_mezo` (baseline_ms of the masked cases): mask = |p| < tau materialised per parameter,
    p.add_(z * mask * eps).
  perturb_prior baselines are MeZO's second pass (-2 eps z, one regeneration);
  update_ baselines are MeZO's restore pass (+eps z) followed by its update pass (p - lr * (g * z)), each
  regenerating z from the seed; perturbed_copy baselines write torch.add(p, z * eps) into the output.

Examples:
    python bench/bench_matrix.py --dry-run --full --model both
    python bench/bench_matrix.py --core --model both --out bench/results/h100_DATE
    python bench/bench_matrix.py --quick --core
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

OPS = ("perturb_", "perturb_prior", "update_", "perturbed_copy", "update0", "update_next")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MASKS = ("none", "threshold", "bitmask", "rowindex")
DISTS = ("gaussian", "rademacher", "gaussian_fast")   # gaussian_fast: spec v2
BACKENDS = ("cuda", "triton")
CORE = dict(ops=("perturb_", "update_"), dtypes=("bf16",), masks=("none", "threshold", "bitmask"), dists=DISTS,
            backends=BACKENDS)
FULL = dict(ops=OPS, dtypes=tuple(DTYPES), masks=MASKS, dists=DISTS, backends=BACKENDS)

STD = 0.02             # weights ~ N(0, STD)
TAU = 0.6745 * STD     # |w| < TAU selects half of them
EPS = 1e-3
LR = 1e-6
GRAD = 0.5
L2_FLUSH_BYTES = 256 << 20


# ------------------------------------------------------------------------------------------------ parameter lists
def llama7b_shapes(layers: int = 32, hidden: int = 4096, inter: int = 11008, vocab: int = 32000):
    s = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        s += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        s += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
              (p + "mlp.down_proj.weight", (hidden, inter)),
              (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    s += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return s


def opt125m_shapes(layers: int = 12, hidden: int = 768, ffn: int = 3072, vocab: int = 50272, pos: int = 2050):
    """OPT-125m's trainable tensors (lm_head is tied to embed_tokens, so it appears once)."""
    s = [("model.decoder.embed_tokens.weight", (vocab, hidden)),
         ("model.decoder.embed_positions.weight", (pos, hidden))]
    for i in range(layers):
        p = f"model.decoder.layers.{i}."
        for n in ("k", "v", "q", "out"):
            s += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)), (p + f"self_attn.{n}_proj.bias", (hidden,))]
        s += [(p + "self_attn_layer_norm.weight", (hidden,)), (p + "self_attn_layer_norm.bias", (hidden,)),
              (p + "fc1.weight", (ffn, hidden)), (p + "fc1.bias", (ffn,)),
              (p + "fc2.weight", (hidden, ffn)), (p + "fc2.bias", (hidden,)),
              (p + "final_layer_norm.weight", (hidden,)), (p + "final_layer_norm.bias", (hidden,))]
    s += [("model.decoder.final_layer_norm.weight", (hidden,)), ("model.decoder.final_layer_norm.bias", (hidden,))]
    return s


def model_shapes(model: str, quick: bool):
    if model == "7b":
        return llama7b_shapes(layers=1 if quick else 32)
    if model == "125m":
        return opt125m_shapes(layers=2 if quick else 12)
    if model == "1t":
        return [("w", (1 << 26 if quick else 1 << 30,))]
    if model == "tiny":
        return llama7b_shapes(layers=2, hidden=64, inter=172, vocab=320)
    raise ValueError(f"unknown model {model!r}")


def numel_of(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------------------------------------ cases
def parse_list(value, allowed, what):
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def select(args):
    sel = dict(FULL if args.full else CORE)
    for key, allowed in (("ops", OPS), ("dtypes", tuple(DTYPES)), ("masks", MASKS), ("dists", DISTS),
                         ("backends", BACKENDS + ("cpu", "reference"))):
        v = getattr(args, key)
        if v:
            sel[key] = parse_list(v, allowed, key[:-1])
    models = {"both": ("7b", "125m")}.get(args.model, None) or parse_list(args.model, ("7b", "125m", "1t", "tiny"),
                                                                          "model")
    sel["models"] = models
    return sel


def cases(sel):
    for model, dt, mask, op, dist, backend in itertools.product(sel["models"], sel["dtypes"], sel["masks"],
                                                                 sel["ops"], sel["dists"], sel["backends"]):
        yield dict(model=model, dtype=dt, mask=mask, op=op, distribution=dist, backend=backend)


# ------------------------------------------------------------------------------------------------ timing
class Timer:
    """Device time of one pass (median), with the GPU kept busy while the host enqueues it."""

    def __init__(self, device, warmup, iters):
        self.device, self.warmup, self.iters = device, warmup, iters
        self.cuda = device.type == "cuda"
        self.last = {}  # the last run's sleep and host enqueue times (recorded per case)
        if self.cuda:
            self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
            self.cycles_per_ms = self._calibrate_sleep()
            # floor of the sleep before each timed pass; BENCH_SLEEP_CYCLES (old knob) sets it in cycles
            env = os.environ.get("BENCH_SLEEP_CYCLES")
            self.min_sleep_ms = int(env) / self.cycles_per_ms if env else 0.2

    def _calibrate_sleep(self):
        """GPU clock cycles of torch.cuda._sleep per millisecond (the sleep must outlast the host's enqueue)."""
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # warm-up
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        return cycles / max(a.elapsed_time(b), 1e-3)

    def run(self, fn, iters=None, warmup=None):
        """fn(i) runs pass i. Returns (median device ms, median host-inclusive ms, all device times).

        Host-inclusive first (GPU idle before each call), timing the host's enqueue of each call as well; then device
        time with the GPU asleep for twice the longest enqueue seen (at least min_sleep_ms) before the first event,
        so that a call whose host side is slower than its kernels (a ~125 M model's list) is still timed on the
        device alone. `self.last` records the sleep, the enqueue times, and whether an enqueue outlasted the sleep.
        """
        iters = self.iters if iters is None else iters
        warmup = self.warmup if warmup is None else warmup
        i = 0
        for _ in range(warmup):
            fn(i)
            i += 1
        if not self.cuda:
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn(i)
                i += 1
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts), statistics.median(ts), ts
        torch.cuda.synchronize()
        dev, host, enq_idle, enq_busy = [], [], [], []
        sleep_ms = self.min_sleep_ms
        for busy in (False, True):
            if busy:
                sleep_ms = max(self.min_sleep_ms, 2.0 * max(enq_idle))
            for _ in range(iters):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                self.flush.zero_()
                if busy:
                    torch.cuda._sleep(int(sleep_ms * self.cycles_per_ms))
                else:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                a.record()
                fn(i)
                b.record()
                (enq_busy if busy else enq_idle).append((time.perf_counter() - t0) * 1e3)
                b.synchronize()
                i += 1
                (dev if busy else host).append(a.elapsed_time(b))
        self.last = dict(sleep_ms=sleep_ms, enqueue_ms=statistics.median(enq_busy),
                         enqueue_max_ms=max(enq_busy), host_bound=max(enq_busy) > sleep_ms)
        return statistics.median(dev), statistics.median(host), dev

    def memory(self, fn, i):
        """Peak bytes allocated during fn(i) beyond what was allocated before it."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        m0 = torch.cuda.memory_allocated()
        fn(i)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - m0)

    def launches(self, fn, i):
        """(kernels, memcpys) that one pass puts on the device, as torch.profiler sees them."""
        if not self.cuda:
            return None, None
        try:
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity, profile
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(i)
                torch.cuda.synchronize()
            names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
            copies = [n for n in names if n.startswith(("Memcpy", "Memset"))]
            return len(names) - len(copies), len(copies)
        except Exception as exc:  # the profiler is a nicety; the timings stand without it
            print(f"  (launch count unavailable: {exc!r})", file=sys.stderr)
            return None, None


def copy_bandwidth(device, timer, nbytes):
    """Bytes read + written per second of a large device-to-device copy (the floor's bandwidth)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = timer.run(lambda i: dst.copy_(src), iters=max(timer.iters, 10))
    del src, dst
    return 2 * nbytes / (ms * 1e-3), ms


# ------------------------------------------------------------------------------------------------ weights & masks
def make_weights(shapes, dtype, device, seed=0):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    ws = []
    for _, shape in shapes:
        w = torch.empty(shape, dtype=dtype, device=device)
        w.normal_(0.0, STD, generator=g)
        ws.append(w)
    return ws


def make_masks(kind, shapes, weights, device, seed=1):
    """{name: mask} selecting about half of each tensor's elements, and the mask's bytes per pass (selected count
    for row-index masks)."""
    import mazo_kernels as mk
    if kind == "none":
        return {}, 0
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    masks, nbytes = {}, 0
    for (name, shape), w in zip(shapes, weights):
        n = w.numel()
        if kind == "threshold":
            masks[name] = mk.ThresholdMask(TAU)
            nbytes += (n + 7) // 8
        elif kind == "bitmask":
            masks[name] = mk.BitMask(torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, device=device,
                                                   generator=g))
            nbytes += (n + 7) // 8
        elif kind == "rowindex":
            if len(shape) != 2:
                continue
            rows, cols = shape
            k = cols // 2
            idx = torch.empty(rows, k, dtype=torch.int32, device=device)
            for r0 in range(0, rows, 4096):  # bounded temporaries (rand + argsort of a row block)
                r1 = min(rows, r0 + 4096)
                perm = torch.rand(r1 - r0, cols, device=device, generator=g).argsort(dim=1)[:, :k]
                idx[r0:r1] = perm.sort(dim=1).values.to(torch.int32)
                del perm
            masks[name] = mk.RowIndexMask(idx)
            nbytes += 4 * idx.numel()
    return masks, nbytes


def mask_traffic(kind, op, mask_bytes):
    """Mask bytes a pass must move (see the module docstring)."""
    if kind == "threshold" and op in ("perturbed_copy", "update0"):
        return 0  # prior 0 and not perturb_: the rule is evaluated on theta; no latch traffic
    if kind == "threshold" and op == "update_next":
        return 2 * mask_bytes  # the latch read (the update) and rewritten (the next perturbation)
    return mask_bytes


# ------------------------------------------------------------------------------------------------ MeZO baselines
def _z(p, dist):
    if dist in ("gaussian", "gaussian_fast"):      # MeZO draws torch.normal; it is the baseline of both
        return torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype, device=p.device)
    return torch.empty(p.size(), dtype=p.dtype, device=p.device).bernoulli_(0.5).mul_(2).sub_(1)


def baseline_fns(weights, outs, dist):
    """name -> {op: fn(i)}. Each pass starts with torch.manual_seed like MeZO's zo_perturb_parameters / zo_update."""
    eps = EPS

    def perturb_written(seed, scale):
        torch.manual_seed(seed)
        for p in weights:
            z = _z(p, dist)
            p.data = p.data + scale * z * eps

    def perturb_add(seed, scale):
        torch.manual_seed(seed)
        for p in weights:
            p.add_(_z(p, dist), alpha=scale * eps)

    def perturb_sparse(seed, scale):
        torch.manual_seed(seed)
        for p in weights:
            mask = p.abs() < TAU
            p.add_(_z(p, dist) * mask * (scale * eps))

    def update_written(seed):
        torch.manual_seed(seed)
        for p in weights:
            z = _z(p, dist)
            p.data = p.data - LR * (GRAD * z)

    def update_add(seed):
        torch.manual_seed(seed)
        for p in weights:
            p.add_(_z(p, dist), alpha=-LR * GRAD)

    def update_sparse(seed):
        torch.manual_seed(seed)
        for p in weights:
            mask = p.abs() < TAU
            p.add_(_z(p, dist) * mask * (-LR * GRAD))

    def copy_written(seed):
        torch.manual_seed(seed)
        for p, o in zip(weights, outs()):
            z = _z(p, dist)
            o.copy_(p.data + 1.0 * z * eps)

    def copy_add(seed):
        torch.manual_seed(seed)
        for p, o in zip(weights, outs()):
            torch.add(p, _z(p, dist), alpha=eps, out=o)

    def copy_sparse(seed):
        torch.manual_seed(seed)
        for p, o in zip(weights, outs()):
            mask = p.abs() < TAU
            torch.add(p, _z(p, dist) * mask * eps, out=o)

    def sign(i):
        return 1.0 if i % 2 == 0 else -1.0

    return {
        "mezo_as_written": {
            "perturb_": lambda i: perturb_written(100 + i, sign(i)),
            "perturb_prior": lambda i: perturb_written(100 + i, -2 * sign(i)),
            "update_": lambda i: (perturb_written(100 + i, sign(i)), update_written(100 + i)),
            "perturbed_copy": lambda i: copy_written(100 + i),
            "update0": lambda i: update_written(100 + i),
            "update_next": lambda i: (perturb_written(100 + i, sign(i)), update_written(100 + i), perturb_written(200 + i, sign(i)))},
        "mezo_add": {
            "perturb_": lambda i: perturb_add(100 + i, sign(i)),
            "perturb_prior": lambda i: perturb_add(100 + i, -2 * sign(i)),
            "update_": lambda i: (perturb_add(100 + i, sign(i)), update_add(100 + i)),
            "perturbed_copy": lambda i: copy_add(100 + i),
            "update0": lambda i: update_add(100 + i),
            "update_next": lambda i: (perturb_add(100 + i, sign(i)), update_add(100 + i), perturb_add(200 + i, sign(i)))},
        "sparse_mezo": {
            "perturb_": lambda i: perturb_sparse(100 + i, sign(i)),
            "perturb_prior": lambda i: perturb_sparse(100 + i, -2 * sign(i)),
            "update_": lambda i: (perturb_sparse(100 + i, sign(i)), update_sparse(100 + i)),
            "perturbed_copy": lambda i: copy_sparse(100 + i),
            "update0": lambda i: update_sparse(100 + i),
            "update_next": lambda i: (perturb_sparse(100 + i, sign(i)), update_sparse(100 + i), perturb_sparse(200 + i, sign(i)))},
    }


# ------------------------------------------------------------------------------------------------ our ops
def op_fn(mk, plan, op, dist, backend, outs, grads):
    """fn(i): one pass of `op`. Scales alternate in sign so that repeated passes do not drift the weights."""
    if op == "perturb_":
        return lambda i: mk.perturb_(plan, 1000 + i, EPS if i % 2 == 0 else -EPS, dist=dist, backend=backend)
    if op == "perturb_prior":
        # the ZO step's second pass: the weights carry prior * z(seed); restore it exactly and perturb the other way
        return lambda i: mk.perturb_(plan, 1000 + i, -EPS if i % 2 == 0 else EPS,
                                     prior=EPS if i % 2 == 0 else -EPS, dist=dist, backend=backend)
    if op == "update_":
        # the ZO step's last pass: the weights carry prior * z(seed); restore it and apply the step, SR rounding
        return lambda i: mk.update_(plan, [1000 + i], grads, lr=LR, restore_seed=1000 + i,
                                    prior=-EPS if i % 2 == 0 else EPS, rounding="stochastic", sr_seed=i,
                                    dist=dist, backend=backend)
    if op == "update_next":
        # ZOSGD(lookahead=True)'s last pass: update_ as above, then the next step's first perturbation (+-EPS, so
        # that the weights carry the prior the next call restores)
        return lambda i: mk.update_(plan, [1000 + i], grads, lr=LR, restore_seed=1000 + i,
                                    prior=-EPS if i % 2 == 0 else EPS, rounding="stochastic", sr_seed=i,
                                    dist=dist, backend=backend, next_seed=1001 + i,
                                    next_scale=EPS if i % 2 == 0 else -EPS)
    if op == "perturbed_copy":
        return lambda i: mk.perturbed_copy(plan, 1000 + i, EPS, out=outs(), dist=dist, backend=backend)
    if op == "update0":
        # the transient mode's one update pass: the stored weights carry no perturbation (prior 0), SR rounding
        return lambda i: mk.update_(plan, [1000 + i], grads, lr=LR if i % 2 == 0 else -LR, rounding="stochastic",
                                    sr_seed=i, dist=dist, backend=backend)
    raise ValueError(op)


# ------------------------------------------------------------------------------------------------ driver
def git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True, timeout=10)
        return c.stdout.strip() + ("+dirty" if d.stdout.strip() else "") if c.returncode == 0 else None
    except Exception:
        return None


def header(device, bw, copy_ms, copy_bytes):
    import mazo_kernels as mk
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    h = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
         "torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda, "python": platform.python_version(),
         "date": time.strftime("%Y-%m-%d"), "time": time.strftime("%H:%M:%S %Z"), "git_commit": git_commit(),
         "mazo_kernels": mk.__version__, "spec_version": mk.SPEC_VERSION,
         "copy_bandwidth_TBps": bw / 1e12, "copy_ms": copy_ms, "copy_bytes": copy_bytes,
         "floor_definition": "bytes moved by the pass (2 x element size per element + the mask's bytes) / "
                             "copy bandwidth (bytes read + written per second of a device-to-device copy)",
         "baselines": {"baseline_ms": "mezo_add (dense cases: torch.manual_seed, per-parameter torch.normal / "
                                      "bernoulli sign in p.dtype, p.add_(z, alpha=eps)) or sparse_mezo (masked "
                                      "cases: mask = |p| < tau materialised, p.add_(z * mask * eps)); update_: "
                                      "restore pass + update pass",
                       "baseline_as_written_ms": "MeZO as written: p.data = p.data + scale * z * eps"}}
    if os.environ.get("MAZO_RUN_COMMIT"):   # the commit that ran, where the device copy's git metadata lags
        h["git_commit_as_run"] = os.environ["MAZO_RUN_COMMIT"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        h.update(sm_count=props.multi_processor_count, total_memory_bytes=props.total_memory,
                 l2_bytes=getattr(props, "L2_cache_size", None))
    return h


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def variant_masks(args, sel) -> list:
    """The masks whose cases also run the --triton-variants / --cuda-variants: --variant-masks, or every selected
    mask (an earlier default of "none" alone let variants given for masked cases silently not run)."""
    return list(sel["masks"]) if args.variant_masks is None else args.variant_masks.split(",")


def check_variants(args, sel, plan, weights, outs, grads, model, dt, mask, checks):
    """Each variant must give the default's bits: one pass of every op from the same weights (and latches)."""
    import mazo_kernels as mk
    runs = [("triton", lab, o) for lab, o in args.triton_variants if "triton" in sel["backends"]]
    runs += [("cuda", lab, o) for lab, o in args.cuda_variants if "cuda" in sel["backends"]]
    if not runs:
        return
    state = [w.clone() for w in weights] + [m.clone() for g in plan.groups for m in g.masks]
    live = list(weights) + [m for g in plan.groups for m in g.masks]

    def restore():
        for a, b in zip(live, state):
            a.copy_(b)

    for op, dist, (backend, label, opts) in itertools.product(sel["ops"], sel["dists"], runs):
        fn = op_fn(mk, plan, op, dist, backend, outs, grads)
        got = []
        for o in (None, opts):
            restore()
            (set_triton_opts if backend == "triton" else set_env_opts)(o)
            try:
                fn(0)
            finally:
                (set_triton_opts if backend == "triton" else set_env_opts)(None)
            res = outs() if op == "perturbed_copy" else weights
            got.append([_bits(t).clone() for t in res])
        equal = all(torch.equal(a, b) for a, b in zip(*got))
        checks.append(dict(model=model, dtype=dt, mask=mask, op=op, distribution=dist, backend=backend,
                           variant=label, bits_equal_default=equal))
        print(f"  check {backend}:{label} {op} {dist} {mask}: bits {'EQUAL' if equal else 'DIFFER'} to the default",
              flush=True)
        del got
    restore()
    del state


def run_model_dtype(args, sel, timer, device, bw, model, dt, records, launch_cache, emit, checks):
    import mazo_kernels as mk
    shapes = model_shapes(model, args.quick)
    dtype = DTYPES[dt]
    numel = sum(numel_of(s) for _, s in shapes)
    esize = torch.empty(0, dtype=dtype).element_size()
    t0 = time.time()
    weights = make_weights(shapes, dtype, device)
    out_bufs = []

    def outs():
        if not out_bufs:
            out_bufs.extend(torch.empty_like(w) for w in weights)
        return out_bufs

    print(f"== {model} {dt}: {len(shapes)} tensors, {numel / 1e9:.3f} B elements "
          f"(weights built in {time.time() - t0:.1f} s)", flush=True)
    dense_bytes = 2 * esize * numel
    # baselines, per op and distribution (same process, same weights)
    base = {}
    bl_iters = args.baseline_iters
    if not args.no_baselines:
        for dist in sel["dists"]:
            fns = baseline_fns(weights, outs, dist)
            for op in sel["ops"]:
                names = ["mezo_add", "mezo_as_written"]
                if any(m != "none" for m in sel["masks"]):
                    names.append("sparse_mezo")
                for name in names:
                    try:
                        ms, ms_host, _ = timer.run(fns[name][op], iters=bl_iters, warmup=1)
                        extra = timer.memory(fns[name][op], 0)
                        base[(name, op, dist)] = (ms, extra)
                        print(f"  baseline {name:16s} {op:15s} {dist:10s} {ms:9.3f} ms  extra {extra} B", flush=True)
                    except torch.cuda.OutOfMemoryError as exc:
                        base[(name, op, dist)] = (None, None)
                        print(f"  baseline {name} {op} {dist}: OOM {exc!r}"[:300], flush=True)
                    torch.cuda.empty_cache()
    grads = torch.tensor([GRAD], dtype=torch.float32, device=device)
    for mask in sel["masks"]:
        t0 = time.time()
        try:
            masks, mask_bytes = make_masks(mask, shapes, weights, device)
            plan = mk.ZOPlan(list(zip([n for n, _ in shapes], weights)), masks=masks)
        except torch.cuda.OutOfMemoryError as exc:
            print(f"  {mask}: OOM building the masks: {exc!r}"[:300], flush=True)
            for op, dist, backend in itertools.product(sel["ops"], sel["dists"], sel["backends"]):
                records.append(dict(op=op, dtype=dt, mask=mask, distribution=dist, backend=backend, model=model,
                                    numel=numel, ntensors=len(shapes), error="OOM building masks"))
            torch.cuda.empty_cache()
            continue
        if mask == "threshold":
            # latch the rule once (a scale-0 perturb_ writes the latch and leaves the weights as they are): a plan's
            # latch starts all zero, so passes that read it (update_, perturb_prior) timed before any perturb_ would
            # select nothing (s21/call4's first threshold update_ rows: CUDA 10.4 ms against 19.7 latched)
            mk.perturb_(plan, 1, 0.0, backend=sel["backends"][0])
        print(f"  mask {mask}: plan built in {time.time() - t0:.1f} s, mask bytes {mask_bytes}", flush=True)
        if numel <= args.check_max_numel and mask in variant_masks(args, sel):
            check_variants(args, sel, plan, weights, outs, grads, model, dt, mask, checks)
        runs = [(b, args.variant, None) for b in sel["backends"]]
        if mask in variant_masks(args, sel):
            if "triton" in sel["backends"]:
                runs += [("triton", label, opts) for label, opts in args.triton_variants]
            if "cuda" in sel["backends"]:
                runs += [("cuda", label, opts) for label, opts in args.cuda_variants]
        for op, dist, (backend, variant, topts) in itertools.product(sel["ops"], sel["dists"], runs):
            if backend == "triton":
                set_triton_opts(topts)
            else:
                set_env_opts(topts)
            rec = dict(op=op, dtype=dt, mask=mask, distribution=dist, backend=backend, model=model, numel=numel,
                       ntensors=len(shapes), variant=variant)
            if topts:
                rec["variant_opts"] = topts
            floor_bytes = dense_bytes + mask_traffic(mask, op, mask_bytes)
            rec.update(floor_bytes=floor_bytes, floor_ms=floor_bytes / bw * 1e3,
                       dense_floor_ms=dense_bytes / bw * 1e3, mask_bytes=mask_traffic(mask, op, mask_bytes))
            if mask == "none":
                bname = "mezo_add"
            else:
                bname = "sparse_mezo"
            b = base.get((bname, op, dist), (None, None))
            rec.update(baseline=bname, baseline_ms=b[0], baseline_extra_bytes=b[1],
                       baseline_as_written_ms=base.get(("mezo_as_written", op, dist), (None, None))[0])
            try:
                fn = op_fn(mk, plan, op, dist, backend, outs, grads)
                if op == "perturbed_copy":
                    outs()
                first = timer.memory(fn, 0)  # the first pass builds the backend's tables and compiles
                ms, ms_host, all_ms = timer.run(fn)
                extra = timer.memory(fn, 1)
                key = (op, dt, mask, dist, backend, variant)
                if key not in launch_cache:
                    launch_cache[key] = timer.launches(fn, 0) + (model,)
                kern, copies, lmodel = launch_cache[key]
                rec.update(ms=ms, ms_host=ms_host, ms_all=all_ms, fraction_of_floor=rec["floor_ms"] / ms,
                           timing=dict(timer.last),
                           fraction_of_dense_floor=rec["dense_floor_ms"] / ms,
                           speedup_vs_baseline=(b[0] / ms) if b[0] else None,
                           extra_bytes=extra, extra_bytes_first=first, launches=kern, memcpys=copies,
                           launches_counted_on=lmodel)
            except Exception as exc:  # record and go on: one failing case must not lose the run
                rec["error"] = repr(exc)[:500]
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
            set_triton_opts(None)
            set_env_opts(None)
            records.append(rec)
            emit(rec)
        del plan, masks
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del weights, out_bufs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_TRITON_DEFAULTS: dict = {}


def set_triton_opts(opts):
    """Set module-level knobs of mazo_kernels.triton_kernels (e.g. {'SPLIT': 0}); None restores the defaults."""
    if not opts and not _TRITON_DEFAULTS:
        return
    from mazo_kernels import triton_kernels as tk
    for k, v in _TRITON_DEFAULTS.items():
        setattr(tk, k, v)
    for k, v in (opts or {}).items():
        if not hasattr(tk, k):
            raise SystemExit(f"mazo_kernels.triton_kernels has no knob {k}")
        _TRITON_DEFAULTS.setdefault(k, getattr(tk, k))
        setattr(tk, k, v)


_ENV_SAVED: dict = {}


def set_env_opts(opts):
    """Set environment variables that the CUDA extension reads per call (e.g. MAZO_CUDA_WAVES); None restores."""
    for k, v in _ENV_SAVED.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _ENV_SAVED.clear()
    for k, v in (opts or {}).items():
        _ENV_SAVED[k] = os.environ.get(k)
        os.environ[k] = str(v)


def parse_variants(text):
    """'old:SPLIT=0;c4:CHUNK=4' -> [('old', {'SPLIT': 0}), ('c4', {'CHUNK': 4})]"""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        label, _, kv = part.partition(":")
        opts = {}
        for item in filter(None, kv.split(",")):
            k, _, v = item.partition("=")
            opts[k.strip()] = int(v)
        out.append((label.strip(), opts))
    return out


def print_record(r):
    if "error" in r:
        print(f"  {r['op']:15s} {r['mask']:9s} {r['distribution']:10s} {r['backend']:7s} ERROR {r['error'][:200]}",
              flush=True)
        return
    bl = f"{r['baseline_ms']:8.2f}" if r.get("baseline_ms") else "       -"
    print(f"  {r['op']:15s} {r['mask']:9s} {r['distribution']:10s} {r['backend'] + ':' + r['variant']:11s} {r['ms']:9.3f} ms "
          f"(host {r['ms_host']:8.3f})  floor {r['floor_ms']:8.3f}  {100 * r['fraction_of_floor']:5.1f}%  "
          f"baseline {bl}  extra {r['extra_bytes']} B  launches {r['launches']}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--core", action="store_true", help="bf16; every distribution; masks none/threshold/bitmask; "
                                                       "cuda+triton; perturb_ and update_ (default)")
    g.add_argument("--full", action="store_true", help="every op, dtype, mask, distribution and backend")
    ap.add_argument("--model", default="both", help="7b, 125m, both (7b,125m), 1t, tiny, or a comma list")
    ap.add_argument("--ops", help=f"comma list from {OPS} (overrides --core/--full)")
    ap.add_argument("--dtypes", help=f"comma list from {tuple(DTYPES)}")
    ap.add_argument("--masks", help=f"comma list from {MASKS}")
    ap.add_argument("--dists", help=f"comma list from {DISTS}")
    ap.add_argument("--backends", help=f"comma list from {BACKENDS} (cpu / reference for a CPU smoke test)")
    ap.add_argument("--quick", action="store_true", help="smaller parameter lists and fewer iterations (testing)")
    ap.add_argument("--iters", type=int, default=None, help="timed passes per case (default 10, quick 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--baseline-iters", type=int, default=None, help="timed baseline passes (default 5, quick 2)")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variant", default="", help="label stored in every record (kernel experiments)")
    ap.add_argument("--triton-variants", type=parse_variants, default=[],
                    help="extra Triton runs in the same process, 'label:KNOB=int,...;label2:...' (knobs of "
                         "mazo_kernels.triton_kernels, e.g. 'old:SPLIT=0;chunk4:CHUNK=4')")
    ap.add_argument("--cuda-variants", type=parse_variants, default=[],
                    help="extra CUDA runs, 'label:ENVVAR=int,...;...' (variables the extension reads per call, "
                         "e.g. 'w2:MAZO_CUDA_WAVES=2')")
    ap.add_argument("--variant-masks", default=None,
                    help="comma list: masks whose cases also run the variants (default: every selected mask)")
    ap.add_argument("--check-max-numel", type=int, default=300_000_000,
                    help="models up to this size check that every variant gives the default's bits")
    ap.add_argument("--tag", default=None, help="output file name: matrix_<tag>.json (default core/full/custom)")
    ap.add_argument("--out", default="bench/results/matrix", help="output directory")
    ap.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    sel = select(args)
    if args.iters is None:
        args.iters = 3 if args.quick else 10
    if args.baseline_iters is None:
        args.baseline_iters = 2 if args.quick else 5
    todo = list(cases(sel))
    if args.dry_run:
        for m in sel["models"]:
            shapes = model_shapes(m, args.quick)
            print(f"model {m}: {len(shapes)} tensors, {sum(numel_of(s) for _, s in shapes):,} elements")
        for c in todo:
            print(" ".join(f"{k}={v}" for k, v in c.items()))
        print(f"{len(todo)} cases")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --dry-run, or --device cpu --backends cpu for a smoke test")
    import mazo_kernels as mk  # noqa: F401  (fail early if the package is missing)
    timer = Timer(device, args.warmup, args.iters)
    copy_bytes = (1 << 28) if (args.quick or device.type != "cuda") else (2 << 30)
    bw, copy_ms = copy_bandwidth(device, timer, copy_bytes)
    res = header(device, bw, copy_ms, copy_bytes)
    res.update(selection={k: list(v) for k, v in sel.items()}, quick=args.quick, iters=args.iters,
               warmup=args.warmup, baseline_iters=args.baseline_iters, variant=args.variant, argv=sys.argv[1:])
    print(json.dumps({k: res[k] for k in ("device", "torch", "triton", "cuda", "date", "git_commit")}))
    print(f"copy: {copy_bytes / 2**30:.2f} GiB in {copy_ms:.3f} ms -> {bw / 1e12:.3f} TB/s (read + written)",
          flush=True)
    tag = args.tag or ("full" if args.full else "core" if not any(
        getattr(args, k) for k in ("ops", "dtypes", "masks", "dists", "backends")) else "custom")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"matrix_{tag}.json")
    records, launch_cache, checks = [], {}, []
    res["variant_checks"] = checks
    res["records"] = records

    def emit(rec):
        print_record(rec)
        json.dump(res, open(path + ".part", "w"), indent=1)

    # the smallest model first: its launch counts are reused by the larger ones
    order = sorted(sel["models"], key=lambda m: sum(numel_of(s) for _, s in model_shapes(m, args.quick)))
    for model in order:
        for dt in sel["dtypes"]:
            run_model_dtype(args, sel, timer, device, bw, model, dt, records, launch_cache, emit, checks)
    if device.type == "cuda":
        bw_end, _ = copy_bandwidth(device, timer, copy_bytes)
        res["copy_bandwidth_end_TBps"] = bw_end / 1e12
        print(f"copy at the end: {bw_end / 1e12:.3f} TB/s")
    json.dump(res, open(path, "w"), indent=1)
    if os.path.exists(path + ".part"):
        os.remove(path + ".part")
    print(f"wrote {path} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
