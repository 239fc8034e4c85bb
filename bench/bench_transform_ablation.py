"""Where the Gaussian pass's time goes: the v1 plain Triton kernel with one stage changed or left out at a time.

    python bench/bench_transform_ablation.py --out bench/results/<device>_<date>/     (a GPU; no build needed)

Each variant is the plain bf16 pass theta <- rne(theta + eps * z) of bench/bench_transform.py (one Philox4x32 call
per 8 elements, Box-Muller from 32-bit words, 512 calls per program, 4 warps, no bounds masks) with:

  v1            the spec (Philox4x32-10, exact ops, no FMA)                    -- bits checked against the reference
  fma           the same with FMA contraction allowed (enable_fp_fusion=True)  -- what "FMA everywhere" would buy
  rounds7       Philox4x32-7 instead of -10
  sqrt_approx   tl.sqrt (approximate) instead of sqrt_rn
  no_angle      z = r (no sin/cos polynomials, no quadrant logic)
  no_radius     z = cos / sin of the angle only (no log polynomial, no sqrt)
  no_transform  z = the word as a float times 2^-32 (Philox + conversion only)
  no_philox     no generator: z = (index & 255) as a float (memory, indexing and rounding only)
  v2_candidate  rounds7 + fma (a possible spec v2; not exact across backends as written here)

Only v1 is the spec; the others measure how much each stage costs, to decide whether a spec v2 is worth its price.
Times: median of CUDA-event-timed calls beside a device-to-device copy of the same bytes (the floor).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import triton
import triton.language as tl

from mazo_kernels import reference as R
from bench_transform import _angle, _philox, _rne_bf16, bench    # the v1 kernel's own stages and timer (bench/ is on the path)


@triton.jit
def _radius(w, SQRT_EXACT: tl.constexpr):
    k = ((w >> 12) + 1).to(tl.int32).to(tl.float32)
    bits = k.to(tl.int32, bitcast=True)
    e = (bits - 0x3F3504F3) >> 23
    m = (bits - (e << 23)).to(tl.float32, bitcast=True)
    t = m - 1.0
    p = -0.14662456512451172 * -2.0 * t + 0.22168762981891632 * -2.0
    p = p * t + -0.25359150767326355 * -2.0
    p = p * t + 0.3324826955795288 * -2.0
    p = p * t + -0.4999140501022339 * -2.0
    p = p * t + 1.0000054836273193 * -2.0
    q = (20 - e).to(tl.float32) * 1.3862943649291992 + t * p
    if SQRT_EXACT:
        return tl.sqrt_rn(q)
    return tl.sqrt(q)


@triton.jit
def _z8(blk, seed_lo, seed_hi, tid, ROUNDS: tl.constexpr, MODE: tl.constexpr, SQRT_EXACT: tl.constexpr):
    """[B, 8] noise of elements 8*blk .. 8*blk + 7. MODE: 0 v1, 1 no angle, 2 no radius, 3 no transform,
    4 no generator."""
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    if MODE == 4:
        x0, x1, x2, x3 = c0, c0 + 1, c0 + 2, c0 + 3
    else:
        x0, x1, x2, x3 = _philox(c0, c1, zero + tid.to(tl.uint32), zero, zero + seed_lo.to(tl.uint32),
                                 zero + seed_hi.to(tl.uint32), ROUNDS)
    w = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    if MODE == 0:
        r = _radius(w, SQRT_EXACT)
        c, s = _angle(w)
        z = tl.join(r * c, r * s)
    elif MODE == 1:
        r = _radius(w, SQRT_EXACT)
        z = tl.join(r, -r)
    elif MODE == 2:
        c, s = _angle(w)
        z = tl.join(c, s)
    elif MODE == 3:
        f = (w >> 8).to(tl.int32).to(tl.float32) * 5.960464477539063e-08
        z = tl.join(f, -f)
    else:
        f = (w & 255).to(tl.int32).to(tl.float32)
        z = tl.join(f, -f)
    return z.reshape(blk.shape[0], 8)


@triton.jit
def perturb_kernel(ptr, seed_lo, seed_hi, tid, eps, BLOCK8: tl.constexpr, ROUNDS: tl.constexpr,
                   MODE: tl.constexpr, SQRT_EXACT: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCK8 + tl.arange(0, BLOCK8)
    z = _z8(blk, seed_lo, seed_hi, tid, ROUNDS, MODE, SQRT_EXACT)
    offs = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
    th = tl.load(ptr + offs).to(tl.float32)
    tl.store(ptr + offs, _rne_bf16(th + eps * z))


@triton.jit
def noise_kernel(out, seed_lo, seed_hi, tid, BLOCK8: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCK8 + tl.arange(0, BLOCK8)
    z = _z8(blk, seed_lo, seed_hi, tid, 10, 0, True)
    offs = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(out + offs, z)


VARIANTS = {   # name: (rounds, mode, sqrt exact, fp fusion)
    "v1": (10, 0, True, False),
    "fma": (10, 0, True, True),
    "rounds7": (7, 0, True, False),
    "sqrt_approx": (10, 0, False, False),
    "no_angle": (10, 1, True, False),
    "no_radius": (10, 2, True, False),
    "no_transform": (10, 3, True, False),
    "no_philox": (10, 4, True, False),
    "v2_candidate": (7, 0, True, True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 30)
    ap.add_argument("--block8", type=int, default=512)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    n, B = args.numel, args.block8
    assert n % (8 * B) == 0, "numel must be a multiple of 8 * block8"
    # v1 noise bits against the reference (the other variants are not the spec)
    m = 8 * B
    out = torch.full((m,), float("nan"), device="cuda")
    seed = 2 ** 64 - 5
    noise_kernel[(1,)](out, seed & 0xFFFFFFFF, seed >> 32, 7, BLOCK8=B, enable_fp_fusion=False)
    exact = bool(torch.equal(out.cpu().view(torch.int32), R.gaussian(seed, 7, torch.arange(m)).view(torch.int32)))
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.02
    dst = torch.empty_like(w)
    copy_ms = bench(lambda: dst.copy_(w), iters=25)
    res = {"format": "mazo_kernels.transform_ablation", "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"), "numel": n, "block8": B, "num_warps": args.warps,
           "v1_bits_equal_reference": exact, "copy_ms": copy_ms, "copy_TBps": 4 * n / copy_ms / 1e9, "variants": {}}
    s = 1234567
    for name, (rounds, mode, sqrt_exact, fusion) in VARIANTS.items():
        def run():
            perturb_kernel[(n // (8 * B),)](w, s & 0xFFFFFFFF, s >> 32, 3, 1e-3, BLOCK8=B, ROUNDS=rounds, MODE=mode,
                                           SQRT_EXACT=sqrt_exact, num_warps=args.warps, enable_fp_fusion=fusion)
        ms = bench(run, iters=25)
        res["variants"][name] = {"ms": ms, "fraction_of_floor": copy_ms / ms, "rounds": rounds, "mode": mode,
                                 "sqrt_exact": sqrt_exact, "fp_fusion": fusion}
        print(f"{name:14s} {ms:8.3f} ms  {copy_ms / ms:6.1%} of the floor", flush=True)
    v1 = res["variants"]["v1"]["ms"]
    for name, v in res["variants"].items():
        v["saved_vs_v1_ms"] = v1 - v["ms"]
    print(json.dumps({k: v for k, v in res.items() if k != "variants"}))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "transform_ablation.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
