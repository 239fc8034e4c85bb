"""One full ZO step on a LLaMA-shaped model: ZOSGD in place, ZOSGD transient, and MeZO's own per-parameter loop.

    python bench/bench_zo_step.py [--size 1b|small|tiny] [--config JSON] [--device cuda] [--backend auto]
                                  [--steps 20] [--warmup 3] [--drift-steps 100] [--out DIR]

The model is a random-init `transformers.LlamaForCausalLM` (weights ~ N(0, 0.02^2), as transformers initialises
them), built directly on the device in the chosen dtype (bf16 by default). The default size is TinyLlama-1.1B's
shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000); `--size small` is a ~60M
model for a quick GPU look and `--size tiny` a ~115k-parameter one for a CPU smoke test (`--device cpu
--backend cpu`). `--config '{"num_hidden_layers": 16}'` (a JSON string or a file) overrides LlamaConfig fields.

Every method runs the same step: two forwards of one fixed batch (random token ids, loss =
model(input_ids, labels=input_ids).loss, eval mode) and the passes over the weights around them.

  zosgd_inplace    mk.ZOSGD(mode="inplace"): +eps, -eps (undoing the first pass's rounding), restore + update fused
  zosgd_transient  mk.ZOSGD(mode="transient", module=model): the forwards see perturbed per-module copies, the
                   stored weights are written once, by the update
  mezo             princeton-nlp/MeZO's trainer as users run it: torch.manual_seed(seed), then per parameter
                   z = torch.normal(...) and p.data = p.data + s*z*eps for s = +1, -2, +1 around the forwards
                   (forwards under torch.inference_mode(), projected_grad via .item()), then zo_update regenerates z
                   per parameter under the same seed: p.data = p.data - lr*(g*z + wd*p.data)

Measured per method: the median step time over --steps steps after --warmup (CUDA events on a GPU), the median
time of one plain forward of the same batch (in the context the method runs its forwards in), the peak memory a
step allocates beyond what was allocated before it (activations included; `forward_peak_extra_bytes` is the same
for one forward, so the difference is the optimizer's own), and the restore drift: --drift-steps steps with lr = 0
from the initial weights, then RMS(theta - theta0) / RMS(theta0) over all trainable weights (and the fraction of
elements that changed). With lr = 0 every step should leave the weights unchanged; what remains is the restore's
rounding error. The transient mode never writes the weights during the forwards, so its drift must be 0.0.

Writes DIR/bench_zo_step.json: a header (device, versions, date, git commit, model config, parameter count, batch)
and one record per method.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

try:
    import mazo_kernels as mk
except ImportError:     # run from a checkout without installing: the package is beside bench/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mazo_kernels as mk

SIZES = {
    # TinyLlama-1.1B's shape: ~1.1 B parameters, 2.2 GB in bf16
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256),
}
METHODS = ("zosgd_inplace", "zosgd_transient", "mezo")


# ---------------------------------------------------------------- model and batch
def build_model(size: str, overrides: dict, dtype: torch.dtype, device: str, seed: int):
    """Random init directly on the device in `dtype`: creating a 1B model on the host in fp32 and moving it would
    take longer than the whole benchmark."""
    from transformers import LlamaConfig, LlamaForCausalLM
    fields = dict(SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
    fields.update(overrides)
    cfg = LlamaConfig(**fields)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval()       # MeZO's forwards run in eval mode (dropout off); ZOSGD's forward_mode="eval" does the same
    return model, {k: getattr(cfg, k) for k in sorted(fields)} | {"attn_implementation": cfg._attn_implementation}


def make_batch(vocab: int, batch: int, seq_len: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- MeZO's trainer, as written
def _mezo_no_decay(name: str) -> bool:
    return "bias" in name or "layer_norm" in name or "layernorm" in name


class MezoStyle:
    """The perturb / forward / update code of princeton-nlp/MeZO's trainer (large_models/trainer.py), unchanged
    in what it computes: z is materialised per parameter from torch's generator, and `p.data` is rebound to a new
    tensor by every pass."""

    def __init__(self, model, lr: float, eps: float, weight_decay: float = 0.0, seed: int = 0):
        self.model, self.lr, self.eps, self.weight_decay = model, lr, eps, weight_decay
        self.named_parameters_to_optim = trainable(model)
        np.random.seed(seed)

    def zo_perturb_parameters(self, scaling_factor=1):
        torch.manual_seed(self.zo_random_seed)
        for _, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.eps

    def zo_forward(self, closure):
        self.model.eval()
        with torch.inference_mode():
            loss = closure()
        return loss.detach()

    def zo_update(self):
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            if not _mezo_no_decay(name):
                param.data = param.data - self.lr * (self.projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (self.projected_grad * z)

    def step(self, closure):
        self.zo_random_seed = np.random.randint(1000000000)
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = self.zo_forward(closure)
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = self.zo_forward(closure)
        self.projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
        self.zo_perturb_parameters(scaling_factor=1)
        self.zo_update()
        return loss1


def make_optimizer(method: str, model, lr: float, eps: float, backend: str):
    if method == "mezo":
        return MezoStyle(model, lr=lr, eps=eps)
    mode = "inplace" if method == "zosgd_inplace" else "transient"
    return mk.ZOSGD(model.named_parameters(), lr=lr, eps=eps, mode=mode, module=model, backend=backend)


# ---------------------------------------------------------------- measurement
class Timer:
    """Per-call times: CUDA events on a GPU (recorded in stream order, read after one synchronisation, so the host
    running ahead does not hide device time and the timing adds no synchronisation of its own), perf_counter on
    the host."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def times_ms(self, fn, n: int, warmup: int):
        for _ in range(warmup):
            fn()
        self.sync()
        if not self.cuda:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        self.sync()
        return [a.elapsed_time(b) for a, b in ev]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def peak_extra_bytes(fn, device: str):
    """Peak allocation during fn() beyond what was allocated before it (None off CUDA: no allocator statistics)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def drift(model, snapshot):
    """RMS(theta - theta0) / RMS(theta0) over all trainable weights, and the fraction of elements that differ."""
    num = den = 0.0
    changed = total = 0
    for (_, p), s in zip(trainable(model), snapshot):
        d = p.detach().float() - s.float()
        num += float(d.double().pow(2).sum())
        den += float(s.double().pow(2).sum())
        changed += int((p.detach() != s).sum())
        total += s.numel()
    return math.sqrt(num / den), changed / total


def restore(model, snapshot):
    with torch.no_grad():
        for (_, p), s in zip(trainable(model), snapshot):
            p.data.copy_(s)


def bench_method(method, model, snapshot, ids, args, timer):
    def closure():
        return model(input_ids=ids, labels=ids).loss

    rec = {"method": method}
    # forward-only, in the context the method runs its forwards in
    ctx = torch.inference_mode if method == "mezo" else torch.no_grad

    def fwd():
        with ctx():
            closure()

    rec["forward_context"] = ctx.__name__
    rec["forward_ms"] = statistics.median(timer.times_ms(fwd, args.steps, args.warmup))
    rec["forward_peak_extra_bytes"] = peak_extra_bytes(fwd, args.device)

    restore(model, snapshot)
    opt = make_optimizer(method, model, args.lr, args.eps, args.backend)
    rec["backend"] = getattr(opt, "backend", "torch")
    times = timer.times_ms(lambda: opt.step(closure), args.steps, args.warmup)
    rec["step_ms"] = statistics.median(times)
    rec["step_ms_min"] = min(times)
    rec["step_over_2_forwards"] = rec["step_ms"] / (2 * rec["forward_ms"])
    rec["peak_extra_bytes"] = peak_extra_bytes(lambda: opt.step(closure), args.device)
    del opt

    restore(model, snapshot)
    opt = make_optimizer(method, model, 0.0, args.eps, args.backend)
    t0 = time.perf_counter()
    for _ in range(args.drift_steps):
        opt.step(closure)
    timer.sync()
    rec["drift_wall_s"] = time.perf_counter() - t0
    rec["drift_after_K_steps_lr0"], rec["drift_changed_fraction"] = drift(model, snapshot)
    rec["K"] = args.drift_steps
    del opt
    restore(model, snapshot)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rec


# ---------------------------------------------------------------- header and output
def environment(device: str) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "mazo_kernels": mk.__version__,
           "spec_version": mk.SPEC_VERSION}
    for mod in ("transformers", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device.startswith("cuda"):
        env["device"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:   # the commit of the checkout, and whether the tree differed from it (then the commit is only a hint)
        here = os.path.dirname(os.path.abspath(__file__))
        git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        env["git_commit"] = git("rev-parse", "HEAD")
        env["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = env["git_dirty"] = None
    return env


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def print_table(records):
    print(f"{'method':<17}{'step ms':>9}{'fwd ms':>9}{'step/2fwd':>10}{'peak MiB':>10}{'fwd MiB':>9}"
          f"{'drift':>11}{'changed':>9}")
    for r in records:
        print(f"{r['method']:<17}{r['step_ms']:>9.2f}{r['forward_ms']:>9.2f}{r['step_over_2_forwards']:>10.2f}"
              f"{_mib(r['peak_extra_bytes']):>10}{_mib(r['forward_peak_extra_bytes']):>9}"
              f"{r['drift_after_K_steps_lr0']:>11.3e}{r['drift_changed_fraction']:>9.4f}")


def parse_config(text):
    if text is None:
        return {}
    if os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--config: not valid JSON (nor a file): {exc}") from None
    if not isinstance(cfg, dict):
        raise SystemExit("--config must be a JSON object of LlamaConfig fields, e.g. '{\"num_hidden_layers\": 16}'")
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--config", default=None, help="JSON object (or file) of LlamaConfig fields overriding --size")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", help="ZOSGD backend (auto, cuda, triton, cpu, reference)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (and timed forwards) per method")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--drift-steps", type=int, default=100, help="K: lr = 0 steps for the restore drift")
    ap.add_argument("--lr", type=float, default=1e-6, help="learning rate of the timed steps")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/zo_step")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    if min(args.steps, args.batch, args.seq_len) < 1 or min(args.warmup, args.drift_steps) < 0:
        raise SystemExit("--steps, --batch, --seq-len must be >= 1; --warmup, --drift-steps >= 0")

    t_start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    model, model_cfg = build_model(args.size, parse_config(args.config), dtype, args.device, args.seed)
    ids = make_batch(model_cfg["vocab_size"], args.batch, args.seq_len, args.device, args.seed + 1)
    snapshot = [p.detach().clone() for _, p in trainable(model)]
    header = environment(args.device) | {
        "size": args.size, "model_config": model_cfg, "dtype": args.dtype,
        "n_params": sum(p.numel() for _, p in trainable(model)),
        "batch": {"batch_size": args.batch, "seq_len": args.seq_len, "tokens": "uniform random ids, fixed"},
        "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "eps": args.eps, "backend_arg": args.backend}
    print(json.dumps({k: header[k] for k in ("device", "torch", "triton", "transformers", "n_params", "dtype")}))
    timer = Timer(args.device)
    records = []
    for method in methods:
        records.append(bench_method(method, model, snapshot, ids, args, timer))
        print(json.dumps(records[-1]), flush=True)
    header["total_wall_s"] = time.perf_counter() - t_start
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_zo_step.json")
    with open(path, "w") as f:
        json.dump({"header": header, "records": records}, f, indent=1)
    print_table(records)
    tr = [r for r in records if r["method"] == "zosgd_transient"]
    if tr and tr[0]["drift_after_K_steps_lr0"] != 0.0:
        print("WARNING: transient-mode drift is not 0.0: the stored weights were written during a step")
    print(f"wrote {path} ({header['total_wall_s']:.1f} s)")
    return 0 if not tr or tr[0]["drift_after_K_steps_lr0"] == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
