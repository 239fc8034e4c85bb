"""Offline SASS counts (sm_90, no GPU) of Gaussian transforms a noise spec v2 could use, each inside the same plain
bf16 perturb kernel (load, z, x + s*z, round to nearest even, store; 4096 elements per program, 4 warps):

  v1          the spec v1 Box-Muller of mazo_kernels.triton_kernels (exact ops, no FMA)
  v1-bits     v1 with the quadrant signs applied by xor of the sign bit and NaN found by x != x (same bits)
  v1-half     the v1 polynomials evaluated in float16 (Triton emits HADD2/HMUL2/HFMA2 for them)
  icdf        an inverse-CDF candidate: 16 bits per normal (sign + 15-bit cell), 32 segments (exponent and first
              mantissa bit of the odd integer 2k+1), a cubic per segment from a 4 x 32-entry table in global memory
  icdf-fma    the same with tl.fma
  icdf-vec    the same, the 4 coefficients gathered as one [.., 4] load
  rademacher  128 signs per Philox call (no transform): the pass without a Gaussian transform

    python bench/sass_transform_candidates.py

Instruction counts only (the values of the candidates are not checked here; they are not a spec). The H200 issues
~31.5 lane-instructions per element at its copy floor (bench/sass_count.py), so a Gaussian pass needs roughly that
count to reach the floor.
"""
from __future__ import annotations

import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mazo_kernels import triton_kernels as tk  # noqa: E402
import sass_count as sc  # noqa: E402


@triton.jit
def _angle_bits(w):
    x = (2 * (w & 0x3FF).to(tl.int32) - 1023).to(tl.float32) * 0.0007669904152862728
    s2 = x * x
    sin_x = ((0.00815201923251152 * s2 + -0.1666249930858612) * s2 + 0.9999985694885254) * x
    cos_x = ((-0.001366178970783949 * s2 + 0.04166144132614136) * s2 + -0.4999998211860657) * s2 + 1.0
    swap = (w & 0x400) != 0
    c = tl.where(swap, sin_x, cos_x)
    s = tl.where(swap, cos_x, sin_x)
    c = (c.to(tl.uint32, bitcast=True) ^ (((w << 21) ^ (w << 20)) & 0x80000000)).to(tl.float32, bitcast=True)
    s = (s.to(tl.uint32, bitcast=True) ^ ((w << 20) & 0x80000000)).to(tl.float32, bitcast=True)
    return c, s


@triton.jit
def _radius_half(w):
    k = ((w >> 12) + 1).to(tl.int32).to(tl.float32)
    bits = k.to(tl.int32, bitcast=True)
    e = (bits - 0x3F3504F3) >> 23
    m = (bits - (e << 23)).to(tl.float32, bitcast=True)
    t = (m - 1.0).to(tl.float16)
    p = t * 0.2932 + -0.4434
    p = p * t + 0.5073
    p = p * t + -0.665
    p = p * t + 1.0
    p = p * t + -2.0
    q = (20 - e).to(tl.float16) * 1.386 + t * p
    return tl.sqrt_rn(q.to(tl.float32)).to(tl.float16)


@triton.jit
def _angle_half(w):
    q = (w >> 10) & 3
    x = (2 * (w & 0x3FF).to(tl.int32) - 1023).to(tl.float16) * 0.000767
    s2 = x * x
    sin_x = ((0.00815 * s2 + -0.16663) * s2 + 1.0) * x
    cos_x = ((-0.001366 * s2 + 0.04166) * s2 + -0.5) * s2 + 1.0
    swap = (q & 1) == 1
    c = tl.where(swap, sin_x, cos_x)
    s = tl.where(swap, cos_x, sin_x)
    c = tl.where((q == 1) | (q == 2), -c, c)
    s = tl.where(q >= 2, -s, s)
    return c, s


@triton.jit
def _icdf8(row0, tid, k0, k1, tab_ptr, R: tl.constexpr, FMA: tl.constexpr, VEC: tl.constexpr):
    w = tk._words8(row0, tid, 3, k0, k1, R)
    h = tl.reshape(tl.join(w & 0xFFFF, w >> 16), [R, 8])
    x = ((h & 0x7FFF) * 2 + 1).to(tl.int32).to(tl.float32)
    xb = x.to(tl.int32, bitcast=True)
    idx = (xb >> 22) - 254
    t = ((xb & 0x3FFFFF) | 0x3F800000).to(tl.float32, bitcast=True) - 1.25
    if VEC:
        c = tl.reshape(tl.load(tab_ptr + idx[:, :, None] * 4 + tl.arange(0, 4)[None, None, :]), [R, 8, 2, 2])
        ca, cb = tl.split(c)
        c0, c1 = tl.split(ca)
        c2, c3 = tl.split(cb)
    else:
        c0 = tl.load(tab_ptr + idx)
        c1 = tl.load(tab_ptr + 32 + idx)
        c2 = tl.load(tab_ptr + 64 + idx)
        c3 = tl.load(tab_ptr + 96 + idx)
    if FMA:
        v = tl.fma(tl.fma(tl.fma(c3, t, c2), t, c1), t, c0)
    else:
        v = ((c3 * t + c2) * t + c1) * t + c0
    return (v.to(tl.uint32, bitcast=True) ^ ((h & 0x8000) << 16)).to(tl.float32, bitcast=True)


