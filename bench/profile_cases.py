"""The kernel passes that issue 3 measures, one launch each, for a profiler (Nsight Compute) to read.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... python3 bench/profile_cases.py

One tensor of --numel elements (default 2^28, larger than L2; --dtype bf16, fp16 or fp32) on the GPU, one dense plan; per backend (cuda,
triton) and case: one warm-up call (compilation, tables), then the profiled call between cudaProfilerStart/Stop.
Cases: perturb_ Gaussian and Rademacher (+eps, no restore), perturb_ Gaussian with restore (-eps, prior +eps), and
update_ Gaussian with restore and stochastic rounding (the optimizer's third pass); --extra-dists adds the three
Gaussian-style cases for other distributions (gaussian_fast). Prints one line per profiled call
(backend, case, launch order) so the profiler's rows can be matched to cases.
"""
from __future__ import annotations

import argparse
import json

import torch

import mazo_kernels as mk


def cases(plan, backend, extra_dists=()):
    s, sr = 0x1234_5678_9ABC_DEF0, 0x0FED_CBA9_8765_4321
    grad = torch.full((1,), 0.5, device=plan.device)   # made here: a fill inside the lambda is a profiled launch too

    def three(dist):
        return [
            (f"perturb_{dist}", lambda: mk.perturb_(plan, s, 1e-3, dist=dist, backend=backend)),
            (f"perturb_{dist}_restore", lambda: mk.perturb_(plan, s, -1e-3, prior=1e-3, dist=dist, backend=backend)),
            (f"update_{dist}_restore_sr", lambda: mk.update_(plan, [s], grad, lr=1e-5, restore_seed=s, prior=-1e-3,
                                                              sr_seed=sr, dist=dist, backend=backend)),
        ]
    base = three("gaussian")
    out = base[:1] + [("perturb_rademacher", lambda: mk.perturb_(plan, s, 1e-3, dist="rademacher",
                                                                  backend=backend))] + base[1:]
    for d in extra_dists:
        out += three(d)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 28)
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--extra-dists", default="", help="comma list (e.g. gaussian_fast): its perturb_, restoring "
                                                     "perturb_ and update_ cases after the default four")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    w = (torch.randn(args.numel, device="cuda") * 0.02).to(dtype)
    plan = mk.ZOPlan([("layers.0.mlp.weight", w)])
    order = []
    for backend in args.backends.split(","):
        for name, fn in cases(plan, backend, [d for d in args.extra_dists.split(",") if d]):
            fn()                                  # warm-up: compile, tables on the device
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            order.append({"backend": backend, "case": name, "numel": args.numel, "dtype": args.dtype})
            print(json.dumps(order[-1]), flush=True)


if __name__ == "__main__":
    main()
