"""Where a masked pass's time goes, launch by launch (torch.profiler): the Triton backend's fast kernel (MODE 3) and
its guard / general kernel (MODE 4), the CUDA backend's one kernel, for threshold and packed-bit masks.

    python3 bench/profile_masked.py [--numel 268435456] [--tensors 1,64] [--out prof_masked.json]

Why: over LLaMA-7B bf16, Triton's masked Rademacher perturb_ (prior 0) took 22.7 ms with packed bits against 12.8
for gaussian_fast (bench/results/h200_2026-12-03/s17), although its kernel has fewer instructions per element
(bench/sass_count.py). This splits each pass into its launches and compares one large tensor with many.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import mazo_kernels as mk


def plan_of(numel, ntensors, mask, gen):
    n = numel // ntensors
    entries = []
    for i in range(ntensors):
        w = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16).cuda()
        if mask == "bitmask":
            m = mk.BitMask.from_bool((torch.rand(n, generator=gen) < 0.5).cuda())
        elif mask == "threshold":
            m = mk.ThresholdMask(0.0135)   # about half of N(0, 0.02^2) below it
        else:
            m = None
        entries.append(mk.PlanEntry(f"w{i}", w, 1000 + i, mask=m))
    return mk.ZOPlan(entries)


def profile_call(fn, reps=3):
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / reps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [(e.name[:60], round(e.device_time / 1000.0, 3)) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
    return ms, kernels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 28)
    ap.add_argument("--tensors", default="1,64")
    ap.add_argument("--masks", default="bitmask,threshold,none")
    ap.add_argument("--dists", default="rademacher,gaussian_fast")
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    recs = []
    for nt in map(int, args.tensors.split(",")):
        for mask in args.masks.split(","):
            plan = plan_of(args.numel, nt, mask, gen)
            for dist in args.dists.split(","):
                for backend in args.backends.split(","):
                    fn = lambda: mk.perturb_(plan, 0x1234_5678_9ABC_DEF0, 1e-3, dist=dist, backend=backend)
                    ms, kernels = profile_call(fn)
                    rec = dict(tensors=nt, mask=mask, dist=dist, backend=backend, op="perturb_", ms=round(ms, 3),
                               kernels=kernels)
                    recs.append(rec)
                    print(json.dumps(rec), flush=True)
            del plan
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime(
                "%Y-%m-%d"), "numel": args.numel, "records": recs}, f, indent=1)


if __name__ == "__main__":
    main()
