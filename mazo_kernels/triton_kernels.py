"""Triton backend of zo_apply_ (noise spec v1): one launch per call for any number of same-dtype tensors.

Bit-exact with mazo_kernels.reference: every float operation is one IEEE-rounded binary32 op in the reference's
order (launched with enable_fp_fusion=False, sqrt via tl.sqrt_rn, no division), bf16 rounding with integer ops on
the float32 bits, Philox words kept as tl.uint32.

Layout: a per-tensor table (addresses of data/out/mask, sizes) and a per-program table (tensor, first unit) live on
the tensors' device. A program owns BLOCK consecutive local elements (or, for sparse row-index masks run as entry
units, BLOCK consecutive mask entries; _rowidx_elements). When the shard's global offset is aligned to the
generator's call size, Philox runs once per call (8 Gaussians / 128 signs / 8 rounding-bit pairs) and the results
are spread with join + reshape; otherwise (and for row-index entries) every element computes its own call.
"""
from __future__ import annotations

import operator
import os
from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl

from . import reference as ref

def _auto_knob(var: str):
    """A policy knob read at import: "auto" (the default, the measured policy), "1" (True) or "0" (False)."""
    val = {"auto": "auto", "1": True, "0": False}.get(os.environ.get(var, "auto"))
    if val is None:
        raise ValueError(f"{var} must be auto, 1 or 0, got {os.environ[var]!r}")
    return val


def _auto_or_count(var: str):
    """A register-cap setting: "auto" (the default: the measured table) or a register count (0: none)."""
    text = os.environ.get(var, "auto")
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{var} must be auto or a register count (0: none), got {text!r}") from None


BLOCK = 1024          # elements (or mask entries) per program; power of two, >= 128. Tests vary it.
NUM_WARPS = 4
FAST = True          # dense aligned blocks of unmasked tensors take the [FAST_BLOCK // 8, 8] fast path
FAST_BLOCK = 4096    # elements per program of the fast kernel (the plain kernel's BLOCK8=512); power of two
FAST_NUM_WARPS = 4
# Warps of the fast kernel for masked gaussian_fast perturb_ with prior 0 (evaluates and latches a threshold, or
# reads packed bits): at 4 warps it compiles to 124 registers (16 warps per SM, latency-bound), at 8 to 76 for 6%
# more instructions per element. On an H200 over 7B bf16 (bench/results/h200_2026-12-02/s12/call4, one process):
# threshold 14.67 -> 12.99 ms, packed bits 18.00 -> 12.72. The same change made Rademacher's perturb_ (11.97 ->
# 15.05 threshold) and every update_ with prior 0 (2-15%) slower, so those and the restoring passes stay at 4.
MASKED_NUM_WARPS = 8
# Masked Rademacher in the fast kernel: the signs made in the mask's [BLOCK // 8, 8] row layout, one Philox call per
# row of 8 (_rad8), instead of one call per 128 elements exchanged into that layout through shared memory (the
# exchange's barriers). Same bits. "auto" where that was measured faster on an H200 over 7B bf16 (one process,
# bench/results/h200_2026-12-03/s19/call5): perturb_ with prior 0 (threshold 20.27 -> 13.01 ms, packed bits 22.87 ->
# 12.48, at MASKED_NUM_WARPS_RAD warps; CUDA 14.02 / 17.10) and update_ with a prior on calls with row-index
# element units (59.42 -> 47.11); not the restoring perturb_ (12.08 -> 13.38) nor threshold / packed-bit update_
# (+0-3%).
# True: every masked Rademacher call; False: none.
RAD_ROWS8 = _auto_knob("MAZO_TRITON_RAD_ROWS8")
# Warps of the fast kernel for the masked Rademacher perturb_ with prior 0 when it makes the signs by _rad8 (4: 13.80
# / 13.79 ms against 8: 13.01 / 12.48, threshold / packed bits, s19/call5); without _rad8 it runs FAST_NUM_WARPS (8
# was slower there: 11.97 -> 15.05 ms threshold, bench/NOTES.md session 12).
MASKED_NUM_WARPS_RAD = 8
# Register cap (ptxas maxnreg) of the fast kernel for op 3 (update then perturb), 0: none. Uncapped it holds 96
# registers (20 warps per SM) where CUDA's fused kernel holds 64 (32 warps) and runs 1.14x faster; offline
# (bench/sass_count.py) 80 spills 96 bytes for +3% instructions, 64 spills 248 bytes for +7.5%. On an H200 (7B bf16,
# bench/results/h200_2026-12-03/s19/call3) 80 was slower with gaussian_fast (24.14 -> 25.18 ms) and 1.3% faster
# with Rademacher, so the default stays uncapped (bench/NOTES.md, session 19). Session 23 (s23/call1, one process):
# 64 / 72 / 80 against uncapped, gaussian_fast bf16 26.61 / 25.63 / 25.14 against 24.13 ms, fp16 30.38 / 29.54 /
# 29.87 against 30.08, fp32 27.50 / 22.17 / 20.73 against 20.42; Rademacher within 3% or slower: still uncapped.
FUSED_MAXNREG = int(os.environ.get("MAZO_TRITON_FUSED_MAXNREG", "0"))
# Register cap (ptxas maxnreg) of the fast kernel for masked perturb_ with prior 0 (the latch-writing / packed-bit
# light pass): "auto" (the default, _LIGHT_MAXNREG), or N for every such call (0: none). Uncapped, the v1 Gaussian
# pass holds 128 registers at 4 warps (16 warps per SM, latency-bound) and ran 1.18-1.27x CUDA's time; capped, ptxas
# spills a little (80: 136 bytes, +6.5% instructions, 24 warps per SM; bench/sass_count.py). Same bits either way.
# Measured on an H200 over 7B, bench/results/h200_2026-12-03/s22/call4 (both backends, one process) and call5
# (Triton, one process), ms uncapped -> capped, threshold / packed bits (CUDA in call 4 or the same session's matrix):
#   v1 Gaussian bf16 20.68 / 21.74 -> 16.60 / 15.95 at 80 (16.26 / 17.08); fp16 19.20 / 19.47 -> 15.54 / 14.57 at 80
#   (15.54 / 15.67); fp32 21.44 / 21.23 -> 17.68 / 17.90 at 96 (18.11 / 17.95; 80: 20.32 / 20.91); bf16 row-index
#   element units 55.10 -> 35.62 at 80 (96: 39.80);
#   float32 gaussian_fast 15.03 / 15.75 -> 13.23 / 14.18 at 80; float32 Rademacher 14.46 / 16.73 -> 12.04 / 15.53 at 96.
# Slower capped, so uncapped: 16-bit gaussian_fast and Rademacher (8 warps there; 12.89 -> 13.63-19.08). No effect:
# float32 row-index (46.6, 38.3, 39.6 at every cap), left uncapped.
MASKED_LIGHT_MAXNREG = _auto_or_count("MAZO_TRITON_MASKED_LIGHT_MAXNREG")
# Register cap of the fast kernel on calls with row-index element units, every pass not capped by
# MASKED_LIGHT_MAXNREG: "auto" (the default, _ROWIDX_MAXNREG), or N for every such call (0: none). Why it helps: the
# units' search of their rows is a chain of dependent gathers, latency-bound, and uncapped the passes hold 93-235
# registers (`python bench/sass_count.py --cases rowidx`, sm_90, bf16; v1 update_ 173: 8 warps per SM); at 80 they
# spill 56-824 bytes for +3-15% instructions (op 3 the most). Measured on an H200 over 7B (Triton, one process,
# bench/results/h200_2026-12-03/s23/call1/matrix_s23_rowidx_caps.json), ms uncapped -> the table's cap, bf16 / fp16:
#   update_ with prior 0 (update0) 58.04 / 62.93 -> 39.85 / 45.94 (v1), 52.02 / 45.95 -> 33.33 / 38.25 (gaussian_fast),
#   53.85 / 46.74 -> 40.52 / 36.39 (Rademacher), all at 80; perturbed_copy 67.78 / 67.38 -> 38.30 / 37.32 (v1, 96),
#   41.64 / 41.23 -> 31.41 / 31.13 (gaussian_fast, 96), 41.87 / 40.11 -> 38.37 / 37.35 (Rademacher, 80); perturb_prior
#   gaussian_fast 43.96 / 45.25 -> 35.72 / 36.15 (96), Rademacher 40.04 / 44.07 -> 38.63 / 39.60 (80); update_ v1
#   52.48 / 62.17 -> 47.00 / 56.78 (96). bf16 only (fp16 slower capped): update_ gaussian_fast 45.21 -> 39.98,
#   Rademacher 47.07 -> 37.88 (96). Uncapped where no cap was faster: perturb_ gaussian_fast, perturb_prior v1;
# float32 unmeasured. Masked op 3 runs as update_ then perturb_ (FUSE_MASKED off), each under its own cap; the fused
# masked kernel (FUSE_MASKED=1) was not measured capped and has none here.
ROWIDX_MAXNREG = _auto_or_count("MAZO_TRITON_ROWIDX_MAXNREG")
# Register cap of the fast kernel for masked perturbed_copy on threshold / packed-bit calls: "auto" (the default,
# _COPY_MAXNREG: float32 at FP32_MASKED_TUNED's warps), or N for every masked copy (0: none). Uncapped, the float32
# v1 Gaussian [2, R, 4] form holds 94 registers at 8 warps (16 warps per SM; bench/sass_count.py --cases fp32-tiles)
# and ran ~57% of the floor against an issue-bound estimate of ~81%: latency-bound, as the light pass was. Measured on
# an H200 over 7B (both backends, one process, bench/results/h200_2026-12-03/s23/call1/matrix_s23_fp32_masked.json),
# ms threshold / packed bits, uncapped -> capped (CUDA): v1 22.88 / 24.66 -> 16.92 / 17.57 at 64 (17.40 / 15.01; 80:
# 18.64 / 19.77, 96: 23.91 / 25.40); gaussian_fast 13.59 / 13.70 -> 13.10 / 13.23 at 80 (15.12 / 14.95); Rademacher
# 13.89 / 14.00 -> 13.03 / 13.20 at 64 (14.48 / 14.68). 16-bit masked copies unmeasured, left uncapped.
MASKED_COPY_MAXNREG = _auto_or_count("MAZO_TRITON_MASKED_COPY_MAXNREG")
# Op 3 on masked calls fused too (the next selection in the same pass: a threshold's on the updated values, latched)
# instead of the two ops. Off by default: offline (bench/sass_count.py, sm_90) the fused masked fast kernel compiles
# to 111 instructions per element at 185 registers (8 warps per SM) against the masked update's 64 at 121 and a
# masked perturb_'s ~30, so it is not expected to be faster; a knob for the measurement (bench/NOTES.md, session 18).
# Same bits either way (python_tests/test_triton_backend.py runs both).
FUSE_MASKED = os.environ.get("MAZO_TRITON_FUSE_MASKED", "0") == "1"
# Masked float32 in the fast kernel as a [2, BLOCK // 8, 4] tile (a row of 8 elements and its mask byte in one
# thread) instead of [BLOCK // 8, 8], which splits a row of 8 float32 between two threads: offline (bench/sass_count.py,
# sm_90) that split costs a shared-memory exchange of the rows' noise words and mask bytes with its barriers (6-22
# BAR per block; none in the [2, R, 4] tile). In that tile Rademacher signs are always made by _rad8 (16x the Philox
# work), so "auto" (_row_thread_choice) keeps Rademacher on it only where _rad8 paid: on an H200 over 7B fp32 masks
# (bench/results/h200_2026-12-03/s20/call1, one process) gaussian_fast passes took 0.79-1.06x the [R, 8] tile's time,
# Rademacher perturb_ with prior 0 0.78-0.81x and op 3 0.86-0.96x, perturb_prior and perturbed_copy 1.10-1.24x.
# 1: every masked float32 call; 0: none. Same bits either way (python_tests/test_triton_backend.py runs both).
FP32_ROW_THREAD = _auto_knob("MAZO_TRITON_FP32_ROW_THREAD")
# Masked float32 in the fast kernel: its own warps and Rademacher form ("auto", _fast_warps / _rad8_choice). The
# warps above were chosen on bf16; on an H200 over 7B fp32 threshold / packed-bit masks (bench/results/
# h200_2026-12-03/s21/call2, one process per comparison) 4 warps ran the latch-writing gaussian_fast perturb_ in
# 14.49 / 15.74 ms against 8 warps' 22.11 / 26.45 (call 3, both backends: 14.82 / 15.74, CUDA 15.33 / 16.38), 8
# warps the restoring gaussian_fast perturb_prior in 13.51 / 16.13 against 15.86 / 19.03 and the v1 Gaussian
# perturbed_copy in 22.89 / 24.69 against 32.37 / 32.40, and Rademacher's perturb_ with prior 0 took 16.59 / 16.74 ms with its signs exchanged into the
# [R, 8] tile (no _rad8, 4 warps) against 25.90 / 21.45 by _rad8 in the [2, R, 4] tile at 8 warps. False: session
# 20's choices (MASKED_NUM_WARPS / MASKED_NUM_WARPS_RAD and _rad8 as for bf16). Same bits either way.
FP32_MASKED_TUNED = _auto_knob("MAZO_TRITON_FP32_MASKED_TUNED")
# (op, prior != 0, noise) of the masked float32 fast calls that run 8 warps under FP32_MASKED_TUNED (others:
# FAST_NUM_WARPS). update_ with a prior joined after s21/call3 (8 warps against 4, one process: gaussian_fast
# 19.16 / 24.21 -> 14.78 / 16.82 ms, v1 Gaussian 22.64 / 23.82 -> 20.28 / 23.45; Rademacher slower, 16.58 -> 20.70).
_FP32_MASKED_8_WARPS = {(ref.OP_PERTURB, True, ref.DIST_GAUSSIAN_FAST), (ref.OP_COPY, False, ref.DIST_GAUSSIAN),
                        (ref.OP_UPDATE, True, ref.DIST_GAUSSIAN_FAST), (ref.OP_UPDATE, True, ref.DIST_GAUSSIAN)}
