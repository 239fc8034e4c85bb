"""Plain-kernel timing of the v1 noise transform against the copy floor (the gate for freezing a spec version).

One bf16 pass theta <- rne(theta + eps * z) over a large buffer, with z from the spec (Philox4x32-10 +
exact-ops Box-Muller, or Rademacher), beside a device-to-device copy of the same bytes and MeZO-style
torch.normal + add_. Writes JSON to bench/results/ (or --out)."""
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


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    c0 = c0.to(tl.uint32, bitcast=True)
    c1 = c1.to(tl.uint32, bitcast=True)
    c2 = c2.to(tl.uint32, bitcast=True)
    c3 = c3.to(tl.uint32, bitcast=True)
    k0 = k0.to(tl.uint32, bitcast=True)
    k1 = k1.to(tl.uint32, bitcast=True)
    A: tl.constexpr = 0xD2511F53
    B: tl.constexpr = 0xCD9E8D57
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, B) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, A) ^ c3 ^ k1
        c1 = _c2 * B
        c3 = _c0 * A
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _radius(w):
    u = ((w >> 8) + 1).to(tl.int32).to(tl.float32) * 5.960464477539063e-08
    bits = u.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.4142135381698608
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    t = m - 1.0
    p = 0.12210839241743088 * t + -0.1878269463777542
    p = p * t + 0.20454779267311096
    p = p * t + -0.2489679753780365
    p = p * t + 0.33316028118133545
    p = p * t + -0.5000140070915222
    p = p * t + 1.0000008344650269
    ln_u = e.to(tl.float32) * 0.6931471824645996 + t * p
    return tl.sqrt_rn(ln_u * -2.0)


@triton.jit
def _angle(w):
    q = w >> 30
    x = (((w >> 6) & 0xFFFFFF).to(tl.int32) - 0x800000).to(tl.float32) * 9.362117613290966e-08
    s2 = x * x
    sn = ((0.008151679299771786 * s2 + -0.16662482917308807) * s2 + 0.9999985694885254) * x
    cs = ((-0.0013585949782282114 * s2 + 0.041655030101537704) * s2 + -0.4999985694885254) * s2 + 1.0
    c = tl.where(q == 0, cs, tl.where(q == 1, -sn, tl.where(q == 2, -cs, sn)))
    s = tl.where(q == 0, sn, tl.where(q == 1, cs, tl.where(q == 2, -sn, -cs)))
    return c, s


