"""Pure-torch reference of the noise specification (docs/NOISE_SPEC.md, version 2) and of the ops.

This file is the oracle: every backend (C++ CPU, Triton, CUDA) must produce the same bits.
All float work is float32 with one IEEE-rounded operation per line, in the order written here:
no fused multiply-add, no library transcendentals. Integers are carried in int64 tensors and
masked to 32 bits where the spec uses uint32 arithmetic.
"""
from __future__ import annotations

import torch

SPEC_VERSION = 2
# Version 2 only added a distribution (gaussian_fast, stream 3): every version-1 value is unchanged, so seeds logged
# under version 1 replay bit for bit.
REPLAYABLE_SPEC_VERSIONS = (1, 2)

M32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85

STREAM_GAUSSIAN, STREAM_RADEMACHER, STREAM_ROUNDING, STREAM_GAUSSIAN_FAST = 0, 1, 2, 3
DIST_GAUSSIAN, DIST_RADEMACHER, DIST_GAUSSIAN_FAST = 0, 1, 2

# Polynomial coefficients (float32 values, frozen by spec version 1).
# ln(1+t) ~ t * P(t) on [sqrt(1/2) - 1, sqrt(2) - 1]; the spec uses LOG_P2 = -2 * P (exact scaling), so it
# computes -2 ln(1+t) directly.
LOG_P = (1.0000054836273193, -0.4999140501022339, 0.3324826955795288, -0.25359150767326355,
         0.22168762981891632, -0.14662456512451172)
LOG_P2 = tuple(-2.0 * c for c in LOG_P)
SIN_P = (0.9999985694885254, -0.1666249930858612, 0.00815201923251152)     # sin(x)/x in x^2
COS_P = (-0.4999998211860657, 0.04166144132614136, -0.001366178970783949)   # (cos(x) - 1)/x^2 in x^2
TWO_LN2 = 1.3862943649291992        # float32(2 ln 2)
SQRT_HALF_BITS = 0x3F3504F3         # bits of float32(sqrt(1/2))
ANGLE_STEP = 0.0007669904152862728  # float32(pi / 4096)
RADIUS_BITS, ANGLE_BITS = 20, 12
# gaussian_fast (spec v2): z = x * ((FAST_P[2]*x^2 + FAST_P[1])*x^2 + FAST_P[0]) on x = a + b - 255, the sum of two
# random bytes centred. Fitted (least squares on the N(0,1) quantiles) under the constraints E z^2 = 1, E z^4 = 3.
FAST_P = (0.009295222349464893, -5.1385477206622454e-08, 1.7205431957628692e-12)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _mulhilo(a: int, b: torch.Tensor):
    prod = b * a  # int64 wraps modulo 2**64; both halves are still exact
    return (prod >> 32) & M32, prod & M32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Random123 Philox4x32-10 on int64 tensors holding uint32 values; returns four words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & M32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & M32, (k1 + PHILOX_W1) & M32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _words(seed: int, tensor_id: int, block: torch.Tensor, stream: int):
    seed &= (1 << 64) - 1
    return philox4x32_10(block & M32, block >> 32, tensor_id & M32, stream, seed & M32, seed >> 32)


def _i2f(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)  # exact: every converted integer has at most 24 significant bits


def _bits_to_f32(b: torch.Tensor) -> torch.Tensor:
    return b.to(torch.int32).view(torch.float32) if b.dtype != torch.int32 else b.view(torch.float32)


def _f32_to_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & M32


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt. torch's CPU float32 sqrt is not (about 19% of results are 1 ulp off on
    torch 2.14), so take it in float64 and round once: exact, since 53 >= 2 * 24 + 2 bits."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def box_muller_radius(w: torch.Tensor) -> torch.Tensor:
    """r = sqrt(-2 ln u), u = k * 2^-20, k = (w >> 12) + 1 in [1, 2^20]; so 0 <= r <= sqrt(40 ln 2) = 5.27."""
    k = _i2f((w >> 12) + 1)
    bits = _f32_to_bits(k)
    e = (bits - SQRT_HALF_BITS) >> 23              # k = 2^e * m, m in [sqrt(1/2), sqrt(2))
    m = _bits_to_f32(bits - (e << 23))
    t = m - _f32(1.0)
    p = _f32(LOG_P2[5])
    for c in LOG_P2[4::-1]:
        p = p * t + _f32(c)
    q = _i2f(20 - e) * _f32(TWO_LN2) + t * p       # -2 ln u = 2 ln2 (20 - e) - 2 ln m  (>= 0)
    return sqrt_rn(q)