SPLIT = True         # the host splits the work: full FBLOCK blocks of unmasked tensors -> fast kernel, the rest ->
                     # general kernel (a dense call is one launch); False: the fast kernel + a general kernel that
                     # skips the fast blocks on the device (two launches, one general program per BLOCK)
MASKED_FAST = True   # threshold, packed-bit and row-index (element units) masks take the fast path too (False: only
                     # unmasked tensors do)
# Row-index masks as element units (every element visited, each unit's selection by a binary search of its row;
# _rowidx_elements) rather than entry units (only the listed elements, each computing its own Philox call): "auto"
# where that was measured faster (_rowidx_element_policy), True always, False never.
ROWIDX_ELEMENTS = "auto"
# Row-index element units in the fast kernel: compute every element of the block and store the listed ones through a
# window of the table's entries (_rowidx_scatter: one scalar search per block) instead of each unit of 8 searching
# its row for its selection byte (_rowidx_bytes: ~log2(k) dependent gathers per unit). Same bits (125M: 18 checks
# equal). On an H200 over 7B bf16, one process (bench/results/h200_2026-12-03/s24/call1), ms search -> scatter
# (CUDA): update_ v1 47.04 -> 28.53 (40.89), update0 v1 39.90 -> 22.33 (31.63), perturb_prior Rademacher 38.70 ->
# 16.60 (26.33), copy v1 38.37 -> 25.40 (23.88). MAZO_TRITON_ROWIDX_SCATTER=0 at import gives the search back.
ROWIDX_SCATTER = os.environ.get("MAZO_TRITON_ROWIDX_SCATTER", "1") != "0"
# The scatter form's search for a block's first entry (blocks that start inside a row: 7B's down projection, rows of
# 11008): a scalar binary search (0, the default: ~log2 of the bound's width in dependent loads, 13 there), or rounds
# of ROWIDX_PROBES (a power of two) table entries loaded at once (2 dependent loads for rows up to P^2 entries). Same
# entry, same bits (125M, 108 checks). The probes did not pay on an H200 (bench/results/h200_2026-12-03/s25/call1,
# 7B bf16, one process: 2-4% slower, v1 perturb_prior 23.28 -> 31.01 ms with its registers 134 -> 195): the search's
# latency was hidden by the other resident blocks. MAZO_TRITON_ROWIDX_PROBES at import; a constexpr.
ROWIDX_PROBES = int(os.environ.get("MAZO_TRITON_ROWIDX_PROBES", "0"))
# ... and where: just before the scatter (the default, session 24's place) or, with 0, right after the block's load,
# before its noise (MAZO_TRITON_ROWIDX_FIRST_LATE=0; measured no faster in the same run). A constexpr.
ROWIDX_FIRST_LATE = os.environ.get("MAZO_TRITON_ROWIDX_FIRST_LATE", "1") != "0"
CHUNK = 1            # FBLOCK blocks per fast program (SPLIT)
GUARD = 16           # FBLOCK blocks per guard program of the general kernel (SPLIT)
# bf16 nearest-even by the hardware conversion (cvt.rn.bf16x2.f32, IEEE nearest-even; its NaN replaced by the spec's
# 0x7FC0) instead of integer operations on the float32 bits: the same bits for all 2^32 inputs (checked on an H200,
# bench/check_bf16_cvt.py; bench/results/h200_2026-12-01/s8_hw_bf16/), 4-12% faster bf16 passes there. Compiled
# kernels only: the interpreter's cast truncates. MAZO_TRITON_HW_BF16=0 at import gives the integer rounding back;
# a constexpr, so it is fixed per process.
HW_BF16 = tl.constexpr(os.environ.get("MAZO_TRITON_HW_BF16", "1") != "0"
                       and os.environ.get("TRITON_INTERPRET", "0") != "1")
# bf16 restore and stochastic rounding as csrc/zo_cuda_kernel.cuh does them (invert8, sr8): two values per
# instruction where PTX has a packed form (cvt.rn.bf16x2.f32, prmt), in tl.inline_asm_elementwise with pack=2.
# The same bits as the tl forms (every op is the same IEEE operation); compiled kernels only (the interpreter runs
# no PTX). 2: the restore and the rounding; 1: the restore only; 0: neither (the tl forms). A knob read per call
# (MAZO_TRITON_ASM at import), passed to the kernel as a constexpr (bf16 with HW_BF16 only).
ASM = int(os.environ.get("MAZO_TRITON_ASM", "2"))
_NTAB = 8             # int64 columns of the per-tensor table
_TABLE_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE_SIZE = 256   # a 30B LLaMA's transient mode uses ~65 block tables per forward
_TABLE_OUTS: dict = {}    # key -> the output addresses the cached table holds (out-of-place calls)


def _cache_put(key, hit, outs_ptrs):
    _TABLE_CACHE[key] = hit
    if outs_ptrs is not None:
        _TABLE_OUTS[key] = outs_ptrs
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        old, _ = _TABLE_CACHE.popitem(last=False)
        _TABLE_OUTS.pop(old, None)



# ------------------------------------------------------------------------------------------------ generator
@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Random123 Philox4x32-10 on tl.uint32 words (scalars broadcast)."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _words(blk, tid, STREAM: tl.constexpr, k0, k1):
    """Philox call number blk (int64 >= 0) of (tid, STREAM) under key (k0, k1)."""
    c0 = blk.to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + tid
    c3 = tl.zeros_like(c0) + STREAM
    return _philox(c0, c1, c2, c3, k0, k1)


@triton.jit
def _select4(sel, x0, x1, x2, x3):
    return tl.where(sel == 0, x0, tl.where(sel == 1, x1, tl.where(sel == 2, x2, x3)))


@triton.jit
def _stack4(x0, x1, x2, x3, R: tl.constexpr):
    """[R] x 4 -> [R, 4] with column j = xj."""
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), [R, 4])


# ------------------------------------------------------------------------------------------------ Box-Muller
@triton.jit
def _radius(w):
    k = ((w >> 12) + 1).to(tl.int32).to(tl.float32)
    bits = k.to(tl.int32, bitcast=True)
    e = (bits - 0x3F3504F3) >> 23
    m = (bits - (e << 23)).to(tl.float32, bitcast=True)
    t = m - 1.0
    p = 0.29324913024902344 * t + -0.44337525963783264     # LOG_P2 = -2 * LOG_P, Horner from the top
    p = p * t + 0.5071830153465271
    p = p * t + -0.6649653911590576
    p = p * t + 0.9998281002044678
    p = p * t + -2.0000109672546387
    q = (20 - e).to(tl.float32) * 1.3862943649291992 + t * p
    return tl.sqrt_rn(q)


@triton.jit
def _angle(w):
    q = (w >> 10) & 3
    x = (2 * (w & 0x3FF).to(tl.int32) - 1023).to(tl.float32) * 0.0007669904152862728   # float32(ANGLE_STEP)
    s2 = x * x
    sin_x = ((0.00815201923251152 * s2 + -0.1666249930858612) * s2 + 0.9999985694885254) * x
    cos_x = ((-0.001366178970783949 * s2 + 0.04166144132614136) * s2 + -0.4999998211860657) * s2 + 1.0
    swap = (q & 1) == 1
    c = tl.where(swap, sin_x, cos_x)
    s = tl.where(swap, cos_x, sin_x)
    c = tl.where((q == 1) | (q == 2), -c, c)
    s = tl.where(q >= 2, -s, s)
    return c, s


# ------------------------------------------------------------------------------------------------ noise tiles
@triton.jit
def _gauss_elem(g, tid, k0, k1):
    x0, x1, x2, x3 = _words(g >> 3, tid, 0, k0, k1)
    w = _select4((g >> 1) & 3, x0, x1, x2, x3)
    r = _radius(w)
    c, s = _angle(w)
    return r * tl.where((g & 1) == 0, c, s)


@triton.jit
def _gauss_rows(row0, tid, k0, k1, BLOCK: tl.constexpr):
    R: tl.constexpr = BLOCK // 8
    blk = row0 + tl.arange(0, R).to(tl.int64)
    x0, x1, x2, x3 = _words(blk, tid, 0, k0, k1)
    w = _stack4(x0, x1, x2, x3, R)            # [R, 4]: pair word j of call row
    r = _radius(w)
    c, s = _angle(w)
    return tl.reshape(tl.join(r * c, r * s), [BLOCK])


@triton.jit
def _rad_elem(g, tid, k0, k1):
    x0, x1, x2, x3 = _words(g >> 7, tid, 1, k0, k1)
    w = _select4((g >> 5) & 3, x0, x1, x2, x3)
    bit = (w >> (g & 31).to(tl.uint32)) & 1
    return (1 - 2 * bit.to(tl.int32)).to(tl.float32)


@triton.jit
def _rad_rows(row0, tid, k0, k1, BLOCK: tl.constexpr):
    R: tl.constexpr = BLOCK // 128
    blk = row0 + tl.arange(0, R).to(tl.int64)
    x0, x1, x2, x3 = _words(blk, tid, 1, k0, k1)
    w = _stack4(x0, x1, x2, x3, R)            # [R, 4]
    sh = tl.arange(0, 32).to(tl.uint32)
    bit = (w[:, :, None] >> sh[None, None, :]) & 1
    z = (1 - 2 * bit.to(tl.int32)).to(tl.float32)
    return tl.reshape(z, [BLOCK])


