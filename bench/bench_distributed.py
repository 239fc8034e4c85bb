"""ZO data parallelism and FSDP2 on torch.distributed: step-time scaling and bit-identity checks (docs/DISTRIBUTED.md).

Run under torchrun, one process per GPU (NCCL), or with --device cpu over gloo for a dry run:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc_per_node 2 bench/bench_distributed.py --out bench/results/distributed_run
    torchrun --nproc_per_node 2 bench/bench_distributed.py --device cpu --size tiny --check-size tiny --out /tmp/d

Parts (--parts, comma-separated; all by default):
  scaling    LLaMA-shaped random bf16 model (--size, default 7b: 6.74 B parameters), fixed global batch
             (--batch x --seq, default 16 x 256): median ZO step time data-parallel over all ranks (each rank its
             share of the batch, one all-gather of the loss pair per step), then on rank 0 alone with the whole
             batch; forward times at both per-rank batch sizes; the all-gather's latency; a replica checksum.
  dp         small model (--check-size): a data-parallel run against rank 0 re-running it in one process that
             combines the same micro-batch losses in rank order (bit-identical weights expected) and on the whole
             batch at once (differences bounded by the loss rounding: g differences and weight differences
             reported); the DP seed log replayed on the initial weights.
  fsdp       the same small model under FSDP2 (fully_shard per decoder layer + root): the perturbed weights the
             first forward sees (all-gathered) against the unsharded one-process run's (same noise per element),
             final weights against the one-process micro-batch run.
  device_map rank 0: the small model split over two GPUs (accelerate.dispatch_model, what device_map="auto"
             does): one plan per device; weights against the one-device whole-batch run.
Rank 0 writes OUT/bench_distributed.json (device, versions, date, every result and check).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

try:
    import mazo_kernels as mk
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mazo_kernels as mk
from mazo_kernels import distributed as mkd

SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256),
}
Z_MAX = 5.27


def log(msg):
    if RANK == 0:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------- setup
def build_model(size, dtype, device, seed=0):
    """Random init directly on the device in `dtype` (no host copy): the 7B shape is ready in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    if device.type == "cuda":   # the init above drew from the device generator: reseed and redraw deterministically
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02, generator=g)
                else:
                    p.fill_(1.0)
    return model.eval()


def batch(step, n, seq, vocab, device):
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randint(0, vocab, (n, seq), generator=g).to(device)


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn_of, steps, warmup, device):
    """Wall ms of fn_of(k)() per call (the device synchronised before and after each), warm-up calls dropped.
    fn_of(k) prepares the call's inputs outside the timed region."""
    times = []
    for k in range(warmup + steps):
        fn = fn_of(k)
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if k >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def timed_steps(opt, closure_of, steps, warmup, device):
    return timed(lambda k: (lambda c=closure_of(k): opt.step(c)), steps, warmup, device)


def summary(ms):
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "min_ms": min(ms),
            "max_ms": max(ms), "n": len(ms)}


def barrier():
    dist.barrier()


