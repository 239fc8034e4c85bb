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
def _philox(c0, c1, c2, c3, k0, k1, ROUNDS: tl.constexpr = 10):
    """Philox4x32 with ROUNDS rounds (10: Random123's, the spec's; fewer only in bench_transform_ablation.py)."""
    c0 = c0.to(tl.uint32, bitcast=True)
    c1 = c1.to(tl.uint32, bitcast=True)
    c2 = c2.to(tl.uint32, bitcast=True)
    c3 = c3.to(tl.uint32, bitcast=True)
    k0 = k0.to(tl.uint32, bitcast=True)
    k1 = k1.to(tl.uint32, bitcast=True)
    A: tl.constexpr = 0xD2511F53
    B: tl.constexpr = 0xCD9E8D57
    for _ in tl.static_range(ROUNDS):
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
    return tl.sqrt_rn(q)


@triton.jit
def _angle(w):
    q = (w >> 10) & 3
    x = (2 * (w & 0x3FF).to(tl.int32) - 1023).to(tl.float32) * 7.669903939428206e-04
    s2 = x * x
    sn = ((0.00815201923251152 * s2 + -0.1666249930858612) * s2 + 0.9999985694885254) * x
    cs = ((-0.001366178970783949 * s2 + 0.04166144132614136) * s2 + -0.4999998211860657) * s2 + 1.0
    swap = (q & 1) == 1
    c = tl.where(swap, sn, cs)
    s = tl.where(swap, cs, sn)
    c = tl.where((q == 1) | (q == 2), -c, c)
    s = tl.where(q >= 2, -s, s)
    return c, s


@triton.jit
def _rne_bf16(x):
    b = x.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _gauss8(blk, seed_lo, seed_hi, tid):
    """Normals of elements 8*blk .. 8*blk+7 as [B, 8]."""
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    x0, x1, x2, x3 = _philox(c0, c1, zero + tid.to(tl.uint32), zero, zero + seed_lo.to(tl.uint32),
                             zero + seed_hi.to(tl.uint32))
    w = tl.join(tl.join(x0, x2), tl.join(x1, x3))        # [B, 2, 2] -> words in order x0, x1, x2, x3
    r = _radius(w)
    c, s = _angle(w)
    z = tl.join(r * c, r * s)                            # [B, 2, 2, 2]: element 2*word + (0: cos, 1: sin)
    return z.reshape(blk.shape[0], 8)


@triton.jit
def gauss_perturb_kernel(ptr, n, seed_lo, seed_hi, tid, eps, BLOCK8: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCK8 + tl.arange(0, BLOCK8)
    z = _gauss8(blk, seed_lo, seed_hi, tid)
    offs = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
    msk = offs < n
    th = tl.load(ptr + offs, mask=msk).to(tl.float32)
    tl.store(ptr + offs, _rne_bf16(th + eps * z), mask=msk)


@triton.jit
def gauss_perturb_kernel_nomask(ptr, n, seed_lo, seed_hi, tid, eps, BLOCK8: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCK8 + tl.arange(0, BLOCK8)
    z = _gauss8(blk, seed_lo, seed_hi, tid)
    offs = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
    th = tl.load(ptr + offs).to(tl.float32)
    tl.store(ptr + offs, _rne_bf16(th + eps * z))


@triton.jit
def noise_kernel(out, n, seed_lo, seed_hi, tid, BLOCK8: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCK8 + tl.arange(0, BLOCK8)
    z = _gauss8(blk, seed_lo, seed_hi, tid)
    offs = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
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
    noise_kernel[(triton.cdiv(n, 8 * 128),)](out, n, seed & 0xFFFFFFFF, seed >> 32, 7, BLOCK8=128,
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
    for B, nw in ((512, 4), (512, 8), (1024, 8), (1024, 16)):
        ms = bench(lambda: gauss_perturb_kernel[(triton.cdiv(n, 8 * B),)](w, n, seed & 0xFFFFFFFF, seed >> 32, 3,
                                                                        1e-3, BLOCK8=B, num_warps=nw,
                                                                        enable_fp_fusion=False))
        res[f"gauss_B{B}_w{nw}_ms"] = ms
        ms = bench(lambda: gauss_perturb_kernel_nomask[(n // (8 * B),)](w, n, seed & 0xFFFFFFFF, seed >> 32, 3,
                                                                      1e-3, BLOCK8=B, num_warps=nw,
                                                                      enable_fp_fusion=False))
        res[f"gauss_nomask_B{B}_w{nw}_ms"] = ms
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
    try:
        cuda_plain(res, n, w, dst)
    except Exception as exc:  # the Triton figures above still stand
        res["cuda_error"] = repr(exc)[:500]
    g = min(v for k, v in res.items() if k.startswith("gauss_") and k.endswith("_ms"))
    r = min(v for k, v in res.items() if k.startswith("rademacher_B"))
    res["gauss_fraction_of_floor"] = copy_ms / g
    res["rademacher_fraction_of_floor"] = copy_ms / r
    print(json.dumps(res, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "transform_v1.json"), "w") as f:
        json.dump(res, f, indent=1)




def cuda_plain(res, n, w, dst):
    import plain_cuda_transform as P
    m = P.build()
    seed = 2 ** 64 - 5
    nn = 4096 + 13
    out = torch.full((nn,), float("nan"), device="cuda")
    m.run_noise(out, seed - 2 ** 64, 7)
    res["cuda_bits_equal_reference"] = bool(torch.equal(out.cpu().view(torch.int32),
                                                        R.gaussian(seed, 7, torch.arange(nn)).view(torch.int32)))
    small = (torch.randn(8192, device="cuda") * 0.02).bfloat16()
    ref = R.to_storage(small.float().cpu() + R._f32(1e-3) * R.gaussian(11, 3, torch.arange(8192)), torch.bfloat16)
    m.run_perturb(small, 11, 3, 1e-3)
    res["cuda_perturb_bits_equal_reference"] = bool(torch.equal(small.cpu().view(torch.int16), ref.view(torch.int16)))
    res["cuda_gauss_ms"] = bench(lambda: m.run_perturb(w, 1234567, 3, 1e-3))
    res["cuda_gauss_fraction_of_floor"] = res["copy_ms"] / res["cuda_gauss_ms"]


if __name__ == "__main__":
    main()