def box_muller_angle(w: torch.Tensor):
    """(cos, sin) of q*pi/2 + x: q = bits 10..11 of w, x = (2f - 1023) * pi/4096 with f = bits 0..9."""
    q = (w >> 10) & 3
    x = _i2f(2 * (w & 0x3FF) - 1023) * _f32(ANGLE_STEP)
    s2 = x * x
    sin_x = ((_f32(SIN_P[2]) * s2 + _f32(SIN_P[1])) * s2 + _f32(SIN_P[0])) * x
    cos_x = ((_f32(COS_P[2]) * s2 + _f32(COS_P[1])) * s2 + _f32(COS_P[0])) * s2 + _f32(1.0)
    swap = (q & 1) == 1
    c = torch.where(swap, sin_x, cos_x)
    s = torch.where(swap, cos_x, sin_x)
    c = torch.where((q == 1) | (q == 2), -c, c)
    s = torch.where(q >= 2, -s, s)
    return c, s


def _pair_word(seed: int, tensor_id: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """Element i reads word (i >> 1) & 3 of Philox call i >> 3: one 32-bit word per pair of elements."""
    words = _words(seed, tensor_id, index >> 3, stream)
    return torch.stack(words, 0).gather(0, ((index >> 1) & 3).unsqueeze(0)).squeeze(0)


def gaussian(seed: int, tensor_id: int, index: torch.Tensor) -> torch.Tensor:
    """z[i] ~ N(0,1): the word of pair i >> 1 gives a Box-Muller pair (20 radius bits, 12 angle bits);
    even i takes r*cos, odd i takes r*sin. Eight normals per Philox call."""
    index = torch.as_tensor(index, dtype=torch.int64)
    w = _pair_word(seed, tensor_id, index, STREAM_GAUSSIAN)
    r = box_muller_radius(w)
    c, s = box_muller_angle(w)
    return r * torch.where((index & 1) == 0, c, s)


def rademacher(seed: int, tensor_id: int, index: torch.Tensor) -> torch.Tensor:
    """z[i] = 1 - 2*bit: Philox call i//128 of stream 1, word (i//32)%4, bit i%32."""
    index = torch.as_tensor(index, dtype=torch.int64)
    words = _words(seed, tensor_id, index >> 7, STREAM_RADEMACHER)
    w = torch.stack(words, 0).gather(0, ((index >> 5) & 3).unsqueeze(0)).squeeze(0)
    bit = (w >> (index & 31)) & 1
    return _i2f(1 - 2 * bit)


def rounding_bits(seed: int, tensor_id: int, index: torch.Tensor) -> torch.Tensor:
    """16 random bits per element for stochastic rounding: half (i & 1) of the pair word, stream 2."""
    index = torch.as_tensor(index, dtype=torch.int64)
    w = _pair_word(seed, tensor_id, index, STREAM_ROUNDING)
    return (w >> (16 * (index & 1))) & 0xFFFF


def gaussian_fast_from_half(h: torch.Tensor) -> torch.Tensor:
    """The spec-v2 near-Gaussian of one 16-bit value: x = (h & 0xFF) + (h >> 8) - 255 (triangular on [-255, 255]),
    shaped by an odd quintic so that E z = 0, E z^2 = 1 and E z^4 = 3 (to float32); |z| <= 3.374."""
    x = _i2f((h & 0xFF) + ((h >> 8) & 0xFF) - 255)
    t = x * x                                                  # exact: <= 65025
    p = (_f32(FAST_P[2]) * t + _f32(FAST_P[1])) * t + _f32(FAST_P[0])
    return x * p


def gaussian_fast(seed: int, tensor_id: int, index: torch.Tensor) -> torch.Tensor:
    """Spec v2: z[i] from the 16 bits the stochastic-rounding layout gives element i, on stream 3: half (i & 1)
    (low half first) of word (i >> 1) & 3 of Philox call i >> 3. Eight values per call, as Gaussian."""
    index = torch.as_tensor(index, dtype=torch.int64)
    w = _pair_word(seed, tensor_id, index, STREAM_GAUSSIAN_FAST)
    return gaussian_fast_from_half((w >> (16 * (index & 1))) & 0xFFFF)


def noise(seed: int, tensor_id: int, index: torch.Tensor, dist: int = DIST_GAUSSIAN) -> torch.Tensor:
    if dist == DIST_GAUSSIAN:
        return gaussian(seed, tensor_id, index)
    if dist == DIST_GAUSSIAN_FAST:
        return gaussian_fast(seed, tensor_id, index)
    return rademacher(seed, tensor_id, index)


# ---------------------------------------------------------------- rounding float32 -> storage dtype
def rne_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    b = _f32_to_bits(x)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return torch.where(torch.isnan(x), torch.full_like(b, 0x7FC0), r & 0xFFFF)


def sr_bf16_bits(x: torch.Tensor, rbits: torch.Tensor) -> torch.Tensor:
    b = _f32_to_bits(x)
    r = ((b + rbits) >> 16) & 0xFFFF
    return torch.where(torch.isnan(x), torch.full_like(b, 0x7FC0), r)


def sr_fp16_value(x: torch.Tensor, rbits: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding to the fp16 grid with 16 random bits R; returns a float32 that converts to fp16 exactly.

    d = low bits of the float32 magnitude below the fp16 grid (13 in the normal range, more for fp16 subnormals);
    R is aligned to the top of those d bits, added, and the d bits cleared."""
    b = _f32_to_bits(x)
    sign = b & 0x80000000
    mag = b & 0x7FFFFFFF
    ex = mag >> 23
    drop = 13 + torch.clamp(113 - ex, min=0, max=10)                 # ex >= 103 here: drop <= 23
    rfield = torch.where(drop >= 16, rbits << torch.clamp(drop - 16, min=0), rbits >> torch.clamp(16 - drop, min=0))
    low = (torch.ones_like(b) << drop) - 1
    normal_path = (mag + rfield) & ~low & M32
    sig = torch.where(ex == 0, torch.zeros_like(mag), (mag & 0x7FFFFF) | 0x800000)
    thresh = sig >> torch.clamp(102 - ex, min=0, max=31)               # floor(|x| * 2^48) for |x| < 2^-24
    tiny_path = torch.where((rbits << 8) < thresh, torch.full_like(b, 0x33800000), torch.zeros_like(b))
    out = torch.where(ex <= 102, tiny_path, normal_path) | sign
    out = torch.where(ex == 255, b, out)                               # inf and NaN pass through
    return _bits_to_f32(out)


def to_storage(x: torch.Tensor, dtype: torch.dtype, rbits: torch.Tensor | None = None) -> torch.Tensor:
    """Round a float32 tensor to the storage dtype: nearest-even, or stochastic when rbits is given."""
    if dtype == torch.float32:
        return x
    if dtype == torch.bfloat16:
        bits = rne_bf16_bits(x) if rbits is None else sr_bf16_bits(x, rbits)
        return bits_to_bf16(bits)
    if dtype == torch.float16:
        return (x if rbits is None else sr_fp16_value(x, rbits)).to(torch.float16)
    raise TypeError(f"unsupported storage dtype {dtype}")


def bits_to_bf16(bits: torch.Tensor) -> torch.Tensor:
    return (bits - ((bits >> 15) << 16)).to(torch.int16).view(torch.bfloat16)  # uint16 -> int16 two's complement


def round_trip(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Nearest-even rounding to dtype, returned as float32 (the value a stored weight would hold)."""
    return to_storage(x, dtype).to(torch.float32)


def storage_bits(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The storage bit pattern (int64, unsigned) of float32 values that are exactly representable in dtype."""
    if dtype == torch.float32:
        return _f32_to_bits(v)
    if dtype == torch.bfloat16:
        return _f32_to_bits(v) >> 16
    return v.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF


def storage_from_bits(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return _bits_to_f32(b)
    if dtype == torch.bfloat16:
        return _bits_to_f32(b << 16)
    return (b - ((b >> 15) << 16)).to(torch.int16).view(torch.float16).to(torch.float32)


def invert_rounding(w: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base a pass starts from when the weights w (float32 of stored values) carry the shift d = fl32(p*z):
    a storage value c with rne(c + d) == w, chosen by a fixed rule (docs/NOISE_SPEC.md, "Restore").

    c0 = rne(w - d) is the answer unless rounding lost a bit. Then two storage values map to w; the rule keeps the
    one with an even bit pattern, so a weight that has been moved once by a lost bit sits on an even value and every
    later ambiguous restore returns it exactly: drift stays bounded instead of random-walking."""
    y = w - d
    c0 = round_trip(y, dtype)
    b0 = storage_bits(c0, dtype)
    sign = 0x80000000 if dtype == torch.float32 else 0x8000
    mag_up = (y > c0) == (c0 > 0)
    b1 = torch.where(c0 == 0, torch.where(y < 0, sign | 1, 1), torch.where(mag_up, b0 + 1, b0 - 1))
    c1 = storage_from_bits(b1, dtype)
    wb = storage_bits(w, dtype)
    ok0 = storage_bits(round_trip(c0 + d, dtype), dtype) == wb
    ok1 = storage_bits(round_trip(c1 + d, dtype), dtype) == wb
    take1 = torch.isfinite(c0) & (y != c0) & ok1 & (~ok0 | ((b1 & 1) == 0))
    return torch.where(take1, c1, c0)


# ---------------------------------------------------------------- masks
MASK_NONE, MASK_THRESHOLD, MASK_BITMASK, MASK_ROWIDX = 0, 1, 2, 3
THRESH_EVAL, THRESH_LATCH_WRITE, THRESH_LATCH_READ = 0, 1, 2
OP_PERTURB, OP_UPDATE, OP_COPY, OP_UPDATE_PERTURB = 0, 1, 2, 3
ROUND_NEAREST, ROUND_STOCHASTIC = 0, 1


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Bit i of a packed mask is bit (i % 8) of byte i // 8 (numpy packbits bitorder='little')."""
    idx = torch.arange(n, dtype=torch.int64)
    return ((packed.to(torch.int64)[idx >> 3] >> (idx & 7)) & 1).bool()


def pack_bits(sel: torch.Tensor) -> torch.Tensor:
    n = sel.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.int64)
    padded[:n] = sel.reshape(-1).to(torch.int64)
    return (padded.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def selected_indices(theta: torch.Tensor, mask_kind: int, mask: torch.Tensor | None, row_len: int,
                     tau: float, threshold_mode: int) -> torch.Tensor:
    """Local flat indices of the selected elements, ascending."""
    n = theta.numel()
    if mask_kind == MASK_NONE:
        return torch.arange(n)
    if mask_kind == MASK_ROWIDX:
        rows, k = mask.shape
        flat = (torch.arange(rows).unsqueeze(1) * row_len + mask.to(torch.int64)).reshape(-1)
        return flat
    if mask_kind == MASK_THRESHOLD and threshold_mode != THRESH_LATCH_READ:
        sel = theta.reshape(-1).to(torch.float32).abs() < _f32(tau)
    else:
        sel = unpack_bits(mask, n)
    return sel.nonzero().reshape(-1)


def zo_apply_(params, outs, masks, meta, fvals, seeds, gs, op: int, dist: int, rounding: int,
              sr_seed: int, threshold_mode: int, scale: float, prior: float, lr: float) -> None:
    """The one kernel every backend implements (see docs/NOISE_SPEC.md, section "Ops").

    params/outs: lists of same-dtype contiguous tensors (outs is params for in-place ops)
    masks:       one tensor per param (uint8 packed bits / latch, int32 [rows, k] column indices, or empty)
    meta:        int64 [T, 4]: tensor_id, global_offset, mask_kind, row_len
    fvals:       float32 [T, 5]: scale_mult, lr_mult, weight_decay, g_mult, tau
    seeds:       uint64 seeds: seeds[0] perturbs/restores; seeds[1:] are the update directions
    gs:          float32 [len(seeds) - 1] projected gradients, one per update seed

    OP_UPDATE_PERTURB (in place only): seeds = [restore, update..., next]; the update with seeds[:-1], then the
    next ZO step's first perturbation rne(theta + scale * m * z(next)) (prior 0, the threshold latch written): one
    pass where a backend fuses the two, the same bits by definition.
    """
    if op == OP_UPDATE_PERTURB:
        if len(seeds) < 3:
            raise ValueError("op 3 (update then perturb) needs seeds [restore, update..., next]")
        if any(o is not p for o, p in zip(outs, params)):
            raise ValueError("op 3 (update then perturb) is in place only")
        zo_apply_(params, outs, masks, meta, fvals, list(seeds[:-1]), gs, OP_UPDATE, dist, rounding, sr_seed,
                  threshold_mode, 0.0, prior, lr)
        zo_apply_(params, outs, masks, meta, fvals, [seeds[-1]], gs, OP_PERTURB, dist, ROUND_NEAREST, 0,
                  THRESH_LATCH_WRITE, scale, 0.0, 0.0)
        return
    if any(t.device.type != "cpu" for t in list(params) + list(outs) + list(masks)):
        # the oracle computes on the host: run on host copies and write the results back
        hp = [t.detach().cpu() for t in params]
        ho = [h if o is t else o.detach().cpu() for h, o, t in zip(hp, outs, params)]
        hm = [m.cpu() for m in masks]
        zo_apply_(hp, ho, hm, meta, fvals, seeds, gs, op, dist, rounding, sr_seed, threshold_mode, scale, prior, lr)
        for dst, src in zip(outs, ho):
            dst.copy_(src)
        for dst, src in zip(masks, hm):
            dst.copy_(src)
        return
    meta = meta.cpu()
    fvals = fvals.cpu()
    gs = gs.detach().cpu().to(torch.float32)
    for t, (theta, out, mask) in enumerate(zip(params, outs, masks)):
        tid, offset, mask_kind, row_len = (int(v) for v in meta[t])
        scale_mult, lr_mult, wd, g_mult, tau = (fvals[t, j] for j in range(5))
        local = selected_indices(theta, mask_kind, mask, row_len, float(tau), threshold_mode)
        if mask_kind == MASK_THRESHOLD and threshold_mode == THRESH_LATCH_WRITE:
            sel = torch.zeros(theta.numel(), dtype=torch.bool)
            sel[local] = True
            mask.copy_(pack_bits(sel).to(mask.device))
        flat_in = theta.detach().reshape(-1)
        x = flat_in[local].to(torch.float32)
        gidx = local + offset
        s = _f32(scale) * scale_mult
        p = _f32(prior) * scale_mult
        dtype = theta.dtype
        z0 = noise(seeds[0], tid, gidx, dist)
        if op == OP_COPY:
            res = round_trip(x + s * z0, dtype)
            flat_out = out.reshape(-1)
            flat_out.copy_(flat_in)
            flat_out[local] = res.to(dtype)
            continue
        base = x if prior == 0.0 else invert_rounding(x, p * z0, dtype)
        if op == OP_PERTURB:
            res = to_storage(base + s * z0, dtype)
        else:
            acc = torch.zeros_like(base)
            for k in range(1, len(seeds)):
                gk = gs[k - 1] * g_mult
                acc = acc + gk * noise(seeds[k], tid, gidx, dist)
            step = acc + wd * base
            new = base - (_f32(lr) * lr_mult) * step
            rb = rounding_bits(sr_seed, tid, gidx) if (rounding == ROUND_STOCHASTIC and dtype != torch.float32) else None
            res = to_storage(new, dtype, rb)
        out.reshape(-1)[local] = res.to(dtype)
