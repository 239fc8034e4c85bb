"""Host time of one Triton-backend call, the kernel launch stubbed out (CPU only; no GPU needed):

    TRITON_INTERPRET=1 python bench/host_overhead.py [--tensors 196] [--repeat 100]

A plan of --tensors bf16 tensors shaped like OPT-125m's (a 768x768 matrix or a 768 vector, alternating), then
`mk.perturb_(plan, ..., backend="triton")` timed with `_zo_kernel` replaced by a no-op, so what is measured is the
Python side: torch's custom-op layer, the wrapper's checks, the table cache and the call table. Also times
`triton_kernels._split_tables` alone on a cache hit. With CPU tensors the wrapper also runs its CPU-only mask-kind
check, which a CUDA call skips.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mazo_kernels as mk  # noqa: E402
from mazo_kernels import triton_kernels as tk  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, default=196)
    ap.add_argument("--repeat", type=int, default=100)
    args = ap.parse_args()
    ts = [torch.zeros(768 * 768 if i % 3 else 768, dtype=torch.bfloat16) for i in range(args.tensors)]
    plan = mk.ZOPlan([(f"layers.{i}.w", t) for i, t in enumerate(ts)])
    kernel, tk._zo_kernel = tk._zo_kernel, _NoLaunch()
    try:
        mk.perturb_(plan, 123, 1e-3, backend="triton")
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            mk.perturb_(plan, 123, 1e-3, backend="triton")
        per_call = (time.perf_counter() - t0) / args.repeat
    finally:
        tk._zo_kernel = kernel
    g = plan.groups[0]
    dev = g.tensors[0].device
    tk._split_tables(g.tensors, g.tensors, g.masks, tk.BLOCK, tk.FAST_BLOCK, 1, 16, dev)
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        tk._split_tables(g.tensors, g.tensors, g.masks, tk.BLOCK, tk.FAST_BLOCK, 1, 16, dev)
    split = (time.perf_counter() - t0) / args.repeat
    print(f"{args.tensors} tensors: perturb_ host {per_call * 1e6:.0f} us per call (kernel stubbed); "
          f"_split_tables cache hit {split * 1e6:.0f} us")


if __name__ == "__main__":
    main()