@triton.jit
def _noise(g, gstart, contiguous, tid, k0, k1, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """z at global indices g ([BLOCK] int64). When contiguous, g == gstart + arange(BLOCK)."""
    if DIST == 0:
        if contiguous & ((gstart & 7) == 0):
            z = _gauss_rows(gstart >> 3, tid, k0, k1, BLOCK)
        else:
            z = _gauss_elem(g, tid, k0, k1)
    elif DIST == 2:
        if contiguous & ((gstart & 7) == 0):
            z = _gauss_fast(_halves_rows(gstart >> 3, tid, 3, k0, k1, BLOCK))
        else:
            z = _gauss_fast(_halves_elem(g, tid, 3, k0, k1))
    else:
        if contiguous & ((gstart & 127) == 0):
            z = _rad_rows(gstart >> 7, tid, k0, k1, BLOCK)
        else:
            z = _rad_elem(g, tid, k0, k1)
    return z


@triton.jit
def _halves_rows(row0, tid, STREAM: tl.constexpr, k0, k1, BLOCK: tl.constexpr):
    """16 bits per element: half (i & 1) (low first) of word (i >> 1) & 3 of call i >> 3 of STREAM."""
    R: tl.constexpr = BLOCK // 8
    blk = row0 + tl.arange(0, R).to(tl.int64)
    x0, x1, x2, x3 = _words(blk, tid, STREAM, k0, k1)
    w = _stack4(x0, x1, x2, x3, R)
    return tl.reshape(tl.join(w & 0xFFFF, w >> 16), [BLOCK])


@triton.jit
def _halves_elem(g, tid, STREAM: tl.constexpr, k0, k1):
    x0, x1, x2, x3 = _words(g >> 3, tid, STREAM, k0, k1)
    w = _select4((g >> 1) & 3, x0, x1, x2, x3)
    return (w >> ((g & 1) * 16).to(tl.uint32)) & 0xFFFF


@triton.jit
def _rbits_rows(row0, tid, k0, k1, BLOCK: tl.constexpr):
    return _halves_rows(row0, tid, 2, k0, k1, BLOCK)


@triton.jit
def _rbits_elem(g, tid, k0, k1):
    return _halves_elem(g, tid, 2, k0, k1)


# ------------------------------------------------------------------------------------------------ gaussian_fast (v2)
@triton.jit
def _gauss_fast(h):
    """z of the 16-bit value h: x = (h & 0xFF) + (h >> 8) - 255 from the float bits of 2^23 + byte sum (exact),
    z = x * ((P2 x^2 + P1) x^2 + P0) (reference.FAST_P)."""
    x = (0x4B000000 + (h & 0xFF) + ((h >> 8) & 0xFF)).to(tl.float32, bitcast=True) - 8388863.0
    t = x * x
    return x * ((1.7205431957628692e-12 * t + -5.1385477206622454e-08) * t + 0.009295222349464893)


@triton.jit
def _rbits(g, gstart, contiguous, tid, k0, k1, BLOCK: tl.constexpr):
    """16 stochastic-rounding bits per element (uint32): half (i & 1) of pair word (i >> 1) & 3, call i >> 3."""
    if contiguous & ((gstart & 7) == 0):
        rb = _rbits_rows(gstart >> 3, tid, k0, k1, BLOCK)
    else:
        rb = _rbits_elem(g, tid, k0, k1)
    return rb


# ------------------------------------------------------------------------------------------------ storage
@triton.jit
def _to_f32(raw, DT: tl.constexpr):
    if DT == 0:
        x = raw
    elif DT == 1:
        x = raw.to(tl.float32)
    else:
        x = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x


@triton.jit
def _is_nan_bits(b):
    return (b & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def _rne(x, DT: tl.constexpr):
    """float32 -> storage (raw) value, nearest-even."""
    if DT == 0:
        y = x
    elif DT == 1:
        y = x.to(tl.float16)
    elif HW_BF16:
        y = tl.where(x != x, 0x7FC0, x.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)).to(tl.uint16)
    else:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(_is_nan_bits(b), 0x7FC0, r & 0xFFFF)
        y = r.to(tl.uint16)
    return y


@triton.jit
def _raw_bits(raw, DT: tl.constexpr):
    """Storage value (as _rne returns it) -> its bit pattern, uint32."""
    if DT == 0:
        b = raw.to(tl.uint32, bitcast=True)
    elif DT == 1:
        b = raw.to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        b = raw.to(tl.uint32)
    return b


@triton.jit
def _bits_f32(b, DT: tl.constexpr):
    """Storage bit pattern (uint32) -> float32 value."""
    if DT == 0:
        v = b.to(tl.float32, bitcast=True)
    elif DT == 1:
        v = b.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        v = (b << 16).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _invert_rounding_bf16_hw(w, d, y, SMALL: tl.constexpr = False):
    """_invert_rounding for bf16 through the hardware conversion, in float32 bit patterns (low 16 bits zero).
    c0 = rne(y) is y's bf16 truncation t or the next value up in magnitude, so its neighbour on y's side is the other
    one: c1 = 2t + 1 ulp - c0 (modulo 2^32, sign included; for c0 = +-0 the smallest subnormal with y's sign). A NaN
    y gives some NaN c0 (not finite: returned as it is); every caller rounds the base again, which maps each NaN to
    the spec's 0x7FC0, so the conversion needs no NaN fix-up here."""
    yb = y.to(tl.uint32, bitcast=True)
    c0b = y.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    c1b = 2 * (yb & 0xFFFF0000) + 0x10000 - c0b
    c0 = c0b.to(tl.float32, bitcast=True)
    c1 = c1b.to(tl.float32, bitcast=True)
    wb = w.to(tl.uint32, bitcast=True)   # compared as float32 bit patterns: the half moved up, no mask
    ok0 = (c0 + d).to(tl.bfloat16).to(tl.float32).to(tl.uint32, bitcast=True) == wb
    ok1 = (c1 + d).to(tl.bfloat16).to(tl.float32).to(tl.uint32, bitcast=True) == wb
    if SMALL:
        take1 = (y != c0) & ok1 & ((ok0 == 0) | ((c1b & 0x10000) == 0))
    else:
        finite = (~c0b & 0x7F800000) != 0
        take1 = finite & (y != c0) & ok1 & ((ok0 == 0) | ((c1b & 0x10000) == 0))
    return tl.where(take1, c1, c0)


# invert8's pair body (csrc/zo_cuda_kernel.cuh) in PTX: $0/$1 the two bases (float32 bits), $2/$3 the stored values
# x (float32 bits), $4/$5 the shifts d, $6 the two stored bf16 values packed (low half first). y = x - d;
# c0 = rne(y) from one packed conversion; c1 = 2t + 1 ulp - c0 (t: y truncated); ok0 / ok1: rne(c + d) of both
# halves from one packed conversion each, compared with the stored halves by one xor; take c1 where
# [c0 finite] and y != c0 and ok1 and (not ok0 or c1 even).
_RESTORE_BF16_PTX = """{
.reg .b32 y0, y1, cy, a0, a1, b0, b1, s0, s1, r0, r1, e0, e1, t;
.reg .pred ok0, ok1, ev, ne, k0, k1;
sub.rn.f32 y0, $2, $4;
sub.rn.f32 y1, $3, $5;
cvt.rn.bf16x2.f32 cy, y1, y0;
shl.b32 a0, cy, 16;
and.b32 a1, cy, 0xFFFF0000;
and.b32 t, y0, 0xFFFF0000;
shl.b32 t, t, 1;
add.u32 t, t, 0x10000;
sub.u32 b0, t, a0;
and.b32 t, y1, 0xFFFF0000;
shl.b32 t, t, 1;
add.u32 t, t, 0x10000;
sub.u32 b1, t, a1;
add.rn.f32 s0, a0, $4;
add.rn.f32 s1, a1, $5;
cvt.rn.bf16x2.f32 r0, s1, s0;
add.rn.f32 s0, b0, $4;
add.rn.f32 s1, b1, $5;
cvt.rn.bf16x2.f32 r1, s1, s0;
xor.b32 e0, r0, $6;
xor.b32 e1, r1, $6;
and.b32 t, e0, 0xFFFF;
setp.eq.u32 ok0, t, 0;
and.b32 t, e1, 0xFFFF;
setp.eq.u32 ok1, t, 0;
and.b32 t, b0, 0x10000;
setp.eq.u32 ev, t, 0;
setp.neu.f32 ne, y0, a0;
not.pred k0, ok0;
or.pred k0, k0, ev;
and.pred k1, ne, ok1;
and.pred k0, k0, k1;
FINITE0
selp.b32 $0, b0, a0, k0;
setp.lt.u32 ok0, e0, 0x10000;
setp.lt.u32 ok1, e1, 0x10000;
and.b32 t, b1, 0x10000;
setp.eq.u32 ev, t, 0;
setp.neu.f32 ne, y1, a1;
not.pred k0, ok0;
or.pred k0, k0, ev;
and.pred k1, ne, ok1;
and.pred k0, k0, k1;
FINITE1
selp.b32 $1, b1, a1, k0;
}"""
# c0 finite: (~c0 & 0x7F800000) != 0 (left out below small_shift's bound)
_FINITE_PTX = """not.b32 t, a{h};
and.b32 t, t, 0x7F800000;
setp.ne.u32 k1, t, 0;
and.pred k0, k0, k1;"""
_RESTORE_BF16_PTX_SMALL = tl.constexpr(_RESTORE_BF16_PTX.replace("FINITE0\n", "").replace("FINITE1\n", ""))
_RESTORE_BF16_PTX_FULL = tl.constexpr(_RESTORE_BF16_PTX.replace("FINITE0", _FINITE_PTX.format(h=0))
                                      .replace("FINITE1", _FINITE_PTX.format(h=1)))


@triton.jit
def _invert_rounding_bf16_asm(raw, x, d, SMALL: tl.constexpr):
    """_invert_rounding_bf16_hw of stored bf16 values raw (x: their float32 values) by invert8's PTX."""
    if SMALL:
        ptx: tl.constexpr = _RESTORE_BF16_PTX_SMALL
    else:
        ptx: tl.constexpr = _RESTORE_BF16_PTX_FULL
    b = tl.inline_asm_elementwise(ptx, "=r,=r,r,r,r,r,r",
                                  [x.to(tl.uint32, bitcast=True), d.to(tl.uint32, bitcast=True), raw],
                                  dtype=tl.uint32, is_pure=True, pack=2)
    return b.to(tl.float32, bitcast=True)


# sr8's packed bf16 stochastic rounding (csrc/zo_cuda_kernel.cuh) in PTX: $0 the two results packed (low half
# first), $1/$2 the float32 bits, $3/$4 the 16 random bits: high half of bits + R, or 0x7FC0 for a NaN.
_SR_BF16_PTX = tl.constexpr("""{
.reg .b32 t0, t1;
.reg .pred n0, n1;
add.u32 t0, $1, $3;
add.u32 t1, $2, $4;
setp.nan.f32 n0, $1, $1;
setp.nan.f32 n1, $2, $2;
selp.b32 t0, 0x7FC00000, t0, n0;
selp.b32 t1, 0x7FC00000, t1, n1;
prmt.b32 $0, t0, t1, 0x7632;
}""")


@triton.jit
def _sr_bf16_asm(x, rb):
    return tl.inline_asm_elementwise(_SR_BF16_PTX, "=r,r,r,r,r", [x.to(tl.uint32, bitcast=True), rb],
                                     dtype=tl.uint16, is_pure=True, pack=2)


@triton.jit
def _invert_rounding(w, d, DT: tl.constexpr, SMALL: tl.constexpr = False):
    """reference.invert_rounding: rne(w - d), or, where rounding lost a bit and two storage values map to w, the
    one with the even bit pattern (docs/NOISE_SPEC.md, "Restore"). Same comparisons as the reference in fewer ops
    (as csrc/zo_noise.h, checked for every bf16 / fp16 w by bench/check_invert_rounding.cpp): where it matters (c0
    finite, y != c0) y and c0 share a sign, so their float32 bit patterns order their magnitudes; w is a storage
    value and nothing rounded after y can be NaN.
    SMALL (constexpr, fp16 and the hardware bf16 path only): the host guarantees |d| below the bound of
    _small_shift, under which the finite test cannot change a result (csrc/zo_cuda_kernel.cuh, invert8, gives the
    argument; python_tests/test_small_shift_restore.py checks it for every 16-bit pattern), so it is left out."""
    y = w - d
    if DT == 2 and HW_BF16:
        return _invert_rounding_bf16_hw(w, d, y, SMALL)
    b0 = _raw_bits(_rne(y, DT), DT)
    c0 = _bits_f32(b0, DT)
    b1 = tl.where(y.to(tl.uint32, bitcast=True) > c0.to(tl.uint32, bitcast=True), b0 + 1, b0 - 1)
    c1 = _bits_f32(b1, DT)
    if DT == 2:
        wb = w.to(tl.uint32, bitcast=True) >> 16
        s0 = (c0 + d).to(tl.uint32, bitcast=True)
        s1 = (c1 + d).to(tl.uint32, bitcast=True)
        ok0 = ((s0 + 0x7FFF + ((s0 >> 16) & 1)) >> 16) == wb
        ok1 = ((s1 + 0x7FFF + ((s1 >> 16) & 1)) >> 16) == wb
    else:
        wb = _raw_bits(_rne(w, DT), DT)
        ok0 = _raw_bits(_rne(c0 + d, DT), DT) == wb
        ok1 = _raw_bits(_rne(c1 + d, DT), DT) == wb
    if SMALL and DT == 1:
        take1 = (y != c0) & ok1 & ((ok0 == 0) | ((b1 & 1) == 0))
    else:
        finite = (c0.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000
        take1 = finite & (y != c0) & ok1 & ((ok0 == 0) | ((b1 & 1) == 0))
    return tl.where(take1, c1, c0)


@triton.jit
def _sr(x, rb, DT: tl.constexpr):
    """float32 -> storage (raw) value, stochastic with 16 random bits rb (uint32). DT is 1 or 2."""
    b = x.to(tl.uint32, bitcast=True)
    if DT == 2:
        r = ((b + rb) >> 16) & 0xFFFF
        r = tl.where(_is_nan_bits(b), 0x7FC0, r)
        y = r.to(tl.uint16)
    else:
        # reference.sr_fp16_value without its branches. Where |x| >= 2^-24 (ex >= 103) the drop bits are
        # 13 + clamp(113 - ex, 0, 10), and R shifted to their top is (R << 16) >> (32 - drop) for every drop. Below
        # (the spec's thresh test, R << 8 < floor(|x| 2^48)) the result is 2^-24 iff |x| >= (256 R + 1) 2^-48, an
        # exact float32 compare. Infinities pass the first form unchanged; a NaN stays a NaN (fp16 NaN bits are not
        # fixed by the spec).
        sign = b & 0x80000000
        mag = b & 0x7FFFFFFF
        ex = (mag >> 23).to(tl.int32)
        drop = (13 + tl.minimum(tl.maximum(113 - ex, 0), 10)).to(tl.uint32)
        rfield = (rb << 16) >> (32 - drop)
        normal = ((mag + rfield) & (tl.full(b.shape, 0xFFFFFFFF, tl.uint32) << drop)) | sign
        thr = (rb * 256 + 1).to(tl.float32) * 3.552713678800501e-15   # 2^-48
        tiny = tl.where(tl.abs(x) >= thr, 0x33800000, 0).to(tl.uint32) | sign
        out = tl.where(ex <= 102, tiny, normal).to(tl.float32, bitcast=True)
        y = tl.where(x != x, x, out).to(tl.float16)
    return y


@triton.jit
def _f32_arg(bits_ptr, i):
    return tl.load(bits_ptr + i).to(tl.uint32).to(tl.float32, bitcast=True)



# ------------------------------------------------------------------------------------------------ row-index units
@triton.jit
def _tile2_cols():
    """[2, 1, 4]: the element of its row (0-7) that each position of the [2, R, 4] tile (LAY 2) holds, 4h + j."""
    return tl.arange(0, 2)[:, None, None] * 4 + tl.arange(0, 4)[None, None, :]


@triton.jit
def _rowidx_bytes(cols_ptr, kcols, row_len, nsteps, lstart, numel, NU: tl.constexpr, LAY: tl.constexpr = 1):
    """Selection bytes (int32 [NU]) of the units of 8 local elements starting at lstart (a multiple of 8) under a
    row-index mask (int32 [rows, kcols]: sorted, distinct columns per row) whose rows are a multiple of 8 long, so
    that a unit lies in one row. Per unit: a binary search of its first column in its row's columns (nsteps rounds:
    the bit length of kcols), then the up to 8 listed columns from there that fall inside the unit. Units at or past
    numel select nothing. Every unit of the block searches at once, so the rounds are vector loads from one or two
    rows' columns (cached), not the dependent scalar loads of a search per element."""
    i0 = lstart + tl.arange(0, NU).to(tl.int64) * 8
    ok = i0 < numel
    r = i0 // row_len
    c = (i0 - r * row_len).to(tl.int32)
    row = cols_ptr + tl.where(ok, r, 0) * kcols
    lo = tl.zeros([NU], tl.int32)   # kcols < 2^31 (an int32 table's row)
    hi = tl.where(ok, lo + kcols.to(tl.int32), lo)
    for _ in range(nsteps):
        act = lo < hi
        mid = (lo + hi) >> 1
        v = tl.load(row + mid, mask=act, other=0)
        less = act & (v < c)
        lo = tl.where(less, mid + 1, lo)
        hi = tl.where(act & (~less), mid, hi)
    if LAY == 2:   # [2, NU, 4], as the float32 tile: a unit's 8 columns in one thread, so the sum stays in it
        j = lo[None, :, None] + _tile2_cols()
        v = tl.load(row[None, :, None] + j, mask=ok[None, :, None] & (j < kcols), other=-1)
        d = v - c[None, :, None]
        hit = (d >= 0) & (d < 8)
        out = tl.sum(tl.sum(tl.where(hit, 1 << tl.where(hit, d, 0), 0), axis=2), axis=0)
    else:
        j = lo[:, None] + tl.arange(0, 8)[None, :]
        v = tl.load(row[:, None] + j, mask=ok[:, None] & (j < kcols), other=-1)
        d = v - c[:, None]
        hit = (d >= 0) & (d < 8)
        out = tl.sum(tl.where(hit, 1 << tl.where(hit, d, 0), 0), axis=1)
    return out


@triton.jit
def _rowidx_first(row, a, b, ca, PROBES: tl.constexpr):
    """The number of a row's sorted columns (row: its first entry) below ca, known to lie in [a, b]. PROBES > 0:
    each round loads PROBES entries spaced s apart and keeps the span of one spacing (s = ceil((b - a) / PROBES)),
    until the span holds at most PROBES entries, which one more load counts; PROBES 0: a scalar binary search."""
    if PROBES > 0:
        j = tl.arange(0, PROBES)
        while b - a > PROBES:
            s = (b - a + PROBES - 1) // PROBES
            q = a + (j + 1) * s - 1                 # entry q_j; those below ca are a prefix of the probes
            v = tl.load(row + q, mask=q < b, other=ca)
            cnt = tl.sum((v < ca).to(tl.int32), axis=0)
            b = tl.minimum(a + (cnt + 1) * s - 1, b)   # the first probe at or above ca bounds it (else b does)
            a = a + cnt * s                            # past the last probe below ca
        v = tl.load(row + a + j, mask=j < b - a, other=ca)
        a = a + tl.sum((v < ca).to(tl.int32), axis=0)
    else:
        while a < b:
            mid = (a + b) >> 1
            less = tl.load(row + mid) < ca
            a = tl.where(less, mid + 1, a)
            b = tl.where(less, b, mid)
    return a


@triton.jit
def _rowidx_block_first(cols_ptr, kcols, row_len, lstart, PROBES: tl.constexpr):
    """The index, within its row's entries, of the first row-index entry at or past the block's first element
    lstart. A row of k sorted distinct columns in [0, row_len) has at least c - (row_len - k) and at most min(c, k)
    of them below column c, so the search (_rowidx_first) runs within those bounds: none for a block that starts a
    row. Called just before the scatter (ROWIDX_FIRST_LATE) or right after the block's load."""
    k = kcols.to(tl.int32)
    ra = lstart // row_len
    ca = (lstart - ra * row_len).to(tl.int32)
    return _rowidx_first(cols_ptr + ra * kcols, tl.maximum(ca - (row_len.to(tl.int32) - k), 0), tl.minimum(ca, k),
                         ca, PROBES)


@triton.jit
def _rowidx_scatter(out_ptr, res, cols_ptr, kcols, row_len, lstart, a, R: tl.constexpr, LAY: tl.constexpr):
    """Store the block's computed tile (res: every element's result) at the row-index mask's listed elements only.
    The block's entries are consecutive in the table (rows in order, each row's columns sorted), from entry a of the
    block's first row (_rowidx_block_first: one search per block; _rowidx_bytes searches once per unit of 8) to
    before the same bound in its last row. They are taken CH at a time: each gathers its value from the tile
    (through shared memory) and stores it. Needs row_len < 2^29 (the host's _rowidx_elements) for int32 offsets."""
    BLOCK: tl.constexpr = R * 8
    CH: tl.constexpr = BLOCK // 4
    k = kcols.to(tl.int32)
    rl = row_len.to(tl.int32)
    ra = lstart // row_len
    ca = (lstart - ra * row_len).to(tl.int32)
    rb = (lstart + BLOCK - 1) // row_len
    cb = (lstart + BLOCK - rb * row_len).to(tl.int32)            # in (0, row_len]
    row = cols_ptr + ra * kcols
    nrows = (rb - ra).to(tl.int32)                                     # rows past ra that the block reaches
    n = tl.minimum(nrows * k + tl.minimum(cb, k) - a, BLOCK)           # entries from a that may lie in it
    if LAY == 2:
        flat = tl.reshape(tl.permute(res, (1, 0, 2)), [BLOCK])
    else:
        flat = tl.reshape(res, [BLOCK])
    for ch in range(0, n, CH):
        j = ch + tl.arange(0, CH)
        q = a + j                                  # entry index from row ra's first
        c = tl.load(row + q, mask=j < n, other=0)
        if nrows <= 8:   # rows past ra by comparisons (7B: at most one); short rows by a division
            roff = tl.zeros([CH], tl.int32)
            for t in range(1, nrows + 1):
                roff += (q >= t * k).to(tl.int32)
        else:
            roff = q // k
        pos = roff * rl + c - ca
        ok = (j < n) & (pos < BLOCK)
        pos = tl.where(ok, pos, 0)
        tl.store(out_ptr + pos, tl.gather(flat, pos, 0), mask=ok)


# ------------------------------------------------------------------------------------------------ fast path
# Dense blocks (no mask, not row-index entries, full BLOCK inside the tensor, global offset aligned to the
# generator's call size) take the plain kernel's structure: Philox once per call on a [R] vector, the words joined
# to [R, 2, 2] (Gaussian) and the result joined to [R, 2, 2, 2] and reshaped to [R, 8]; loads and stores use the
# same [R, 8] shape with int32 offsets from a per-program base pointer, so no layout conversion is needed.
@triton.jit
def _words8(row0, tid, STREAM: tl.constexpr, k0, k1, R: tl.constexpr):
    """Philox calls row0 .. row0 + R - 1 as [R, 2, 2]: entry [r, a, b] is word 2a + b of call row0 + r."""
    blk = row0 + tl.arange(0, R).to(tl.int64)
    x0, x1, x2, x3 = _words(blk, tid, STREAM, k0, k1)
    return tl.join(tl.join(x0, x2), tl.join(x1, x3))


@triton.jit
def _rows_tile(t, R: tl.constexpr, LAY: tl.constexpr):
    """[R, 2, 2, 2] values of elements 8r + 4a + 2b + c (at [r, a, b, c]) as the fast path's tile: [R, 8] (LAY 1), or
    [2, R, 4] with element 8r + 4h + j at [h, r, j] (LAY 2). The permute and reshape only rename registers: a row's
    8 values stay in the thread that made them."""
    if LAY == 2:
        out = tl.reshape(tl.permute(t, (1, 0, 2, 3)), [2, R, 4])
    else:
        out = tl.reshape(t, [R, 8])
    return out


@triton.jit
def _row_bits(byte, R: tl.constexpr, LAY: tl.constexpr):
    """Bit j of each row's byte (int32 [R]) at the row's element j, in the tile of LAY (1: [R, 8]; 2: [2, R, 4])."""
    if LAY == 2:
        out = (byte[None, :, None] >> _tile2_cols()) & 1
    else:
        out = (byte[:, None] >> tl.arange(0, 8)[None, :]) & 1
    return out


@triton.jit
def _gauss8(row0, tid, k0, k1, R: tl.constexpr, LAY: tl.constexpr):
    """Normals of global elements 8*row0 .. 8*(row0 + R) - 1 as the tile of LAY."""
    w = _words8(row0, tid, 0, k0, k1, R)
    r = _radius(w)
    c, s = _angle(w)
    return _rows_tile(tl.join(r * c, r * s), R, LAY)     # [R, 2, 2, 2]: element 2 * word + (0 cos, 1 sin)


@triton.jit
def _halves8(row0, tid, STREAM: tl.constexpr, k0, k1, R: tl.constexpr, LAY: tl.constexpr):
    """16 bits of elements 8*row0 .. (uint32, the tile of LAY): half (i & 1) of pair word (i >> 1) & 3 of STREAM."""
    w = _words8(row0, tid, STREAM, k0, k1, R)
    return _rows_tile(tl.join(w & 0xFFFF, w >> 16), R, LAY)


@triton.jit
def _pack8(sel, R: tl.constexpr, LAY: tl.constexpr):
    """A block's selection (the tile of LAY) as R latch bytes (int32): bit j of byte r is element 8r + j."""
    if LAY == 2:
        out = tl.sum(tl.sum(sel.to(tl.int32) << _tile2_cols(), axis=2), axis=0)
    else:
        bits8 = tl.reshape(sel.to(tl.int32), [R, 8])
        out = tl.sum(bits8 << tl.arange(0, 8)[None, :], axis=1)
    return out


@triton.jit
def _rad8(row0, tid, k0, k1, R: tl.constexpr, LAY: tl.constexpr):
    """Signs of global elements 8*row0 .. 8*(row0 + R) - 1 as the tile of LAY, each row from its own Philox call (a
    call covers 16 rows: 16x the Philox work of _rad_rows) so that the signs are born in the rows' layout: _rad_rows'
    [R / 16, 4, 32] -> [R, 8] reshape is a layout exchange through shared memory with barriers."""
    r = row0 + tl.arange(0, R).to(tl.int64)
    x0, x1, x2, x3 = _words(r >> 4, tid, 1, k0, k1)
    w = _select4(((r >> 2) & 3).to(tl.int32), x0, x1, x2, x3)
    byte = ((w >> ((r & 3) * 8).to(tl.uint32)) & 0xFF).to(tl.int32)
    return (1 - 2 * _row_bits(byte, R, LAY)).to(tl.float32)


@triton.jit
def _rbits8(row0, tid, k0, k1, R: tl.constexpr, LAY: tl.constexpr):
    """Stochastic-rounding bits of elements 8*row0 .. (uint32, the tile of LAY)."""
    return _halves8(row0, tid, 2, k0, k1, R, LAY)


@triton.jit
def _fast_noise(gstart, tid, k0, k1, DIST: tl.constexpr, BLOCK: tl.constexpr, LAY: tl.constexpr,
                RAD8: tl.constexpr):
    """Noise of the aligned dense block starting at global index gstart: the tile of LAY (0: [BLOCK], Rademacher
    only; 1: [BLOCK // 8, 8]; 2: [2, BLOCK // 8, 4]). Signs by _rad8 when RAD8 or LAY 2 (one row per thread: made
    there or not at all), else by _rad_rows (one Philox call per 128 elements), reshaped to the rows for LAY 1."""
    if DIST == 0:
        z = _gauss8(gstart >> 3, tid, k0, k1, BLOCK // 8, LAY)
    elif DIST == 2:
        z = _gauss_fast(_halves8(gstart >> 3, tid, 3, k0, k1, BLOCK // 8, LAY))
    else:
        if RAD8 or LAY == 2:
            z = _rad8(gstart >> 3, tid, k0, k1, BLOCK // 8, LAY)
        else:
            z = _rad_rows(gstart >> 7, tid, k0, k1, BLOCK)
            if LAY == 1:
                z = tl.reshape(z, [BLOCK // 8, 8])
    return z


@triton.jit
def _fast_block(in_ptr, out_ptr, gstart, tid, scale_mult, lr_mult, wd, g_mult, call_ptr, gs_ptr, n_seeds,
                mask_ptr, kind, tau, cols_ptr, kcols, row_len, nsteps, lstart,
                OP: tl.constexpr, DIST: tl.constexpr, SR: tl.constexpr, DT: tl.constexpr,
                HAS_PRIOR: tl.constexpr, REUSE0: tl.constexpr, NSTAT: tl.constexpr, BLOCK: tl.constexpr,
                TMODE: tl.constexpr, MASKED: tl.constexpr, ROWIDX: tl.constexpr, SMALL: tl.constexpr,
                ASM: tl.constexpr, RAD8: tl.constexpr, ROW_THREAD: tl.constexpr, ROWIDX_SCATTER: tl.constexpr,
                PROBES: tl.constexpr, FIRST_LATE: tl.constexpr):
    """One aligned block of BLOCK elements, all inside the tensor. in_ptr/out_ptr point at the block's start.
    MASKED False: every element is selected (mask kind none). MASKED True: kind is none, threshold, packed bits
    (mask_ptr: the block's first mask / latch byte, BLOCK / 8 bytes) or row-index as element units (cols_ptr,
    kcols, row_len, nsteps; lstart the block's first local element); the selection as in _general_block, the
    threshold latch written in TMODE 1, and only selected elements stored (perturbed_copy stores them all). ROWIDX
    (constexpr): the call has row-index element units (compiled in only then: the search's registers); with
    ROWIDX_SCATTER those blocks compute every element and store the listed ones through _rowidx_scatter instead of
    searching each unit's selection."""
    # The tile's shape (LAY): [BLOCK] for unmasked Rademacher; [R, 8] rows, one mask byte and one Philox call each
    # (R = BLOCK // 8); for masked fp32 with ROW_THREAD, [2, R, 4] (element 8r + 4h + j at [h, r, j]): a row of 8
    # float32 is two 16-byte vectors, which [R, 8] gives to two threads, so that the row's noise words and mask
    # byte, made or loaded one row per thread, go through shared memory; [2, R, 4] keeps a row in one thread.
    R: tl.constexpr = BLOCK // 8
    if MASKED and DT == 0 and ROW_THREAD:
        LAY: tl.constexpr = 2
    elif DIST != 1 or MASKED:
        LAY: tl.constexpr = 1
    else:
        LAY: tl.constexpr = 0
    if LAY == 2:
        offs = tl.arange(0, R)[None, :, None] * 8 + _tile2_cols()
    elif LAY == 1:
        offs = tl.arange(0, R)[:, None] * 8 + tl.arange(0, 8)[None, :]
    else:
        offs = tl.arange(0, BLOCK)
    raw = tl.load(in_ptr + offs)
    x = _to_f32(raw, DT)
    first = tl.full([], 0, tl.int32)   # row-index scatter form: the block's first entry in its first row
    if MASKED:
        # Mask bytes: packed bits (kind 2), or the latch (kind 1 in TMODE 2); a kind that reads none loads 0xFF
        # (all selected), so no per-element select on the kind is needed.
        if TMODE == 2:
            rd = kind != 0
        else:
            rd = kind == 2
        if ROWIDX:
            if kind == 3:
                if ROWIDX_SCATTER:   # every element computed; the listed ones stored by _rowidx_scatter
                    byte = tl.full([BLOCK // 8], 255, tl.int32)
                    if not FIRST_LATE:
                        first = _rowidx_block_first(cols_ptr, kcols, row_len, lstart, PROBES)
                else:
                    byte = _rowidx_bytes(cols_ptr, kcols, row_len, nsteps, lstart, lstart + BLOCK, BLOCK // 8, LAY)
            else:
                byte = tl.load(mask_ptr + tl.arange(0, BLOCK // 8), mask=rd, other=255).to(tl.int32)
        else:
            byte = tl.load(mask_ptr + tl.arange(0, BLOCK // 8), mask=rd, other=255).to(tl.int32)   # one per row
        sel = _row_bits(byte, R, LAY) != 0
        if TMODE != 2:   # the threshold rule on the stored values (kind 1)
            sel = sel & ((kind != 1) | (tl.abs(x) < tau))
        if TMODE == 1:
            if kind == 1:   # the threshold latch: this block's BLOCK / 8 bytes, every one rewritten
                packed = _pack8(sel, R, LAY)
                tl.store(mask_ptr + tl.arange(0, BLOCK // 8), packed.to(tl.uint8))
    s = _f32_arg(call_ptr, 2 * n_seeds + 2) * scale_mult
    k0 = tl.load(call_ptr).to(tl.uint32)
    k1 = tl.load(call_ptr + 1).to(tl.uint32)
    if OP == 2:
        z0 = _fast_noise(gstart, tid, k0, k1, DIST, BLOCK, LAY, RAD8)
        res = _rne(x + s * z0, DT)
        if MASKED:
            res = tl.where(sel, res, raw)
        if ROWIDX and ROWIDX_SCATTER:
            if kind == 3:   # the input everywhere, then (after the block's barrier) the listed elements' results
                tl.store(out_ptr + offs, raw)
                tl.debug_barrier()
                if FIRST_LATE:
                    first = _rowidx_block_first(cols_ptr, kcols, row_len, lstart, PROBES)
                _rowidx_scatter(out_ptr, res, cols_ptr, kcols, row_len, lstart, first, R, LAY)
            else:
                tl.store(out_ptr + offs, res)
        else:
            tl.store(out_ptr + offs, res)
    else:
        if HAS_PRIOR:
            p = _f32_arg(call_ptr, 2 * n_seeds + 3) * scale_mult
            z0 = _fast_noise(gstart, tid, k0, k1, DIST, BLOCK, LAY, RAD8)
            if ASM >= 1:   # bf16 only (the host's choice)
                base = _invert_rounding_bf16_asm(raw, x, p * z0, SMALL)
            else:
                base = _invert_rounding(x, p * z0, DT, SMALL)
        else:
            base = x
        if OP == 0:
            if not HAS_PRIOR:
                z0 = _fast_noise(gstart, tid, k0, k1, DIST, BLOCK, LAY, RAD8)
            res = _rne(base + s * z0, DT)
        else:
            acc = tl.zeros(offs.shape, tl.float32)
            n_end = n_seeds - 1 if OP == 3 else n_seeds   # op 3's last seed is the next perturbation's
            if REUSE0:  # seeds[1] == seeds[0]: z(seeds[1]) is z0, bit for bit
                acc = acc + (tl.load(gs_ptr) * g_mult) * z0
            if NSTAT > 0:  # few seeds: unrolled, so acc keeps the noise's layout (a loop-carried acc forces one)
                for k in tl.static_range(1 + REUSE0, NSTAT):
                    gk = tl.load(gs_ptr + (k - 1)) * g_mult
                    kk0 = tl.load(call_ptr + 2 * k).to(tl.uint32)
                    kk1 = tl.load(call_ptr + 2 * k + 1).to(tl.uint32)
                    acc = acc + gk * _fast_noise(gstart, tid, kk0, kk1, DIST, BLOCK, LAY, RAD8)
            else:
                for k in range(1 + REUSE0, n_end):
                    gk = tl.load(gs_ptr + (k - 1)) * g_mult
                    kk0 = tl.load(call_ptr + 2 * k).to(tl.uint32)
                    kk1 = tl.load(call_ptr + 2 * k + 1).to(tl.uint32)
                    acc = acc + gk * _fast_noise(gstart, tid, kk0, kk1, DIST, BLOCK, LAY, RAD8)
            step = acc + wd * base
            lr = _f32_arg(call_ptr, 2 * n_seeds + 4)
            new = base - (lr * lr_mult) * step
            if SR and DT != 0:
                sk0 = tl.load(call_ptr + 2 * n_seeds).to(tl.uint32)
                sk1 = tl.load(call_ptr + 2 * n_seeds + 1).to(tl.uint32)
                rb = _rbits8(gstart >> 3, tid, sk0, sk1, R, 1 if LAY == 0 else LAY)
                if LAY == 0:
                    rb = tl.reshape(rb, [BLOCK])
                if ASM >= 2:
                    res = _sr_bf16_asm(new, rb)
                else:
                    res = _sr(new, rb, DT)
            else:
                res = _rne(new, DT)
            if OP == 3:   # then the next step's perturbation (prior 0) of the values the update stored
                nk0 = tl.load(call_ptr + 2 * (n_seeds - 1)).to(tl.uint32)
                nk1 = tl.load(call_ptr + 2 * (n_seeds - 1) + 1).to(tl.uint32)
                zn = _fast_noise(gstart, tid, nk0, nk1, DIST, BLOCK, LAY, RAD8)
                if MASKED:
                    # its selection: a threshold's is evaluated on those values and latched (the latch rewritten,
                    # as perturb_ with prior 0 does); packed bits and row indices keep theirs
                    w = tl.where(sel, _to_f32(res, DT), x)
                    upd_sel = sel
                    sel = tl.where(kind == 1, tl.abs(w) < tau, sel)
                    if kind == 1:
                        packed = _pack8(sel, R, LAY)
                        tl.store(mask_ptr + tl.arange(0, BLOCK // 8), packed.to(tl.uint8))
                    res = tl.where(sel, _rne(w + s * zn, DT), tl.where(upd_sel, res, raw))
                    sel = sel | upd_sel
                else:
                    res = _rne(_to_f32(res, DT) + s * zn, DT)
        if MASKED:
            if kind == 0:
                tl.store(out_ptr + offs, res)
            else:   # unselected elements are never written
                if ROWIDX and ROWIDX_SCATTER:
                    if kind == 3:
                        if FIRST_LATE:
                            first = _rowidx_block_first(cols_ptr, kcols, row_len, lstart, PROBES)
                        _rowidx_scatter(out_ptr, res, cols_ptr, kcols, row_len, lstart, first, R, LAY)
                    else:
                        tl.store(out_ptr + offs, res, mask=sel)
                else:
                    tl.store(out_ptr + offs, res, mask=sel)
        else:
            tl.store(out_ptr + offs, res)

@triton.jit
def _general_block(in_ptr, out_ptr, mask_addr, start, numel, nunits, kcols, entries, tid, off, kind, row_len,
                   nsteps, scale_mult, lr_mult, wd, g_mult, tau, call_ptr, gs_ptr, n_seeds,
                   OP: tl.constexpr, DIST: tl.constexpr, SR: tl.constexpr, TMODE: tl.constexpr, DT: tl.constexpr,
                   HAS_PRIOR: tl.constexpr, REUSE0: tl.constexpr, BLOCK: tl.constexpr, ROWIDX: tl.constexpr):
    """Units [start, start + BLOCK) of one tensor, any mask, any alignment (start is a multiple of BLOCK). ROWIDX
    (constexpr): the call has row-index masks run as element units (_table_row)."""
    mask_u8 = mask_addr.to(tl.pointer_type(tl.uint8))
    mask_i32 = mask_addr.to(tl.pointer_type(tl.int32))

    u = start + tl.arange(0, BLOCK).to(tl.int64)
    valid = u < nunits
    # units -> local element indices
    if entries:  # (a runtime branch: the 64-bit division costs nothing on the common path)
        col = tl.load(mask_i32 + u, mask=valid, other=0).to(tl.int64)
        local = (u // tl.maximum(kcols, 1)) * row_len + col
    else:
        local = u

    raw = tl.load(in_ptr + local, mask=valid)
    x = _to_f32(raw, DT)

    # selection
    use_thr = (kind == 1) & (TMODE != 2)
    use_bits = (kind == 2) | ((kind == 1) & (TMODE == 2))
    thr = tl.abs(x) < tau
    byte = tl.load(mask_u8 + (local >> 3), mask=valid & use_bits, other=0)
    bit = ((byte.to(tl.int32) >> (local & 7).to(tl.int32)) & 1) != 0
    if ROWIDX:
        use_rows = (kind == 3) & (~entries)   # a row-index mask run as element units (_table_row)
        if use_rows:
            rbyte = _rowidx_bytes(mask_i32, kcols, row_len, nsteps, start, numel, BLOCK // 8)
            rbit = tl.reshape(((rbyte[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0, [BLOCK])
        else:
            rbit = valid
        sel = valid & tl.where(use_thr, thr, tl.where(use_bits, bit, tl.where(use_rows, rbit, True)))
    else:
        sel = valid & tl.where(use_thr, thr, tl.where(use_bits, bit, True))
    if TMODE == 1:
        # threshold latch: this program owns bytes [start/8, start/8 + BLOCK/8); every byte is rewritten
        packed = _pack8(sel, BLOCK // 8, 1)
        bidx = (start >> 3) + tl.arange(0, BLOCK // 8).to(tl.int64)
        tl.store(mask_u8 + bidx, packed.to(tl.uint8), mask=(bidx < ((numel + 7) >> 3)) & (kind == 1) & (~entries))

    g = off + local
    gstart = off + start
    contiguous = ~entries
    s = _f32_arg(call_ptr, 2 * n_seeds + 2) * scale_mult
    k0 = tl.load(call_ptr).to(tl.uint32)
    k1 = tl.load(call_ptr + 1).to(tl.uint32)
    if OP == 2:
        z0 = _noise(g, gstart, contiguous, tid, k0, k1, DIST, BLOCK)
        res = _rne(x + s * z0, DT)
        tl.store(out_ptr + local, tl.where(sel, res, raw), mask=valid)
    else:
        if HAS_PRIOR:
            p = _f32_arg(call_ptr, 2 * n_seeds + 3) * scale_mult
            z0 = _noise(g, gstart, contiguous, tid, k0, k1, DIST, BLOCK)
            base = _invert_rounding(x, p * z0, DT)
        else:
            base = x
        if OP == 0:
            if not HAS_PRIOR:
                z0 = _noise(g, gstart, contiguous, tid, k0, k1, DIST, BLOCK)
            res = _rne(base + s * z0, DT)
        else:
            acc = tl.zeros([BLOCK], tl.float32)
            n_end = n_seeds - 1 if OP == 3 else n_seeds   # op 3's last seed is the next perturbation's
            if REUSE0:  # seeds[1] == seeds[0]: z(seeds[1]) is z0, bit for bit
                acc = acc + (tl.load(gs_ptr) * g_mult) * z0
            for k in range(1 + REUSE0, n_end):
                gk = tl.load(gs_ptr + (k - 1)) * g_mult
                kk0 = tl.load(call_ptr + 2 * k).to(tl.uint32)
                kk1 = tl.load(call_ptr + 2 * k + 1).to(tl.uint32)
                acc = acc + gk * _noise(g, gstart, contiguous, tid, kk0, kk1, DIST, BLOCK)
            step = acc + wd * base
            lr = _f32_arg(call_ptr, 2 * n_seeds + 4)
            new = base - (lr * lr_mult) * step
            if SR and DT != 0:
                sk0 = tl.load(call_ptr + 2 * n_seeds).to(tl.uint32)
                sk1 = tl.load(call_ptr + 2 * n_seeds + 1).to(tl.uint32)
                rb = _rbits(g, gstart, contiguous, tid, sk0, sk1, BLOCK)
                res = _sr(new, rb, DT)
            else:
                res = _rne(new, DT)
            if OP == 3:   # then the next step's perturbation (prior 0) of the values the update stored
                nk0 = tl.load(call_ptr + 2 * (n_seeds - 1)).to(tl.uint32)
                nk1 = tl.load(call_ptr + 2 * (n_seeds - 1) + 1).to(tl.uint32)
                zn = _noise(g, gstart, contiguous, tid, nk0, nk1, DIST, BLOCK)
                # its selection: a threshold's on those values, latched (as in _fast_block); other kinds keep theirs
                w = tl.where(sel, _to_f32(res, DT), x)
                upd_sel = sel
                sel = tl.where(kind == 1, valid & (tl.abs(w) < tau), sel)
                packed = _pack8(sel, BLOCK // 8, 1)
                bidx = (start >> 3) + tl.arange(0, BLOCK // 8).to(tl.int64)
                tl.store(mask_u8 + bidx, packed.to(tl.uint8),
                         mask=(bidx < ((numel + 7) >> 3)) & (kind == 1) & (~entries))
                res = tl.where(sel, _rne(w + s * zn, DT), tl.where(upd_sel, res, raw))
                sel = sel | upd_sel
        tl.store(out_ptr + local, res, mask=sel)


# ------------------------------------------------------------------------------------------------ the kernel
@triton.jit
def _zo_kernel(tab_ptr, prog_ptr, meta_ptr, fv_ptr, call_ptr, gs_ptr, n_seeds,
               OP: tl.constexpr, DIST: tl.constexpr, SR: tl.constexpr, TMODE: tl.constexpr, DT: tl.constexpr,
               HAS_PRIOR: tl.constexpr, REUSE0: tl.constexpr, NSTAT: tl.constexpr, MODE: tl.constexpr,
               FBLOCK: tl.constexpr, BLOCK: tl.constexpr, NTAB: tl.constexpr, MASKED: tl.constexpr = False,
               ROWIDX: tl.constexpr = False, SMALL: tl.constexpr = False, ASM: tl.constexpr = 0,
               RAD8: tl.constexpr = False, ROW_THREAD: tl.constexpr = False, ROWIDX_SCATTER: tl.constexpr = False,
               PROBES: tl.constexpr = 0, FIRST_LATE: tl.constexpr = False):
    pid = tl.program_id(0).to(tl.int64)
    if MODE >= 3:   # [t, start, number of FBLOCK blocks]
        t = tl.load(prog_ptr + 3 * pid)
        start = tl.load(prog_ptr + 3 * pid + 1)
        nblk = tl.load(prog_ptr + 3 * pid + 2).to(tl.int32)
    else:
        t = tl.load(prog_ptr + 2 * pid)
        start = tl.load(prog_ptr + 2 * pid + 1)
    tb = tab_ptr + t * NTAB
    in_addr = tl.load(tb + 0)
    out_addr = tl.load(tb + 1)
    mask_addr = tl.load(tb + 2)
    numel = tl.load(tb + 3)
    nunits = tl.load(tb + 4)
    kcols = tl.load(tb + 5)
    entries = tl.load(tb + 6) != 0          # row-index mask entries (not elements) are the units
    nsteps = tl.load(tb + 7).to(tl.int32)    # row-index element units: binary-search rounds (bit length of kcols)
    tid = tl.load(meta_ptr + 4 * t).to(tl.uint32)
    off = tl.load(meta_ptr + 4 * t + 1)
    kind = tl.load(meta_ptr + 4 * t + 2)
    row_len = tl.load(meta_ptr + 4 * t + 3)
    scale_mult = tl.load(fv_ptr + 5 * t)
    lr_mult = tl.load(fv_ptr + 5 * t + 1)
    wd = tl.load(fv_ptr + 5 * t + 2)
    g_mult = tl.load(fv_ptr + 5 * t + 3)
    tau = tl.load(fv_ptr + 5 * t + 4)

    if DT == 0:
        in_ptr = in_addr.to(tl.pointer_type(tl.float32))
        out_ptr = out_addr.to(tl.pointer_type(tl.float32))
    elif DT == 1:
        in_ptr = in_addr.to(tl.pointer_type(tl.float16))
        out_ptr = out_addr.to(tl.pointer_type(tl.float16))
    else:
        in_ptr = in_addr.to(tl.pointer_type(tl.uint16))
        out_ptr = out_addr.to(tl.pointer_type(tl.uint16))
    # Dense aligned blocks of unmasked tensors take the plain kernel's structure. They run in a kernel of their own
    # (MODE 2, program block FBLOCK == BLOCK), so its registers are not those of the general path; the general kernel
    # (MODE 1) skips the units those blocks cover. MODE 0: the general path does everything (of its program list).
    # SPLIT: the host gives each MODE 3 program `nblk` consecutive full FBLOCK blocks of a tensor that has no mask
    # tensor and 16-byte aligned data. Only the device knows whether such a block is dense (its global offset aligned
    # to the generator's call, mask kind none); if not, MODE 3 leaves it and a guard program of the general kernel
    # (MODE 4, nblk > 0) runs it through the general path, BLOCK units at a time. A guard covers many FBLOCK blocks,
    # so a dense call's general launch is a few thousand programs that exit at once. (Running the general path
    # inside MODE 3 instead raised its registers from 72 to 96-121 per thread.) MODE 4 rows with nblk == 0 are
    # ordinary general programs.
    gstart0 = off + start
    if DIST != 1:
        aligned = (gstart0 & 7) == 0
    else:
        aligned = (gstart0 & 127) == 0
    # MASKED (constexpr, the host's choice per call): threshold and packed-bit masks take the fast path too.
    if MASKED:
        fast_kind = (kind == 0) | (kind == 1) | (kind == 2) | (kind == 3)   # kind 3: element units only
    else:
        fast_kind = kind == 0
    dense = fast_kind & (~entries) & aligned & (((in_addr | out_addr) & 15) == 0)   # 16-byte vector access
    mask_u8p = mask_addr.to(tl.pointer_type(tl.uint8))
    cols_i32p = mask_addr.to(tl.pointer_type(tl.int32))
    if MODE == 3:
        if dense:
            for j in range(nblk):
                st = start + j * FBLOCK
                _fast_block(tl.multiple_of(in_ptr + st, 16), tl.multiple_of(out_ptr + st, 16), off + st, tid,
                            scale_mult, lr_mult, wd, g_mult, call_ptr, gs_ptr, n_seeds, mask_u8p + (st >> 3), kind,
                            tau, cols_i32p, kcols, row_len, nsteps, st,
                            OP, DIST, SR, DT, HAS_PRIOR, REUSE0, NSTAT, FBLOCK, TMODE, MASKED, ROWIDX, SMALL, ASM,
                            RAD8, ROW_THREAD, ROWIDX_SCATTER, PROBES, FIRST_LATE)
    elif MODE == 4:
        nsub = tl.where(nblk > 0, tl.where(dense, 0, nblk * (FBLOCK // BLOCK)), 1)
        for q in range(nsub):
            _general_block(in_ptr, out_ptr, mask_addr, start + q * BLOCK, numel, nunits, kcols, entries,
                           tid, off, kind, row_len, nsteps, scale_mult, lr_mult, wd, g_mult, tau, call_ptr,
                           gs_ptr, n_seeds, OP, DIST, SR, TMODE, DT, HAS_PRIOR, REUSE0, BLOCK, ROWIDX)
    elif MODE == 2:
        if dense & (start + BLOCK <= numel):
            _fast_block(tl.multiple_of(in_ptr + start, 16), tl.multiple_of(out_ptr + start, 16), gstart0, tid,
                        scale_mult, lr_mult, wd, g_mult, call_ptr, gs_ptr, n_seeds, mask_u8p + (start >> 3), kind,
                        tau, cols_i32p, kcols, row_len, nsteps, start,
                        OP, DIST, SR, DT, HAS_PRIOR, REUSE0, NSTAT, BLOCK, TMODE, MASKED, ROWIDX, SMALL, ASM,
                        RAD8, ROW_THREAD, ROWIDX_SCATTER, PROBES, FIRST_LATE)
    else:
        run = start >= 0
        if MODE == 1:   # FBLOCK is a multiple of BLOCK; the fast kernel's block holding `start` is full
            run = ~(dense & ((start - (start & (FBLOCK - 1))) + FBLOCK <= numel))
        if run:
            _general_block(in_ptr, out_ptr, mask_addr, start, numel, nunits, kcols, entries, tid, off, kind,
                           row_len, nsteps, scale_mult, lr_mult, wd, g_mult, tau, call_ptr, gs_ptr, n_seeds, OP,
                           DIST, SR, TMODE, DT, HAS_PRIOR, REUSE0, BLOCK, ROWIDX)


# ------------------------------------------------------------------------------------------------ host side
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_rowidx(mask: torch.Tensor) -> bool:
    return mask.dtype == torch.int32 and mask.dim() == 2


def _refuse_upload_in_capture(device):
    """A table missing from the cache would be uploaded from host memory, which a CUDA graph cannot capture."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("zo_apply_ (triton): this call's tensor table is not on the device yet, and it cannot be "
                           "uploaded during CUDA graph capture; run the same call once before capturing (a warm-up "
                           "step)")


def _rowidx_element_policy(op: int, dist: int, dtype: torch.dtype, prior: float) -> bool:
    """ROWIDX_ELEMENTS "auto": may this call run row-index masks as element units? On an H200 over LLaMA-7B's list
    (masks of half of each row; bench/results/h200_2026-12-02/s13/call7 against the entry units of s12's full
    matrix) element units were faster for perturbed_copy and update_ with prior 0 in every dtype (1.0-1.75x), and in
    bf16/fp16 for every pass (1.06-1.70x; perturb_ with a prior 0.97-1.09x) except perturb_ with prior 0 and
    Rademacher noise (0.73-0.76x); in fp32 the other passes were slower (0.52-0.97x). Re-timed for fp32 with its
    [2, R, 4] tile (bench/results/h200_2026-12-03/s20/call3, one process): the same, but for v1 Gaussian
    perturbed_copy, where element units took 112.4 ms against the entry units' 74.6."""
    if ROWIDX_ELEMENTS != "auto":
        return bool(ROWIDX_ELEMENTS)
    if ROWIDX_SCATTER:   # the table above measured the search form; the scatter form: session 24
        return True
    if op == ref.OP_COPY and dtype == torch.float32 and dist == ref.DIST_GAUSSIAN:
        return False
    if op == ref.OP_COPY or (op == ref.OP_UPDATE and prior == 0.0):
        return True
    if dtype == torch.float32:
        return False
    return not (op == ref.OP_PERTURB and prior == 0.0 and dist == ref.DIST_RADEMACHER)


def _rad8_choice(masked: bool, dist: int, op: int, prior: float, rowidx_el: bool,
                 dtype: torch.dtype = torch.bfloat16) -> bool:
    """RAD_ROWS8: does the masked fast path make this call's Rademacher signs in its rows' layout (_rad8)? "auto":
    perturb_ with prior 0 (the light masked pass; not in float32 under FP32_MASKED_TUNED) and update_ with a prior
    on calls with row-index element units (not float32 ones in the scatter form)."""
    if not (masked and dist == ref.DIST_RADEMACHER):
        return False
    if RAD_ROWS8 != "auto":
        return bool(RAD_ROWS8)
    if op == ref.OP_PERTURB and prior == 0.0:
        return not (dtype == torch.float32 and FP32_MASKED_TUNED)
    if dtype == torch.float32 and rowidx_el and ROWIDX_SCATTER:
        # float32 update_ in the scatter form: signs by _rad_rows in [R, 8] measured faster (H200, 7B, one process,
        # bench/results/h200_2026-12-03/s25/call1: 37.39 -> 32.79 ms; CUDA 31.39)
        return False
    return op == ref.OP_UPDATE and prior != 0.0 and rowidx_el


def _fast_warps(masked: bool, dtype: torch.dtype, dist: int, op: int, prior: float, rad8: bool) -> int:
    """The fast kernel's warps for this call: masked float32 under FP32_MASKED_TUNED by _FP32_MASKED_8_WARPS; else
    the latch-writing / packed-bit perturb_ with prior 0 more (MASKED_NUM_WARPS for gaussian_fast,
    MASKED_NUM_WARPS_RAD with _rad8), the rest FAST_NUM_WARPS."""
    if masked and dtype == torch.float32 and FP32_MASKED_TUNED:
        return 8 if (int(op), prior != 0.0, int(dist)) in _FP32_MASKED_8_WARPS else FAST_NUM_WARPS
    light = masked and prior == 0.0 and op == ref.OP_PERTURB
    if light and dist == ref.DIST_GAUSSIAN_FAST:
        return MASKED_NUM_WARPS
    return MASKED_NUM_WARPS_RAD if light and rad8 else FAST_NUM_WARPS


# (dist, 16-bit?) -> register cap of the masked light pass on threshold / packed-bit calls ("auto")
_LIGHT_MAXNREG = {(ref.DIST_GAUSSIAN, True): 80, (ref.DIST_GAUSSIAN, False): 96,
                  (ref.DIST_GAUSSIAN_FAST, False): 80, (ref.DIST_RADEMACHER, False): 96}


def _light_maxnreg(masked: bool, dtype: torch.dtype, dist: int, op: int, prior: float, rowidx_el: bool) -> int:
    """MASKED_LIGHT_MAXNREG: the register cap of a masked perturb_ with prior 0 (0: none). "auto": _LIGHT_MAXNREG
    (float32 only at FP32_MASKED_TUNED's warps, where it was measured), and for calls with row-index element units
    only the 16-bit v1 Gaussian's."""
    if not (masked and op == ref.OP_PERTURB and prior == 0.0):
        return 0
    if MASKED_LIGHT_MAXNREG != "auto":
        return int(MASKED_LIGHT_MAXNREG)
    half = dtype != torch.float32
    if not half and (rowidx_el or not FP32_MASKED_TUNED):
        return 0
    return _LIGHT_MAXNREG.get((int(dist), half), 0)   # 16-bit: v1 Gaussian only, row-index element units too


# dist -> register cap of the masked float32 perturbed_copy on threshold / packed-bit calls ("auto")
_COPY_MAXNREG = {ref.DIST_GAUSSIAN: 64, ref.DIST_GAUSSIAN_FAST: 80, ref.DIST_RADEMACHER: 64}
# (op, has prior, dist) -> register cap on 16-bit calls with row-index element units ("auto"); _ROWIDX_MAXNREG_BF16
# holds the bf16-only ones (fp16 was slower capped there)
_ROWIDX_MAXNREG = {**{(ref.OP_UPDATE, False, d): 80 for d in (ref.DIST_GAUSSIAN, ref.DIST_GAUSSIAN_FAST,
                                                                ref.DIST_RADEMACHER)},
                   (ref.OP_COPY, False, ref.DIST_GAUSSIAN): 96, (ref.OP_COPY, False, ref.DIST_GAUSSIAN_FAST): 96,
                   (ref.OP_COPY, False, ref.DIST_RADEMACHER): 80,
                   (ref.OP_PERTURB, True, ref.DIST_GAUSSIAN_FAST): 96, (ref.OP_PERTURB, True, ref.DIST_RADEMACHER): 80,
                   (ref.OP_UPDATE, True, ref.DIST_GAUSSIAN): 96}
_ROWIDX_MAXNREG_BF16 = {(ref.OP_UPDATE, True, ref.DIST_GAUSSIAN_FAST): 96,
                        (ref.OP_UPDATE, True, ref.DIST_RADEMACHER): 96}
# 16-bit, the scatter form only: Rademacher perturb_ with prior 0 (its _rad8 signs at MASKED_NUM_WARPS_RAD warps) at
# 64 registers (uncapped 80), H200, 7B, one process with CUDA (bench/results/h200_2026-12-03/s25/call2): bf16 22.61
# -> 19.09 ms (CUDA 19.89), fp16 27.43 -> 17.75 (CUDA 19.16); 4 warps instead: 18.88 / 21.35; _rad_rows signs at 4
# warps: 21.81 / 20.68.
_ROWIDX_MAXNREG_SCATTER16 = {(ref.OP_PERTURB, False, ref.DIST_RADEMACHER): 64}
# float32 row-index element units in the scatter form (ROWIDX_SCATTER): the caps measured >= 5% faster on an H200
# over 7B (Triton, one process, bench/results/h200_2026-12-03/s24/call5), ms uncapped -> capped: perturb_ v1 30.40 ->
# 23.51 at 96, gaussian_fast 25.89 -> 20.25 at 96, Rademacher 21.26 -> 18.83 at 80; perturb_prior v1 25.56 -> 24.19
# at 96, gaussian_fast 33.23 -> 26.00 at 80; update_ v1 36.34 -> 28.51 and gaussian_fast 33.90 -> 27.57 at 64;
# copies 39.25 -> 26.23 (v1, 64), 23.95 -> 22.27 and 23.45 -> 21.78 (96). perturb_prior / update_ Rademacher were
# slower at every cap; update_ with prior 0 unmeasured (already 0.67-0.73x CUDA's time uncapped).
_ROWIDX_MAXNREG_FP32 = {(ref.OP_PERTURB, False, ref.DIST_GAUSSIAN): 96, (ref.OP_PERTURB, False, ref.DIST_GAUSSIAN_FAST): 96,
                        (ref.OP_PERTURB, False, ref.DIST_RADEMACHER): 80,
                        (ref.OP_PERTURB, True, ref.DIST_GAUSSIAN): 96, (ref.OP_PERTURB, True, ref.DIST_GAUSSIAN_FAST): 80,
                        (ref.OP_UPDATE, True, ref.DIST_GAUSSIAN): 64, (ref.OP_UPDATE, True, ref.DIST_GAUSSIAN_FAST): 64,
                        (ref.OP_COPY, False, ref.DIST_GAUSSIAN): 64, (ref.OP_COPY, False, ref.DIST_GAUSSIAN_FAST): 96,
                        (ref.OP_COPY, False, ref.DIST_RADEMACHER): 96}


def _copy_maxnreg(masked: bool, dtype: torch.dtype, dist: int, op: int, rowidx_el: bool) -> int:
    """MASKED_COPY_MAXNREG: the register cap of a masked perturbed_copy (0: none). "auto": _COPY_MAXNREG, float32
    threshold / packed-bit calls at FP32_MASKED_TUNED's warps (where it was measured)."""
    if not (masked and op == ref.OP_COPY):
        return 0
    if MASKED_COPY_MAXNREG != "auto":
        return int(MASKED_COPY_MAXNREG)
    if dtype != torch.float32 or rowidx_el or not FP32_MASKED_TUNED:
        return 0
    return _COPY_MAXNREG.get(int(dist), 0)


def _rowidx_maxnreg(dtype: torch.dtype, dist: int, op: int, prior: float, rowidx_el: bool) -> int:
    """ROWIDX_MAXNREG: the register cap of a call with row-index element units (0: none). "auto": _ROWIDX_MAXNREG
    in 16-bit, plus _ROWIDX_MAXNREG_BF16 in bf16 and _ROWIDX_MAXNREG_SCATTER16 in the scatter form; float32
    _ROWIDX_MAXNREG_FP32 in the scatter form, else none (unmeasured)."""
    if not rowidx_el:
        return 0
    if ROWIDX_MAXNREG != "auto":
        return int(ROWIDX_MAXNREG)
    key = (int(op), prior != 0.0, int(dist))
    if dtype == torch.float32:
        return _ROWIDX_MAXNREG_FP32.get(key, 0) if ROWIDX_SCATTER else 0
    if ROWIDX_SCATTER and key in _ROWIDX_MAXNREG_SCATTER16:
        return _ROWIDX_MAXNREG_SCATTER16[key]
    return _ROWIDX_MAXNREG.get(key) or (_ROWIDX_MAXNREG_BF16.get(key, 0) if dtype == torch.bfloat16 else 0)


def _fast_maxnreg(masked: bool, dtype: torch.dtype, dist: int, op: int, prior: float, rowidx_el: bool) -> int:
    """The fast kernel's register cap for this call (0: none): MASKED_LIGHT_MAXNREG's, else MASKED_COPY_MAXNREG's
    for a masked perturbed_copy, else ROWIDX_MAXNREG's on calls with row-index element units, else FUSED_MAXNREG
    for op 3."""
    cap = _light_maxnreg(masked, dtype, dist, op, prior, rowidx_el)
    if not cap:
        cap = _copy_maxnreg(masked, dtype, dist, op, rowidx_el)
    if not cap:
        cap = _rowidx_maxnreg(dtype, dist, op, prior, rowidx_el)
    if not cap and op == ref.OP_UPDATE_PERTURB:
        cap = int(FUSED_MAXNREG)
    return cap


def _row_thread_choice(masked: bool, dtype: torch.dtype, dist: int, op: int, prior: float, rad8: bool) -> bool:
    """FP32_ROW_THREAD: does this masked float32 call run the fast path in the [2, R, 4] tile? "auto": Gaussian
    noise always; Rademacher where its signs by _rad8 were measured faster (perturb_ with prior 0, op 3, and the
    calls _rad8_choice gives _rad8)."""
    if not (masked and dtype == torch.float32):
        return False
    if FP32_ROW_THREAD != "auto":
        return bool(FP32_ROW_THREAD)
    if dist != ref.DIST_RADEMACHER:
        return True
    if op == ref.OP_PERTURB and prior == 0.0 and FP32_MASKED_TUNED:
        return rad8   # (not by default: _rad8_choice) the exchange into [R, 8] measured faster here
    return rad8 or (op == ref.OP_PERTURB and prior == 0.0) or op == ref.OP_UPDATE_PERTURB


def _rowidx_elements(theta, mask, ok: bool = True) -> bool:
    """Does a row-index mask run as element units (every element visited in order, the selection found per unit of
    8 by _rowidx_bytes) rather than entry units (only the listed elements, gathered)? From 1/8 of a row on (a 32-byte
    bf16 sector then holds two listed elements on average, as csrc/zo_apply_common.h's rowidx_as_elements), for rows
    a multiple of 8 long (a unit lies in one row) and shorter than 2^29 (_rowidx_window's int32 offsets)."""
    k, row_len = int(mask.shape[1]), int(theta.shape[1]) if theta.dim() == 2 else 0
    return ok and k > 0 and row_len % 8 == 0 and k * 8 >= row_len and row_len < 2 ** 29


def _table_row(theta, out, mask, rowidx_el_ok: bool = True):
    """One tensor's row of the per-tensor table (_NTAB columns): addresses, numel, units, k, entries?, search
    rounds. Row-index masks run as element units where _rowidx_elements says so, else as entry units (only the
    listed elements); perturbed_copy's output is then first a copy of theta (zo_apply_)."""
    n = theta.numel()
    ri = _is_rowidx(mask)
    ent = ri and not _rowidx_elements(theta, mask, rowidx_el_ok)
    k = int(mask.shape[1]) if ri else 0
    return (theta.data_ptr(), out.data_ptr(), mask.data_ptr(), n, mask.numel() if ent else n, k, int(ent),
            k.bit_length())


def _upload(t: torch.Tensor, device) -> torch.Tensor:
    """Host table -> device without a stream sync (a pageable host-to-device copy waits for the stream: with the
    transient mode's per-block copies that serialised the host with every layer's forward)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _with_outs(key, tab: torch.Tensor, optr, device) -> torch.Tensor:
    """The cached tables of an out-of-place call (perturbed_copy) are keyed without the outputs' addresses (only their
    16-byte alignment, which decides the fast path, and the stream): fresh outputs every call (the transient mode)
    would miss the cache every call. Where this call's outputs differ from those the cached table holds, their
    addresses are written into its column 1 on the stream (after the launches that read the old ones; no new device
    memory). Not during a CUDA graph capture: a capture must find the table as it will replay.
    optr: the outputs' addresses (_out_ptrs), None in place."""
    if optr is None or _TABLE_OUTS.get(key) == optr:
        return tab
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("zo_apply_ (triton): perturbed_copy into outputs other than those of the call before, "
                           "during CUDA graph capture: their addresses would be uploaded, which a graph cannot "
                           "capture; run the call once with the same outputs before capturing")
    host = torch.tensor(optr, dtype=torch.int64)
    tab[:, 1].copy_(host.pin_memory() if device.type == "cuda" else host, non_blocking=True)
    _TABLE_OUTS[key] = optr
    return tab


def _out_ptrs(params, outs):
    """The outputs' addresses of an out-of-place call, None in place."""
    return None if outs is params else tuple(map(_DATA_PTR, outs))


def _out_key(optr, device):
    if optr is None:
        return None
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    return stream, tuple(p % 16 == 0 for p in optr)


def _tables(params, outs, masks, block: int, device, rowidx_el_ok: bool = True):
    rows = [_table_row(theta, out, mask, rowidx_el_ok) for theta, out, mask in zip(params, outs, masks)]
    optr = _out_ptrs(params, outs)
    key = (str(device), block, tuple(r[:1] + r[2:] for r in rows), _out_key(optr, device))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return (_with_outs(key, hit[0], optr, device),) + hit[1:]
    _refuse_upload_in_capture(device)
    tab = torch.tensor(rows, dtype=torch.int64).reshape(-1, _NTAB)
    nunits = tab[:, 4]
    nprog = (nunits + block - 1) // block
    tidx = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int64), nprog)
    first = torch.cumsum(nprog, 0) - nprog
    starts = (torch.arange(tidx.numel(), dtype=torch.int64) - first[tidx]) * block
    prog = torch.stack([tidx, starts], 1).contiguous()
    hit = (_upload(tab, device), _upload(prog, device), int(prog.shape[0]))
    _cache_put(key, hit, optr)
    return hit


_DATA_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
_SIZE = torch.Tensor.size
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_IS_CONTIGUOUS = torch.Tensor.is_contiguous


def _split_tables(params, outs, masks, block: int, fblock: int, chunk: int, guard: int, device,
                  rowidx_el_ok: bool = True):
    """Program lists of the SPLIT launches: fast programs [t, start, nblk] over the full FBLOCK blocks of tensors with
    16-byte aligned data and no mask tensor (or, with MASKED_FAST, no mask run as entry units; chunk blocks per
    program); general programs [t, start, 0] over everything else at BLOCK granularity, and guards [t, start, nblk]
    (guard fast blocks each) that run the fast blocks the device finds not dense. Returns (tab, fast_prog, n_fast,
    gen_prog, n_gen)."""
    # The cache key holds everything the tables are built from (addresses, sizes, mask shapes and dtypes, the
    # knobs), gathered with C-level maps: for a ~200-tensor plan this is the host's main cost per call (~0.5 ms
    # with a per-tensor Python loop, ~0.2 ms this way, on a 2-core CPU).
    optr = _out_ptrs(params, outs)
    key = ("split", str(device), block, fblock, chunk, guard, bool(MASKED_FAST), bool(rowidx_el_ok),
           tuple(map(_DATA_PTR, params)), _out_key(optr, device),
           tuple(map(_DATA_PTR, masks)), tuple(map(_NUMEL, params)), tuple(map(_SIZE, masks)),
           tuple(map(_DTYPE, masks)))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return (_with_outs(key, hit[0], optr, device),) + hit[1:]
    rows, cand = [], []
    for theta, out, mask in zip(params, outs, masks):
        rows.append(_table_row(theta, out, mask, rowidx_el_ok))
        fast_mask = not _is_rowidx(mask) or (bool(MASKED_FAST) and _rowidx_elements(theta, mask, rowidx_el_ok))
        cand.append(fast_mask
                    and (mask.numel() == 0 or bool(MASKED_FAST))
                    and (theta.data_ptr() | out.data_ptr()) % 16 == 0)
    _refuse_upload_in_capture(device)
    tab = torch.tensor(rows, dtype=torch.int64).reshape(-1, _NTAB)
    T = tab.shape[0]
    numel, nunits = tab[:, 3], tab[:, 4]
    nfull = torch.where(torch.tensor(cand, dtype=torch.bool), numel // fblock, torch.zeros_like(numel))
    # fast programs: ceil(nfull / chunk) per tensor
    nfp = (nfull + chunk - 1) // chunk
    tf = torch.repeat_interleave(torch.arange(T, dtype=torch.int64), nfp)
    jf = torch.arange(tf.numel(), dtype=torch.int64) - (torch.cumsum(nfp, 0) - nfp)[tf]
    fprog = torch.stack([tf, jf * chunk * fblock, torch.minimum(nfull[tf] - jf * chunk,
                                                                torch.full_like(jf, chunk))], 1).contiguous()
    # general programs: units [nfull * fblock, nunits) per tensor, nblk 0
    g0 = nfull * fblock
    ngp = torch.clamp(nunits - g0 + block - 1, min=0) // block
    tg = torch.repeat_interleave(torch.arange(T, dtype=torch.int64), ngp)
    jg = torch.arange(tg.numel(), dtype=torch.int64) - (torch.cumsum(ngp, 0) - ngp)[tg]
    # guards: GUARD fast blocks each, for the blocks the device finds not dense
    nguard = (nfull + guard - 1) // guard
    tq = torch.repeat_interleave(torch.arange(T, dtype=torch.int64), nguard)
    jq = torch.arange(tq.numel(), dtype=torch.int64) - (torch.cumsum(nguard, 0) - nguard)[tq]
    gprog = torch.cat([torch.stack([tg, g0[tg] + jg * block, torch.zeros_like(tg)], 1),
                       torch.stack([tq, jq * guard * fblock, torch.minimum(nfull[tq] - jq * guard,
                                                                          torch.full_like(jq, guard))], 1)]).contiguous()
    hit = (_upload(tab, device), _upload(fprog, device), int(fprog.shape[0]), _upload(gprog, device),
           int(gprog.shape[0]))
    _cache_put(key, hit, optr)
    return hit


def _call_table(seeds, sr_seed, scale, prior, lr, device, seed_dev=None):
    m32 = 0xFFFFFFFF
    if seed_dev is not None:
        # device ops only (capturable): the key words from seed_dev, the float bits by fills
        sd = seed_dev[:len(seeds) + 1]
        words = torch.stack([sd & m32, (sd >> 32) & m32], 1).reshape(-1)
        fl = torch.empty(3, dtype=torch.float32, device=device)
        for j, v in enumerate((scale, prior, lr)):
            fl[j].fill_(v)
        return torch.cat([words, fl.view(torch.int32).to(torch.int64) & m32])
    vals = []
    for s in list(seeds) + [sr_seed]:
        s &= (1 << 64) - 1
        vals += [s & m32, s >> 32]
    fbits = torch.tensor([scale, prior, lr], dtype=torch.float32).view(torch.int32).to(torch.int64) & m32
    host = torch.cat([torch.tensor(vals, dtype=torch.int64), fbits])
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


# Largest |scale_mult| of a plan's fvals table, per table (data pointer, in-place version): read once, since it
# costs a device sync. A table first seen inside a CUDA-graph capture gets None (no sync is possible there).
_MAX_SCALE_MULT: "OrderedDict[tuple, float]" = OrderedDict()
# |prior * scale_mult| bounds of the restore without its finite test (csrc/zo_cuda_kernel.cuh, small_shift)
_SMALL_SHIFT_BOUND = {1: 1.0, 2: 2.0 ** 100}


def _max_scale_mult(fvals: torch.Tensor):
    key = (fvals.data_ptr(), fvals._version, fvals.device, tuple(fvals.shape))
    hit = _MAX_SCALE_MULT.get(key)
    if hit is None:
        if fvals.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        hit = float(fvals[:, 0].abs().max().item()) if fvals.shape[0] else 0.0
        _MAX_SCALE_MULT[key] = hit
        if len(_MAX_SCALE_MULT) > _TABLE_CACHE_SIZE:
            _MAX_SCALE_MULT.popitem(last=False)
    return hit


def _small_shift(dt: int, prior: float, fvals: torch.Tensor) -> bool:
    """Whether every tensor's restore shift is below the bound under which the finite test of _invert_rounding
    cannot change a result: |fl32(prior) * scale_mult| < 2^100 (bf16, hardware path) or < 1 (fp16), computed in
    float32 as the kernel does (monotone in |scale_mult|, so the largest one decides)."""
    if prior == 0.0 or dt not in _SMALL_SHIFT_BOUND or (dt == 2 and not HW_BF16):
        return False
    m = _max_scale_mult(fvals)
    if m is None:
        return False
    p = np.float32(abs(np.float32(prior))) * np.float32(m)
    return bool(p < np.float32(_SMALL_SHIFT_BOUND[dt]))


def zo_apply_(params, outs, masks, meta, fvals, seeds, gs, op: int, dist: int, rounding: int,
              sr_seed: int, threshold_mode: int, scale: float, prior: float, lr: float, *, block: int | None = None,
              seed_dev: torch.Tensor | None = None) -> None:
    """Same semantics as reference.zo_apply_; outs empty means in place. One kernel launch.
    seed_dev: see ops.zo_apply_ (seeds and sr_seed read from that device tensor)."""
    params = list(params)
    if not params:
        return
    outs = list(outs) if len(outs) else params
    masks = list(masks)
    if op == ref.OP_UPDATE_PERTURB and not FUSE_MASKED and any(m_.numel() for m_ in masks):
        # FUSE_MASKED off: masked calls run the two ops
        n = len(seeds)
        sd_u = sd_n = None
        if seed_dev is not None:
            sd_u, sd_n = torch.cat([seed_dev[:n - 1], seed_dev[n:n + 1]]), seed_dev[n - 1:n + 1]
        zo_apply_(params, [], masks, meta, fvals, list(seeds[:-1]), gs, ref.OP_UPDATE, dist, rounding, sr_seed,
                  threshold_mode, 0.0, prior, lr, block=block, seed_dev=sd_u)
        zo_apply_(params, [], masks, meta, fvals, [seeds[-1]], gs, ref.OP_PERTURB, dist, ref.ROUND_NEAREST, 0,
                  ref.THRESH_LATCH_WRITE, scale, 0.0, 0.0, block=block, seed_dev=sd_n)
        return
    dtype = params[0].dtype
    device = params[0].device
    if dtype not in _DT:
        raise TypeError(f"unsupported storage dtype {dtype}")
    if len(outs) != len(params) or len(masks) != len(params):
        raise ValueError("params, outs and masks must have the same length")
    # per-tensor checks as C-level maps (a Python loop over a ~200-tensor plan cost ~0.3 ms per call)
    lists = (params,) if outs is params else (params, outs)
    for lst in lists:
        if set(map(_DTYPE, lst)) != {dtype} or set(map(_DEVICE, lst)) != {device}:
            raise ValueError("zo_apply_: one dtype and one device per call")
        if not all(map(_IS_CONTIGUOUS, lst)):
            raise ValueError("zo_apply_: contiguous tensors with matching outputs required")
    if outs is not params and list(map(_NUMEL, outs)) != list(map(_NUMEL, params)):
        raise ValueError("zo_apply_: contiguous tensors with matching outputs required")
    block = int(block or BLOCK)
    if block < 128 or block & (block - 1):
        raise ValueError(f"BLOCK must be a power of two >= 128, got {block}")
    if device.type != "cpu" and _interpreted():
        # the interpreter dereferences host addresses: run on host copies and write back
        hp = [p_.detach().cpu() for p_ in params]
        ho = hp if outs is params else [o_.detach().cpu() for o_ in outs]
        hm = [m_.cpu() for m_ in masks]
        zo_apply_(hp, ho, hm, meta.cpu(), fvals.cpu(), seeds, gs.cpu(), op, dist, rounding, sr_seed,
                  threshold_mode, scale, prior, lr, block=block,
                  seed_dev=None if seed_dev is None else seed_dev.cpu())
        for dst, srcs in ((outs, ho), (masks, hm)):
            for d_, s_ in zip(dst, srcs):
                d_.copy_(s_)
        return
    if meta.device.type == "cpu":  # cheap consistency check of the host's chunking (no sync possible otherwise)
        for t, (kind, m_) in enumerate(zip(meta[:, 2].tolist(), masks)):
            if (kind == ref.MASK_ROWIDX) != _is_rowidx(m_):
                raise ValueError(f"tensor {t}: mask kind {kind} does not match its mask tensor")
    fblock = max(block, int(FAST_BLOCK))
    split = bool(FAST and SPLIT)
    el_ok = _rowidx_element_policy(op, dist, dtype, prior)   # row-index masks as element units in this call?
    if split:
        tab, fprog, nf, gprog, ng = _split_tables(params, outs, masks, block, fblock, max(1, int(CHUNK)),
                                                      max(1, int(GUARD)), device, el_ok)
        if nf + ng == 0:
            return
    else:
        tab, prog, nprog = _tables(params, outs, masks, block, device, el_ok)
        if nprog == 0:
            return
    if op == ref.OP_COPY and outs is not params:
        # Row-index masks run as entry units (sparse ones, or where _rowidx_element_policy keeps them) write only
        # the listed elements; perturbed_copy's unlisted elements come from this copy. (Element units copy their
        # unselected elements themselves. A binary search per element, not per unit of 8, had run 7B bf16 at
        # 493 ms: bench/results/h200_2026-12-02/s9_full_matrix.)
        for theta, out, mask in zip(params, outs, masks):
            if _is_rowidx(mask) and theta.numel() and not _rowidx_elements(theta, mask, el_ok):
                out.copy_(theta)
    meta_d = meta.to(device=device, dtype=torch.int64).contiguous()
    fv_d = fvals.to(device=device, dtype=torch.float32).contiguous()
    if seed_dev is None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("zo_apply_ (triton): seeds given as ints cannot be captured in a CUDA graph (they are "
                           "uploaded per call); pass seed_dev")
    call = _call_table(seeds, sr_seed, scale, prior, lr, device, seed_dev)
    if len(seeds) > 1:
        gs_d = gs.to(device=device, dtype=torch.float32).contiguous()
    else:
        gs_d = fv_d  # never read
    m64 = (1 << 64) - 1
    is_update = op in (ref.OP_UPDATE, ref.OP_UPDATE_PERTURB)
    n_upd_seeds = len(seeds) - (op == ref.OP_UPDATE_PERTURB)   # the restore seed and the update seeds
    reuse0 = int(is_update and prior != 0.0 and n_upd_seeds > 1 and (seeds[1] & m64) == (seeds[0] & m64))
    # MASKED compiles the fast path's mask handling only into calls that have a threshold or packed-bit mask
    # (filter walks the masks at C speed: a dense call's masks are all empty and none reaches Python)
    # ROWIDX compiles the row-index element units' search in only where the call has such a tensor
    rowidx_el = el_ok and any(_rowidx_elements(t_, m_) for t_, m_ in zip(params, masks)
                              if m_.numel() and _is_rowidx(m_))
    masked = bool(FAST and MASKED_FAST) and (rowidx_el or any(not _is_rowidx(m_) for m_ in filter(_NUMEL, masks)))
    consts = dict(OP=int(op), DIST=int(dist), SR=int(rounding == ref.ROUND_STOCHASTIC), TMODE=int(threshold_mode),
                  MASKED=masked, ROWIDX=rowidx_el, ROWIDX_SCATTER=bool(ROWIDX_SCATTER and rowidx_el),
                  PROBES=(int(ROWIDX_PROBES) if ROWIDX_SCATTER and rowidx_el else 0),
                  FIRST_LATE=bool(ROWIDX_FIRST_LATE and ROWIDX_SCATTER and rowidx_el),
                  DT=_DT[dtype], HAS_PRIOR=bool(prior != 0.0), REUSE0=reuse0,
                  NSTAT=(n_upd_seeds if is_update and n_upd_seeds <= 4 else 0), NTAB=_NTAB,
                  SMALL=_small_shift(_DT[dtype], prior, fvals),
                  ASM=(int(ASM) if dtype == torch.bfloat16 and HW_BF16 else 0),
                  RAD8=_rad8_choice(masked, dist, op, prior, rowidx_el, dtype), enable_fp_fusion=False)
    consts["ROW_THREAD"] = _row_thread_choice(masked, dtype, dist, op, prior, consts["RAD8"])
    fast_warps = _fast_warps(masked, dtype, dist, op, prior, consts["RAD8"])
    cap = _fast_maxnreg(masked, dtype, dist, op, prior, rowidx_el)
    fast_opts = {"maxnreg": cap} if cap else {}
    if split:
        if nf:
            _zo_kernel[(nf,)](tab, fprog, meta_d, fv_d, call, gs_d, len(seeds), MODE=3, FBLOCK=fblock, BLOCK=block,
                              num_warps=fast_warps, **fast_opts, **consts)
        if ng:
            _zo_kernel[(ng,)](tab, gprog, meta_d, fv_d, call, gs_d, len(seeds), MODE=4, FBLOCK=fblock, BLOCK=block,
                              num_warps=NUM_WARPS, **consts)
        return
    mode = 0
    if FAST and any(p_.numel() >= fblock for p_ in params):
        # dense aligned blocks first, in their own kernel; the general kernel then skips them (disjoint elements)
        ftab, fprog, fnprog = _tables(params, outs, masks, fblock, device, el_ok)
        _zo_kernel[(fnprog,)](ftab, fprog, meta_d, fv_d, call, gs_d, len(seeds), MODE=2, FBLOCK=fblock,
                              BLOCK=fblock, num_warps=fast_warps, **consts)
        mode = 1
    _zo_kernel[(nprog,)](tab, prog, meta_d, fv_d, call, gs_d, len(seeds), MODE=mode, FBLOCK=fblock, BLOCK=block,
                         num_warps=NUM_WARPS, **consts)
