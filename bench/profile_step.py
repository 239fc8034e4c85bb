"""Where a whole ZO step's GPU time goes: torch.profiler over a few steps of ZOSGD (or the MeZO loop) on a
random-init LLaMA-shaped model, kernels grouped into forwards / ZO passes / other, and the idle gaps between them.

bench_e2e.py reports rest = step - forwards - passes, each timed alone; this script looks inside the step to say
what the rest is (GPU idle while the host works, the small kernels of the loss and gradient, or the forwards
running slower inside the step).

  python bench/profile_step.py --model-shape 7b --batch 16 --seq 256 --method zosgd --out prof.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e as E  # noqa: E402
import mazo_kernels as mk  # noqa: E402


def kernel_events(prof):
    """(start_us, end_us, name) of every GPU kernel / memcpy / memset the profiler saw, in start order."""
    out = []
    for e in prof.events():
        # record_function ranges appear on the GPU timeline too (gpu_user_annotation): not kernels
        if (e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() >= 0
                and not e.name.startswith("step")):
            out.append((e.time_range.start, e.time_range.end, e.name))
    out.sort()
    return out


def category(name: str) -> str:
    if "zo_apply_kernel" in name or "_zo_kernel" in name:
        return "zo_pass"
    return "other"


def analyse(events, step_windows, gap_min_us=20.0):
    """Per step window (start, end in the profiler's clock): busy time by category, idle time, the largest gaps."""
    steps = []
    for lo, hi in step_windows:
        ev = [e for e in events if e[0] >= lo and e[1] <= hi]
        if not ev:
            continue
        busy = {}
        for s, t, n in ev:
            c = category(n)
            busy[c] = busy.get(c, 0.0) + (t - s)
        gaps, cur = [], ev[0][1]
        prev = ev[0][2]
        for s, t, n in ev[1:]:
            if s - cur >= gap_min_us:
                gaps.append((s - cur, prev[:80], n[:80]))
            if t > cur:
                cur, prev = t, n
        gaps.sort(reverse=True)
        steps.append({"gpu_span_ms": (ev[-1][1] - ev[0][0]) / 1e3,
                      "busy_ms": {k: v / 1e3 for k, v in busy.items()},
                      "idle_ms": sum(g[0] for g in gaps) / 1e3, "n_kernels": len(ev),
                      "zo_kernels": [(round((t - s) / 1e3, 3), n[:120]) for s, t, n in ev if category(n) == "zo_pass"],
                      "largest_gaps": [(round(g / 1e3, 3), a, b) for g, a, b in gaps[:8]]})
    return steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="7b", choices=list(E.SHAPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--method", default="zosgd", help="a bench_e2e method (zosgd, zosgd-transient, mezo, ...)")
    ap.add_argument("--dist", default="gaussian_fast")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    args = E.build_parser().parse_args(["--model-shape", a.model_shape, "--dist", a.dist])
    device = torch.device(a.device)
    fields = E.model_fields(a.model_shape, {}, a.seq)
    model, cfg = E.build_model(fields, torch.bfloat16, device, 0)
    ids = E.make_batch(cfg.vocab_size, a.batch, a.seq, device, 0)
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def closure():
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    doc = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "model_shape": a.model_shape, "batch": a.batch, "seq": a.seq,
           "dist": a.dist, "methods": {}}
    for method in a.method.split(","):
        E.init_weights(model, 0)
        opt, _ = E.make_method(method, model, args, None, None)
        for _ in range(a.warmup):
            opt.step(closure)
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(a.steps):
                sync()
                with torch.profiler.record_function(f"step{i}"):
                    opt.step(closure)
                sync()
        events = kernel_events(prof)
        # step windows: from one host marker's start to the next (a synchronize ends each step)
        marks = sorted(e.time_range.start for e in prof.events() if e.name.startswith("step")
                       and e.device_type == torch.autograd.DeviceType.CPU)
        bounds = marks + [float("inf")]
        steps = analyse(events, list(zip(bounds[:-1], bounds[1:])))
        doc["methods"][method] = steps
        for i, s in enumerate(steps):
            print(f"{method} step {i}: span {s['gpu_span_ms']:.2f} ms, busy "
                  f"{ {k: round(v, 2) for k, v in s['busy_ms'].items()} }, idle {s['idle_ms']:.2f} ms, "
                  f"{s['n_kernels']} kernels")
            print("  zo kernels:", s["zo_kernels"][:6])
            print("  gaps:", s["largest_gaps"][:4])
        del opt
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