# ---------------------------------------------------------------------------------------------------- scaling
def part_scaling(a, device, backend):
    res = {"size": a.size, "params": None, "global_batch": [a.batch, a.seq], "world_size": WORLD}
    t0 = time.perf_counter()
    model = build_model(a.size, torch.bfloat16, device, seed=0)
    res["build_s"] = time.perf_counter() - t0
    res["params"] = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    share = a.batch // WORLD
    log(f"scaling: {a.size} ({res['params'] / 1e9:.2f} B params) built in {res['build_s']:.1f} s; "
        f"global batch {a.batch}x{a.seq}, {share} rows per rank")

    # 1. data parallel over every rank, each its share of the global batch
    opt = mk.ZOSGD(model.named_parameters(), lr=1e-6, eps=1e-3, module=model, seed=1, backend=backend)
    hook = mkd.data_parallel(opt, check_every=0)
    mine = slice(RANK * share, (RANK + 1) * share)
    ms = timed_steps(opt, lambda k: (lambda ids=batch(k, a.batch, a.seq, vocab, device)[mine]: loss_of(model, ids)),
                     a.steps, a.warmup, device)
    per_rank = [None] * WORLD
    dist.all_gather_object(per_rank, statistics.median(ms))
    res["dp"] = summary(ms) | {"median_ms_by_rank": per_rank, "rows_per_rank": share}
    if device.type == "cuda":
        res["dp"]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    t = time.perf_counter()
    ck = mkd.check_replicas([e.tensor for e in opt.plan.entries])
    res["dp"]["replicas_identical_after"] = True
    res["dp"]["checksum"] = ck
    res["dp"]["checksum_s"] = time.perf_counter() - t
    # the collective alone: 200 all-gathers of a loss pair
    x = torch.ones(2, dtype=torch.float32, device=device)
    hook.check_every = 0
    for _ in range(10):
        hook(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(200):
        hook(x)
    sync(device)
    res["allgather_loss_pair_us"] = (time.perf_counter() - t) / 200 * 1e6
    log(f"  DP x{WORLD}: {res['dp']['median_ms']:.1f} ms/step (ranks {['%.1f' % v for v in per_rank]}); "
        f"all-gather of the loss pair {res['allgather_loss_pair_us']:.0f} us; replica checksum "
        f"{res['dp']['checksum_s'] * 1e3:.0f} ms")

    # 2. forward alone at the per-rank and the global batch size (rank 0), to separate compute from the rest
    if RANK == 0:
        fwd = {}
        for rows in sorted({share, a.batch}):
            ids = batch(0, rows, a.seq, vocab, device)
            with torch.no_grad():
                f = timed(lambda k: (lambda: loss_of(model, ids)), a.steps, 1, device)
            fwd[str(rows)] = statistics.median(f)
        res["forward_ms_by_rows"] = fwd
        # 3. one GPU, the whole global batch (after the DP run: its weights no longer need to match anything)
        opt1 = mk.ZOSGD(model.named_parameters(), lr=1e-6, eps=1e-3, module=model, seed=3, backend=backend)
        ms1 = timed_steps(opt1, lambda k: (lambda ids=batch(k, a.batch, a.seq, vocab, device): loss_of(model, ids)),
                          a.steps, a.warmup, device)
        res["single"] = summary(ms1) | {"rows": a.batch}
        res["speedup"] = res["single"]["median_ms"] / res["dp"]["median_ms"]
        res["scaling_efficiency"] = res["speedup"] / WORLD
        log(f"  1 device: {res['single']['median_ms']:.1f} ms/step; speedup x{res['speedup']:.2f} "
            f"(efficiency {res['scaling_efficiency']:.0%}); forward ms by rows {fwd}")
    barrier()
    return res


# ---------------------------------------------------------------------------------------------------- checks
def zo_opts(backend):
    return dict(lr=5e-4, eps=1e-3, weight_decay=0.0, seed=21, backend=backend)


def run_small(model, steps, closure_of, backend, *, dp=False, capture=None):
    opt = mk.ZOSGD(model.named_parameters(), module=model, **zo_opts(backend))
    if dp:
        mkd.data_parallel(opt, check_every=2)
    for k in range(steps):
        inner = closure_of(k)
        if capture is not None and k == 0:
            calls = []

            def closure(inner=inner, calls=calls):
                if not calls:
                    capture.update(mkd.full_state(model))
                calls.append(1)
                return inner()
        else:
            closure = inner
        opt.step(closure)
    return opt


def _state(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def compare(a, b, update_bound=None, steps=0, eps=1e-3):
    """bit-identical?, max |a - b|, how many elements differ; with update_bound (sum over steps of
    lr*|g_a - g_b|*z_max): whether every element is within update_bound + 8 storage ulps per step (the ulp of
    max(|a|, |b|) + eps*z_max: each rounding of two values that differ can add one)."""
    same, maxabs, ndiff, ok, worst = True, 0.0, 0, True, 0.0
    for n in a:
        x, y = a[n].float().cpu(), b[n].float().cpu()
        if torch.equal(a[n].cpu(), b[n].cpu()):
            continue
        same = False
        d = (x - y).abs()
        maxabs = max(maxabs, float(d.max()))
        ndiff += int((a[n].cpu() != b[n].cpu()).sum())
        if update_bound is not None:
            mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[a[n].dtype]
            mag = torch.maximum(x.abs(), y.abs()) + eps * Z_MAX
            ulp = torch.exp2(torch.floor(torch.log2(mag)) - mant)
            lim = update_bound + 8 * steps * ulp
            ok = ok and bool((d <= lim).all())
            worst = max(worst, float((d / lim).max()))
    r = {"bit_identical": same, "max_abs_diff": maxabs, "elements_differ": ndiff,
         "elements": sum(t.numel() for t in a.values())}
    if update_bound is not None:
        r.update(within_bound=ok, update_bound=update_bound, max_diff_over_limit=worst)
    return r


def g_list(opt):
    return [s["g"] for s in opt.seed_log.steps]


def part_dp(a, device, backend):
    vocab = SIZES[a.check_size]["vocab_size"]
    share = a.check_batch // WORLD
    res = {"size": a.check_size, "global_batch": [a.check_batch, a.check_seq], "steps": a.check_steps}
    model = build_model(a.check_size, torch.bfloat16, device, seed=5)
    opt = run_small(model, a.check_steps, lambda k: (
        lambda ids=batch(k, a.check_batch, a.check_seq, vocab, device)[RANK * share:(RANK + 1) * share]:
        loss_of(model, ids)), backend, dp=True)
    mkd.check_replicas(model)
    res["replicas_identical"] = True
    dp_state, dp_log = _state(model), opt.seed_log.to_dict()
    if RANK == 0:
        ref = build_model(a.check_size, torch.bfloat16, device, seed=5)
        ropt = run_small(ref, a.check_steps, lambda k: mkd.micro_batch_closure(
            lambda ids: loss_of(ref, ids), batch(k, a.check_batch, a.check_seq, vocab, device).split(share)), backend)
        res["vs_micro_batch_one_process"] = compare(dp_state, _state(ref))
        res["g_equal_micro_batch"] = g_list(opt) == g_list(ropt)
        whole = build_model(a.check_size, torch.bfloat16, device, seed=5)
        wopt = run_small(whole, a.check_steps, lambda k: (
            lambda ids=batch(k, a.check_batch, a.check_seq, vocab, device): loss_of(whole, ids)), backend)
        gd = [abs(x[0] - y[0]) for x, y in zip(g_list(opt), g_list(wopt))]
        bound = sum(zo_opts(backend)["lr"] * d * Z_MAX for d in gd)
        res["vs_whole_batch_one_process"] = compare(dp_state, _state(whole), bound, a.check_steps)
        res["whole_batch_g_abs_diff"] = gd
        res["whole_batch_g"] = [x[0] for x in g_list(wopt)]
        init = build_model(a.check_size, torch.bfloat16, device, seed=5)
        mk.replay(init, dp_log, backend=backend)
        res["replay_equals_dp"] = compare(_state(init), dp_state)["bit_identical"]
        res["_whole_state"] = _state(whole)            # for the device_map part (not written)
        del ref, whole, init
        log(f"dp: vs micro-batch {res['vs_micro_batch_one_process']['bit_identical']}, vs whole batch "
            f"{res['vs_whole_batch_one_process']}, replay {res['replay_equals_dp']}")
    barrier()
    return res


def part_fsdp(a, device, backend):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    vocab = SIZES[a.check_size]["vocab_size"]
    share = a.check_batch // WORLD
    res = {"size": a.check_size, "global_batch": [a.check_batch, a.check_seq], "steps": a.check_steps}
    mesh = init_device_mesh(device.type, (WORLD,))
    model = build_model(a.check_size, torch.bfloat16, device, seed=6)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    seen = {}
    opt = run_small(model, a.check_steps, lambda k: (
        lambda ids=batch(k, a.check_batch, a.check_seq, vocab, device)[RANK * share:(RANK + 1) * share]:
        loss_of(model, ids)), backend, dp=True, capture=seen)
    shards = {e.name: [e.global_offset, e.tensor.numel(), e.full_numel] for e in opt.plan.entries[:3]}
    final = _state(model)
    all_shards = [None] * WORLD
    dist.all_gather_object(all_shards, shards)
    res["shards_first_tensors"] = all_shards
    if RANK == 0:
        ref = build_model(a.check_size, torch.bfloat16, device, seed=6)
        rseen = {}
        ropt = run_small(ref, a.check_steps, lambda k: mkd.micro_batch_closure(
            lambda ids: loss_of(ref, ids), batch(k, a.check_batch, a.check_seq, vocab, device).split(share)),
            backend, capture=rseen)
        res["perturbed_weights_vs_unsharded"] = compare(seen, rseen)       # the noise of every element
        res["final_vs_micro_batch_one_process"] = compare(final, _state(ref))
        res["g_equal_micro_batch"] = g_list(opt) == g_list(ropt)
        res["g_fsdp"] = [x[0] for x in g_list(opt)]
        res["g_one_process"] = [x[0] for x in g_list(ropt)]
        log(f"fsdp: perturbed weights {res['perturbed_weights_vs_unsharded']['bit_identical']}, final "
            f"{res['final_vs_micro_batch_one_process']}")
        del ref
    barrier()
    return res


def part_device_map(a, device, backend, whole_state):
    res = {}
    if RANK == 0:
        if device.type != "cuda" or torch.cuda.device_count() < 2:
            res["skipped"] = "needs two visible GPUs"
        else:
            from accelerate import dispatch_model
            vocab = SIZES[a.check_size]["vocab_size"]
            model = build_model(a.check_size, torch.bfloat16, torch.device("cuda", 0), seed=5)
            n = len(model.model.layers)
            dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
            dmap.update({f"model.layers.{i}": (0 if i < n // 2 else 1) for i in range(n)})
            model = dispatch_model(model, device_map=dmap)
            opt = run_small(model, a.check_steps, lambda k: (
                lambda ids=batch(k, a.check_batch, a.check_seq, vocab, torch.device("cuda", 0)):
                loss_of(model, ids)), backend)
            res["plans_devices"] = [str(p.device) for p in opt.plans]
            res["vs_one_device_whole_batch"] = compare(_state(model), whole_state) if whole_state else None
            log(f"device_map: plans on {res['plans_devices']}; vs one device {res['vs_one_device_whole_batch']}")
            del model
    barrier()
    return res


# ---------------------------------------------------------------------------------------------------- main
def environment(device):
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "mazo_kernels": mk.__version__,
           "world_size": WORLD, "backend_dist": dist.get_backend(),
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")}
    for mod in ("transformers", "triton", "accelerate"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["gpus"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
        v = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    else:
        env["device"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        git = lambda *x: subprocess.run(["git", "-C", here, *x], capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        env["git_commit"] = git("rev-parse", "HEAD")
        env["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = env["git_dirty"] = None
    return env


def main(argv=None):
    global RANK, WORLD
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/distributed_run")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--parts", default="scaling,dp,fsdp,device_map")
    ap.add_argument("--size", default="7b", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check-size", default="small", choices=sorted(SIZES))
    ap.add_argument("--check-batch", type=int, default=8)
    ap.add_argument("--check-seq", type=int, default=64)
    ap.add_argument("--check-steps", type=int, default=6)
    a = ap.parse_args(argv)
    parts = [p for p in a.parts.split(",") if p]
    RANK, WORLD, local = mkd.init_from_env("nccl" if a.device == "cuda" else "gloo")
    if not dist.is_initialized():       # one process without torchrun: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        if a.device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo", rank=0, world_size=1)
    device = torch.device("cuda", local) if a.device == "cuda" else torch.device("cpu")
    if a.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // WORLD))
    t_all = time.perf_counter()
    out = {"env": environment(device), "args": vars(a)}
    log(json.dumps(out["env"]))
    whole_state = None
    for p in parts:
        t = time.perf_counter()
        if p == "scaling":
            out["scaling"] = part_scaling(a, device, a.backend)
            if device.type == "cuda":
                torch.cuda.empty_cache()          # the 7B model is gone: give its memory back
        elif p == "dp":
            out["dp"] = part_dp(a, device, a.backend)
            whole_state = out["dp"].pop("_whole_state", None)
        elif p == "fsdp":
            out["fsdp"] = part_fsdp(a, device, a.backend)
        elif p == "device_map":
            try:
                out["device_map"] = part_device_map(a, device, a.backend, whole_state)
            except Exception as exc:          # noqa: BLE001 -- rank 0 only: record it, keep the other results
                out["device_map"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"device_map failed: {out['device_map']['error']}")
        else:
            raise SystemExit(f"unknown part {p!r}")
        out.setdefault("part_seconds", {})[p] = time.perf_counter() - t
        if RANK == 0:        # written after every part, so a time-out keeps what finished
            os.makedirs(a.out, exist_ok=True)
            out["total_s"] = time.perf_counter() - t_all
            with open(os.path.join(a.out, "bench_distributed.json"), "w") as f:
                json.dump(out, f, indent=1, default=str)
    log(f"done in {time.perf_counter() - t_all:.0f} s; wrote {a.out}/bench_distributed.json")
    dist.destroy_process_group()


RANK, WORLD = 0, 1

if __name__ == "__main__":
    main()