@triton.jit
def _rne_bf16(x):
    b = x.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def gauss_perturb_kernel(ptr, n, seed_lo, seed_hi, tid, eps, BLOCK4: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCK4 + tl.arange(0, BLOCK4)      # Philox call index = element index // 4
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    seed_lo = seed_lo.to(tl.uint32)
    seed_hi = seed_hi.to(tl.uint32)
    tid = tid.to(tl.uint32)
    x0, x1, x2, x3 = _philox(c0, c1, zero + tid, zero, zero + seed_lo, zero + seed_hi)
    ra = _radius(x0)
    ca, sa = _angle(x1)
    rb = _radius(x2)
    cb, sb = _angle(x3)
    z = tl.join(tl.join(ra * ca, rb * cb), tl.join(ra * sa, rb * sb))  # [b, pair, cos|sin] = lane 2*pair + j
    z = z.reshape(BLOCK4 * 4)
    offs = pid.to(tl.int64) * BLOCK4 * 4 + tl.arange(0, BLOCK4 * 4)
    msk = offs < n
    th = tl.load(ptr + offs, mask=msk).to(tl.float32)
    tl.store(ptr + offs, _rne_bf16(th + eps * z), mask=msk)


@triton.jit
def noise_kernel(out, n, seed_lo, seed_hi, tid, BLOCK4: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCK4 + tl.arange(0, BLOCK4)
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    seed_lo = seed_lo.to(tl.uint32)
    seed_hi = seed_hi.to(tl.uint32)
    tid = tid.to(tl.uint32)
    x0, x1, x2, x3 = _philox(c0, c1, zero + tid, zero, zero + seed_lo, zero + seed_hi)
    ra = _radius(x0)
    ca, sa = _angle(x1)
    rb = _radius(x2)
    cb, sb = _angle(x3)
    z = tl.join(tl.join(ra * ca, rb * cb), tl.join(ra * sa, rb * sb))  # [b, pair, cos|sin] = lane 2*pair + j
    z = z.reshape(BLOCK4 * 4)
    offs = pid.to(tl.int64) * BLOCK4 * 4 + tl.arange(0, BLOCK4 * 4)
    tl.store(out + offs, z, mask=offs < n)


@triton.jit
def rademacher_perturb_kernel(ptr, n, seed_lo, seed_hi, tid, eps, BLOCK128: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCK128 + tl.arange(0, BLOCK128)
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    seed_lo = seed_lo.to(tl.uint32)
    seed_hi = seed_hi.to(tl.uint32)
    tid = tid.to(tl.uint32)
    x0, x1, x2, x3 = _philox(c0, c1, zero + tid, zero + 1, zero + seed_lo, zero + seed_hi)
    w = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    w = w.reshape(BLOCK128 * 4)                                        # word (i // 32) % 4
    bits = tl.arange(0, 32).to(tl.uint32)
    sgn = ((w[:, None] >> bits[None, :]) & 1).reshape(BLOCK128 * 128)
    z = (1 - 2 * sgn.to(tl.int32)).to(tl.float32)
    offs = pid.to(tl.int64) * BLOCK128 * 128 + tl.arange(0, BLOCK128 * 128)
    msk = offs < n
    th = tl.load(ptr + offs, mask=msk).to(tl.float32)
    tl.store(ptr + offs, _rne_bf16(th + eps * z), mask=msk)


def check_bits(device):
    n = 4096 + 13
    out = torch.full((n,), float("nan"), device=device)
    seed = 2 ** 64 - 5
    noise_kernel[(triton.cdiv(n, 4 * 256),)](out, n, seed & 0xFFFFFFFF, seed >> 32, 7, BLOCK4=256,
                                             enable_fp_fusion=False)
    ref = R.gaussian(seed, 7, torch.arange(n))
    return bool(torch.equal(out.cpu().view(torch.int32), ref.view(torch.int32)))


def bench(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=1 << 30)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    dev = "cuda"
    exact = check_bits(dev)
    n = args.numel
    w = (torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02)
    dst = torch.empty_like(w)
    copy_ms = bench(lambda: dst.copy_(w))
    seed = 1234567
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "numel": n,
           "bits_equal_reference": exact, "copy_ms": copy_ms,
           "copy_TBps": 4 * n / copy_ms / 1e9}
    for B in (128, 256, 512):
        ms = bench(lambda: gauss_perturb_kernel[(triton.cdiv(n, 4 * B),)](w, n, seed & 0xFFFFFFFF, seed >> 32, 3,
                                                                        1e-3, BLOCK4=B, enable_fp_fusion=False))
        res[f"gauss_B{B}_ms"] = ms
    for B in (8, 16, 32):
        ms = bench(lambda: rademacher_perturb_kernel[(triton.cdiv(n, 128 * B),)](w, n, seed & 0xFFFFFFFF, seed >> 32, 3,
                                                                               1e-3, BLOCK128=B,
                                                                               enable_fp_fusion=False))
        res[f"rademacher_B{B}_ms"] = ms

    def mezo():
        torch.manual_seed(seed)
        z = torch.normal(0, 1, size=w.shape, device=dev, dtype=w.dtype)
        w.add_(z, alpha=1e-3)
    res["mezo_add_ms"] = bench(mezo, iters=5)
    g = min(v for k, v in res.items() if k.startswith("gauss_B"))
    r = min(v for k, v in res.items() if k.startswith("rademacher_B"))
    res["gauss_fraction_of_floor"] = copy_ms / g
    res["rademacher_fraction_of_floor"] = copy_ms / r
    print(json.dumps(res, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "transform_v1.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()


@triton.jit
def gauss_perturb_kernel_2d(ptr, n, seed_lo, seed_hi, tid, eps, BLOCK4: tl.constexpr):
    """Same bits as gauss_perturb_kernel; a [BLOCK4, 4] layout keeps each Philox call's four lanes in one thread."""
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCK4 + tl.arange(0, BLOCK4)
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    x0, x1, x2, x3 = _philox(c0, c1, zero + tid.to(tl.uint32), zero, zero + seed_lo.to(tl.uint32),
                             zero + seed_hi.to(tl.uint32))
    lane = tl.arange(0, 4)[None, :]
    w_r = tl.where(lane < 2, x0[:, None], x2[:, None])
    w_a = tl.where(lane < 2, x1[:, None], x3[:, None])
    r = _radius(w_r)
    c, s = _angle(w_a)
    z = r * tl.where((lane & 1) == 0, c, s)
    offs = blk[:, None] * 4 + lane
    msk = offs < n
    th = tl.load(ptr + offs, mask=msk).to(tl.float32)
    tl.store(ptr + offs, _rne_bf16(th + eps * z), mask=msk)


@triton.jit
def gauss_perturb_kernel_2d_pair(ptr, n, seed_lo, seed_hi, tid, eps, BLOCK4: tl.constexpr):
    """Radius and angle computed once per pair ([BLOCK4, 2] then broadcast over (cos, sin))."""
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCK4 + tl.arange(0, BLOCK4)
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    x0, x1, x2, x3 = _philox(c0, c1, zero + tid.to(tl.uint32), zero, zero + seed_lo.to(tl.uint32),
                             zero + seed_hi.to(tl.uint32))
    r = _radius(tl.join(x0, x2))          # [B, 2]: pair A, pair B
    c, s = _angle(tl.join(x1, x3))
    z = tl.join(r * c, r * s).reshape(BLOCK4, 4)  # [B, pair, cos|sin] -> lanes
    lane = tl.arange(0, 4)[None, :]
    offs = blk[:, None] * 4 + lane
    msk = offs < n
    th = tl.load(ptr + offs, mask=msk).to(tl.float32)
    tl.store(ptr + offs, _rne_bf16(th + eps * z), mask=msk)