@triton.jit
def _plain(in_ptr, out_ptr, tab_ptr, k0, k1, tid, s, KIND: tl.constexpr, BLOCK: tl.constexpr):
    R: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, R)[:, None] * 8 + tl.arange(0, 8)[None, :]
    base = pid * BLOCK
    raw = tl.load(in_ptr + base + offs)
    x = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    row0 = base >> 3
    if KIND == 0:
        z = tk._gauss8(row0, tid, k0, k1, R)
    elif KIND == 1:
        w = tk._words8(row0, tid, 0, k0, k1, R)
        c, sn = _angle_bits(w)
        r = tk._radius(w)
        z = tl.reshape(tl.join(r * c, r * sn), [R, 8])
    elif KIND == 2:
        w = tk._words8(row0, tid, 0, k0, k1, R)
        r = _radius_half(w)
        c, sn = _angle_half(w)
        z = tl.reshape(tl.join(r * c, r * sn), [R, 8]).to(tl.float32)
    elif KIND == 3:
        z = _icdf8(row0, tid, k0, k1, tab_ptr, R, False, False)
    elif KIND == 4:
        z = _icdf8(row0, tid, k0, k1, tab_ptr, R, True, False)
    elif KIND == 5:
        z = _icdf8(row0, tid, k0, k1, tab_ptr, R, False, True)
    else:
        z = tl.reshape(tk._rad_rows(base >> 7, tid, k0, k1, BLOCK), [R, 8])
    y = x + s * z
    if KIND == 1:
        b = y.to(tl.uint32, bitcast=True)
        rr = tl.where(y != y, 0x7FC0, (b + 0x7FFF + ((b >> 16) & 1)) >> 16)
        tl.store(out_ptr + base + offs, rr.to(tl.uint16))
    else:
        tl.store(out_ptr + base + offs, tk._rne(y, 2))


KINDS = {"v1": 0, "v1-bits": 1, "v1-half": 2, "icdf": 3, "icdf-fma": 4, "icdf-vec": 5, "rademacher": 6}


def icdf_fit_errors():
    """Accuracy of the icdf candidate's shape: |z| = Phi^-1(1 - p/2) at the 2^15 cell midpoints p = (2k+1) / 2^16,
    one least-squares polynomial per segment (exponent of 2k+1, optionally split by its first mantissa bit).
    Returns {(segments, degree): max abs error}, and the largest |z| (the tail cut)."""
    from statistics import NormalDist

    import numpy as np
    xs = np.arange(1, 65536, 2)
    z = np.array([NormalDist().inv_cdf(1 - p / 2) for p in xs / 65536.0])
    e = np.floor(np.log2(xs)).astype(int)
    m = xs / 2.0 ** e
    out = {}
    for split in (1, 2):
        for deg in (2, 3, 4):
            worst = 0.0
            for ee in range(16):
                for h in range(split):
                    sel = (e == ee) & (m >= 1 + h / split) & (m < 1 + (h + 1) / split)
                    if not sel.any():
                        continue
                    t = m[sel] - (1 + (h + 0.5) / split)
                    a = np.vander(t, min(deg, int(sel.sum()) - 1) + 1, increasing=True)
                    co = np.linalg.lstsq(a, z[sel], rcond=None)[0]
                    worst = max(worst, float(np.abs(a @ co - z[sel]).max()))
            out[(16 * split, deg)] = worst
    return out, float(z.max())


def main():
    errs, zmax = icdf_fit_errors()
    print("icdf candidate, max |error| of the segment polynomials at the cell midpoints: " +
          ", ".join(f"{s} segments deg {d}: {v:.1e}" for (s, d), v in errs.items()) + f"; largest |z| {zmax:.3f}")
    sig = {"in_ptr": "*u16", "out_ptr": "*u16", "tab_ptr": "*fp32", "k0": "u32", "k1": "u32", "tid": "u32",
           "s": "fp32", "KIND": "constexpr", "BLOCK": "constexpr"}
    for name, kind in KINDS.items():
        src = triton.compiler.ASTSource(fn=_plain, signature=sig, constexprs={"KIND": kind, "BLOCK": 4096})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
        st = sc.sass_stats(k.asm["cubin"])
        print(f"{name:11s} {st['instructions'] / 32:6.1f} instr/elem  {st['registers']:3d} registers  "
              f"{st['top_opcodes']}", flush=True)


if __name__ == "__main__":
    main()
