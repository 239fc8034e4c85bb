"""Time the package's ops (one bf16 plan over one large tensor) beside the copy floor, per backend.
A first look for the core issue; the full microbenchmark matrix belongs to the speed work."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import mazo_kernels as mk


def bench(fn, iters=10):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=1 << 30)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    import triton
    n = args.numel
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.02
    dst = torch.empty_like(w)
    copy_ms = bench(lambda: dst.copy_(w))
    del dst
    plan = mk.ZOPlan([("w", w)])
    g = torch.tensor([0.5], device="cuda")
    recs = []
    for backend in ("cuda", "triton"):
        cases = {
            "perturb_gaussian": lambda: mk.perturb_(plan, 7, 1e-3, backend=backend),
            "perturb_rademacher": lambda: mk.perturb_(plan, 7, 1e-3, dist="rademacher", backend=backend),
            "perturb_with_prior": lambda: mk.perturb_(plan, 7, -1e-3, prior=1e-3, backend=backend),
            "update_restore_sr": lambda: mk.update_(plan, [7], g, lr=1e-6, restore_seed=7, prior=-1e-3,
                                                    backend=backend),
        }
        for name, fn in cases.items():
            try:
                ms = bench(fn)
                recs.append({"op": name, "backend": backend, "dtype": "bfloat16", "numel": n, "ms": ms,
                             "floor_ms": copy_ms, "fraction_of_floor": copy_ms / ms})
            except Exception as exc:
                recs.append({"op": name, "backend": backend, "error": repr(exc)[:300]})
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "copy_ms": copy_ms,
           "records": recs}
    for r in recs:
        print(r)
    os.makedirs(args.out, exist_ok=True)
    json.dump(res, open(os.path.join(args.out, "ops_core.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
