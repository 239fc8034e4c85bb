// Noise specification v1 (see mazo_kernels/reference.py, the bit-exact oracle), for host and device.
//
// Every float operation is an explicitly IEEE-rounded float32 op (fmul/fadd/fsub/fsqrt below), in the
// order reference.py writes it. On the device these map to __fmul_rn/__fadd_rn/__fsub_rn/__fsqrt_rn, which
// the compiler never contracts into FMA; on the host the file must be compiled with -ffp-contract=off and
// without -ffast-math.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__)
#define MAZO_HD __host__ __device__ __forceinline__
#else
#define MAZO_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define MAZO_UNROLL _Pragma("unroll")
#else
#define MAZO_UNROLL
#endif

namespace mazo {

// ------------------------------------------------------------------ constants (spec v1)
constexpr uint32_t PHILOX_M0 = 0xD2511F53u, PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u, PHILOX_W1 = 0xBB67AE85u;

constexpr uint32_t STREAM_GAUSSIAN = 0, STREAM_RADEMACHER = 1, STREAM_ROUNDING = 2, STREAM_GAUSSIAN_FAST = 3;
constexpr int DIST_GAUSSIAN = 0, DIST_RADEMACHER = 1, DIST_GAUSSIAN_FAST = 2;  // gaussian_fast: spec v2
constexpr int MASK_NONE = 0, MASK_THRESHOLD = 1, MASK_BITMASK = 2, MASK_ROWIDX = 3;
constexpr int THRESH_EVAL = 0, THRESH_LATCH_WRITE = 1, THRESH_LATCH_READ = 2;
constexpr int OP_PERTURB = 0, OP_UPDATE = 1, OP_COPY = 2;
// update_ then the next step's first perturbation in one pass (reference.zo_apply_: the composition of the two).
// seeds = [restore, update..., next]; scale is the next perturbation's. Kernels fuse it where they can (the CUDA
// dense-only kernels, Triton's unmasked calls); elsewhere the host runs the two ops.
constexpr int OP_UPDATE_PERTURB = 3;
constexpr int ROUND_NEAREST = 0, ROUND_STOCHASTIC = 1;

// Exact float32 values of reference.py's constants (hex literals: no decimal parsing ambiguity).
// LOG_P2 = -2 * LOG_P (exact scaling).
#define MAZO_LOG_P2_0 -0x1.00005cp+1f
#define MAZO_LOG_P2_1 0x1.ffe978p-1f
#define MAZO_LOG_P2_2 -0x1.547658p-1f
#define MAZO_LOG_P2_3 0x1.03ad7ep-1f
#define MAZO_LOG_P2_4 -0x1.c6042ap-2f
#define MAZO_LOG_P2_5 0x1.2c4980p-2f
#define MAZO_SIN_P0 0x1.ffffd0p-1f
#define MAZO_SIN_P1 -0x1.553f7cp-3f
#define MAZO_SIN_P2 0x1.0b2018p-7f
#define MAZO_COS_P0 -0x1.fffff4p-2f
#define MAZO_COS_P1 0x1.554a60p-5f
#define MAZO_COS_P2 -0x1.6622b8p-10f
#define MAZO_TWO_LN2 0x1.62e430p+0f
#define MAZO_SQRT_HALF_BITS 0x3F3504F3u
#define MAZO_ANGLE_STEP 0x1.921fb6p-11f  /* float32(pi / 4096) */
#define MAZO_FAST_P0 0x1.3095fap-7f      /* spec v2 gaussian_fast: reference.FAST_P */
#define MAZO_FAST_P1 -0x1.b965dcp-25f
#define MAZO_FAST_P2 0x1.e44a34p-40f

// ------------------------------------------------------------------ exact float32 primitives
MAZO_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

MAZO_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

MAZO_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MAZO_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

MAZO_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

MAZO_HD float fsqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

MAZO_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32);
#endif
}

// ------------------------------------------------------------------ Philox4x32-10
struct U4 {
  uint32_t v[4];
};

MAZO_HD U4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += PHILOX_W0;
      k1 += PHILOX_W1;
    }
    const uint32_t hi0 = mulhi32(PHILOX_M0, c0), lo0 = PHILOX_M0 * c0;
    const uint32_t hi1 = mulhi32(PHILOX_M1, c2), lo1 = PHILOX_M1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  U4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// counter = (block lo, block hi, tensor_id, stream), key = (seed lo, seed hi)
MAZO_HD U4 philox_words(uint64_t seed, uint32_t tensor_id, uint64_t block, uint32_t stream) {
  return philox4x32_10((uint32_t)block, (uint32_t)(block >> 32), tensor_id, stream, (uint32_t)seed,
                       (uint32_t)(seed >> 32));
}

// ------------------------------------------------------------------ Box-Muller (one pair per 32-bit word)
// r = sqrt(-2 ln u), u = k * 2^-20, k = (w >> 12) + 1 in [1, 2^20].
MAZO_HD float box_muller_radius(uint32_t w) {
  const float k = (float)((w >> 12) + 1u);  // exact: <= 2^20
  const uint32_t bits = f2u(k);
  const uint32_t e = (bits - MAZO_SQRT_HALF_BITS) >> 23;  // 0 .. 20 (bits > SQRT_HALF_BITS)
  const float m = u2f(bits - (e << 23));
  const float t = fsub(m, 1.0f);
  float p = MAZO_LOG_P2_5;
  p = fadd(fmul(p, t), MAZO_LOG_P2_4);
  p = fadd(fmul(p, t), MAZO_LOG_P2_3);
  p = fadd(fmul(p, t), MAZO_LOG_P2_2);
  p = fadd(fmul(p, t), MAZO_LOG_P2_1);
  p = fadd(fmul(p, t), MAZO_LOG_P2_0);
  const float q = fadd(fmul((float)(int32_t)(20u - e), MAZO_TWO_LN2), fmul(t, p));
  return fsqrt(q);
}

// (cos, sin) of qd*pi/2 + x: qd = bits 10..11 of w, x = (2f - 1023) * pi/4096 with f = bits 0..9.
MAZO_HD void box_muller_angle(uint32_t w, float& c, float& s) {
  const uint32_t qd = (w >> 10) & 3u;
  const float x = fmul((float)(2 * (int32_t)(w & 0x3FFu) - 1023), MAZO_ANGLE_STEP);
  const float s2 = fmul(x, x);
  const float sin_x = fmul(fadd(fmul(fadd(fmul(MAZO_SIN_P2, s2), MAZO_SIN_P1), s2), MAZO_SIN_P0), x);
  const float cos_x = fadd(fmul(fadd(fmul(fadd(fmul(MAZO_COS_P2, s2), MAZO_COS_P1), s2), MAZO_COS_P0), s2), 1.0f);
  float cc = (qd & 1u) ? sin_x : cos_x;
  float ss = (qd & 1u) ? cos_x : sin_x;
  if (qd == 1u || qd == 2u) cc = -cc;
  if (qd >= 2u) ss = -ss;
  c = cc;
  s = ss;
}

// An "oct" o is the 8 elements with global indices 8o .. 8o+7: exactly one Philox call of streams 0 and 2.
// Noise of its lanes; only pairs with a lane in `lanes` (bit l = element 8o+l) are computed.
MAZO_HD void gaussian_oct(uint64_t seed, uint32_t tensor_id, uint64_t o, unsigned lanes, float z[8]) {
  const U4 w = philox_words(seed, tensor_id, o, STREAM_GAUSSIAN);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int pr = 0; pr < 4; ++pr) {
    if (lanes & (3u << (2 * pr))) {
      const float r = box_muller_radius(w.v[pr]);
      float c, s;
      box_muller_angle(w.v[pr], c, s);
      z[2 * pr] = fmul(r, c);
      z[2 * pr + 1] = fmul(r, s);
    }
  }
}

// Spec v2 gaussian_fast of one 16-bit value h: x = (h & 0xFF) + (h >> 8) - 255, z = x * ((P2 x^2 + P1) x^2 + P0).
// x is formed from the float bits 2^23 + byte sum (exact), which avoids an int -> float conversion instruction.
MAZO_HD float gaussian_fast_of_half(uint32_t h) {
  const float x = fsub(u2f(0x4B000000u + (h & 0xFFu) + ((h >> 8) & 0xFFu)), 8388863.0f);  // 2^23 + 255: exact
  const float t = fmul(x, x);
  return fmul(x, fadd(fmul(fadd(fmul(MAZO_FAST_P2, t), MAZO_FAST_P1), t), MAZO_FAST_P0));
}

// Element 8o + l: half l & 1 (low first) of word l >> 1 of call o of stream 3 (the stochastic-rounding layout).
// On the device both halves' byte sums come from one add, and each float 2^23 + sum from one byte permutation
// (the same exact value as gaussian_fast_of_half's). The integer work runs on the ALU pipe, which the restoring
// passes load about as much as instruction issue (bench/NOTES.md, session 15).
MAZO_HD void gaussian_fast_from_words(const U4& w, float z[8]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
  for (int pr = 0; pr < 4; ++pr) {
    const uint32_t v = w.v[pr];
    // (v & 0x00FF00FF) + ((v >> 8) & 0x00FF00FF): each half's two bytes summed (<= 510: no carry between halves)
    const uint32_t sum = __byte_perm(v, 0u, 0x4240u) + __byte_perm(v, 0u, 0x4341u);
    // 0x4B00 above a half's sum: the float 2^23 + sum
    const float x0 = fsub(u2f(__byte_perm(sum, 0x4B00u, 0x5410u)), 8388863.0f);
    const float x1 = fsub(u2f(__byte_perm(sum, 0x4B00u, 0x5432u)), 8388863.0f);
    const float t0 = fmul(x0, x0), t1 = fmul(x1, x1);
    z[2 * pr] = fmul(x0, fadd(fmul(fadd(fmul(MAZO_FAST_P2, t0), MAZO_FAST_P1), t0), MAZO_FAST_P0));
    z[2 * pr + 1] = fmul(x1, fadd(fmul(fadd(fmul(MAZO_FAST_P2, t1), MAZO_FAST_P1), t1), MAZO_FAST_P0));
  }
#else
  for (int pr = 0; pr < 4; ++pr) {
    z[2 * pr] = gaussian_fast_of_half(w.v[pr] & 0xFFFFu);
    z[2 * pr + 1] = gaussian_fast_of_half(w.v[pr] >> 16);
  }
#endif
}

// z[i] = 1 - 2 * bit: Philox call i // 128 of stream 1, word (i // 32) % 4, bit i % 32.
MAZO_HD void rademacher_oct(uint64_t seed, uint32_t tensor_id, uint64_t o, float z[8]) {
  const U4 w = philox_words(seed, tensor_id, o >> 4, STREAM_RADEMACHER);
  const uint32_t ws = (uint32_t)(o >> 2) & 3u;  // select without a dynamic index (keeps w in registers)
  const uint32_t word = ws == 0 ? w.v[0] : ws == 1 ? w.v[1] : ws == 2 ? w.v[2] : w.v[3];
  const unsigned sh = (unsigned)((o & 3u) << 3);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int l = 0; l < 8; ++l) z[l] = ((word >> (sh + l)) & 1u) ? -1.0f : 1.0f;
}

MAZO_HD void noise_oct(int dist, uint64_t seed, uint32_t tensor_id, uint64_t o, unsigned lanes, float z[8]) {
  if (dist == DIST_GAUSSIAN)
    gaussian_oct(seed, tensor_id, o, lanes, z);
  else if (dist == DIST_GAUSSIAN_FAST)
    gaussian_fast_from_words(philox_words(seed, tensor_id, o, STREAM_GAUSSIAN_FAST), z);
  else
    rademacher_oct(seed, tensor_id, o, z);
}

// Scalar forms (one element at global index i), for tests and simple callers.
MAZO_HD float gaussian(uint64_t seed, uint32_t tensor_id, uint64_t i) {
  const U4 w = philox_words(seed, tensor_id, i >> 3, STREAM_GAUSSIAN);
  const uint32_t pw = w.v[(i >> 1) & 3u];
  float c, s;
  box_muller_angle(pw, c, s);
  return fmul(box_muller_radius(pw), (i & 1u) ? s : c);
}

MAZO_HD float gaussian_fast(uint64_t seed, uint32_t tensor_id, uint64_t i) {
  const U4 w = philox_words(seed, tensor_id, i >> 3, STREAM_GAUSSIAN_FAST);
  return gaussian_fast_of_half((w.v[(i >> 1) & 3u] >> (16 * (i & 1u))) & 0xFFFFu);
}

MAZO_HD float rademacher(uint64_t seed, uint32_t tensor_id, uint64_t i) {
  const U4 w = philox_words(seed, tensor_id, i >> 7, STREAM_RADEMACHER);
  return ((w.v[(i >> 5) & 3u] >> (i & 31u)) & 1u) ? -1.0f : 1.0f;
}

// 16 stochastic-rounding bits of element 8o + l: word l >> 1 of call o of stream 2, half l & 1 (low half first).
MAZO_HD uint32_t rounding_bits_of(const U4& w, int l) { return (w.v[l >> 1] >> (16 * (l & 1))) & 0xFFFFu; }

MAZO_HD U4 rounding_words(uint64_t seed, uint32_t tensor_id, uint64_t o) {
  return philox_words(seed, tensor_id, o, STREAM_ROUNDING);
}

// ------------------------------------------------------------------ bf16
MAZO_HD uint32_t rne_bf16_bits(float x) {
  if (x != x) return 0x7FC0u;
  const uint32_t b = f2u(x);
  return ((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16) & 0xFFFFu;
}

MAZO_HD uint32_t sr_bf16_bits(float x, uint32_t rbits) {
  if (x != x) return 0x7FC0u;
  const uint32_t b = f2u(x);
  return ((b + rbits) >> 16) & 0xFFFFu;  // rbits: 16 random bits
}

MAZO_HD float bf16_bits_to_f32(uint32_t h) { return u2f(h << 16); }

// ------------------------------------------------------------------ fp16
// float32 -> fp16 round-to-nearest-even, bit-exact (NaN -> sign | 0x7E00, as torch's conversion), in integer ops.
MAZO_HD uint32_t f32_to_f16_rne_soft(float f) {
  const uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u);
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520: rounds to inf
  if (ax < 0x38800000u) {                         // below 2^-14: fp16 subnormal or zero
    if (ax < 0x33000000u) return sign;             // below 2^-25: rounds to zero
    const uint32_t e = ax >> 23;                   // 102 .. 112
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e;               // 14 .. 24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) r += 1u;
    return sign | r;
  }
  uint32_t h = (ax >> 13) - (112u << 10);
  const uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1u;
  return sign | h;
}

// The same on the device by the hardware: cvt.rn.f16.f32 is IEEE nearest-even (subnormals and overflow included),
// so it gives f32_to_f16_rne_soft's bits except for NaN (hardware 0x7FFF, spec sign | 0x7E00), fixed up here.
// bench/check_f16_cvt.cu compares the two over all 2^32 inputs on a GPU.
MAZO_HD uint32_t f32_to_f16_rne(float f) {
#if defined(__CUDA_ARCH__)
  const uint32_t x = f2u(f);
  const uint32_t hw = (uint32_t)__half_as_ushort(__float2half_rn(f));
  return (x & 0x7FFFFFFFu) > 0x7F800000u ? (((x >> 16) & 0x8000u) | 0x7E00u) : hw;
#else
  return f32_to_f16_rne_soft(f);
#endif
}

MAZO_HD float f16_bits_to_f32(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {
    if (m == 0) return u2f(sign);
    return u2f(sign | f2u(fmul((float)m, 0x1p-24f)));  // exact
  }
  if (e == 31) return u2f(sign | 0x7F800000u | (m << 13));
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

// Stochastic rounding to the fp16 grid with 16 random bits R; returns a float32 that converts to fp16 exactly.
MAZO_HD float sr_fp16_value(float x, uint32_t R) {
  const uint32_t b = f2u(x);
  const uint32_t sign = b & 0x80000000u, mag = b & 0x7FFFFFFFu, ex = mag >> 23;
  if (ex == 255u) return x;  // inf and NaN pass through
  uint32_t out;
  if (ex <= 102u) {          // |x| < 2^-24
    const uint32_t sig = ex == 0 ? 0u : ((mag & 0x7FFFFFu) | 0x800000u);
    uint32_t sh = 102u - ex;
    if (sh > 31u) sh = 31u;
    const uint32_t thresh = sig >> sh;  // floor(|x| * 2^48)
    out = (R << 8) < thresh ? 0x33800000u : 0u;
  } else {
    const uint32_t drop = 13u + (ex < 113u ? 113u - ex : 0u);  // 13 .. 23
    const uint32_t rfield = drop >= 16u ? (R << (drop - 16u)) : (R >> (16u - drop));
    const uint32_t low = (1u << drop) - 1u;
    out = (mag + rfield) & ~low;
  }
  return u2f(out | sign);
}

// ------------------------------------------------------------------ storage dtypes
constexpr int DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2;

template <int DT>
struct Storage;

template <>
struct Storage<DT_F32> {
  using bits_t = uint32_t;
  MAZO_HD static float to_f32(bits_t b) { return u2f(b); }
  MAZO_HD static bits_t rne(float x) { return f2u(x); }
  MAZO_HD static bits_t rne_not_nan(float x) { return f2u(x); }
  MAZO_HD static bits_t bits_of(float v) { return f2u(v); }
  MAZO_HD static bits_t sr(float x, uint32_t) { return f2u(x); }
};

template <>
struct Storage<DT_F16> {
  using bits_t = uint16_t;
  MAZO_HD static float to_f32(bits_t b) { return f16_bits_to_f32(b); }
  MAZO_HD static bits_t rne(float x) { return (bits_t)f32_to_f16_rne(x); }
  MAZO_HD static bits_t rne_not_nan(float x) { return (bits_t)f32_to_f16_rne(x); }
  MAZO_HD static bits_t bits_of(float v) { return (bits_t)f32_to_f16_rne(v); }
  MAZO_HD static bits_t sr(float x, uint32_t r) { return (bits_t)f32_to_f16_rne(sr_fp16_value(x, r)); }
};

template <>
struct Storage<DT_BF16> {
  using bits_t = uint16_t;
  MAZO_HD static float to_f32(bits_t b) { return bf16_bits_to_f32(b); }
  MAZO_HD static bits_t rne(float x) { return (bits_t)rne_bf16_bits(x); }
  // rne_bf16_bits without its NaN test (the sum never exceeds 0xFF807FFF: no carry out of 32 bits)
  MAZO_HD static bits_t rne_not_nan(float x) {
    const uint32_t b = f2u(x);
    return (bits_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  }
  MAZO_HD static bits_t bits_of(float v) { return (bits_t)(f2u(v) >> 16); }  // v a non-NaN bf16 value
  MAZO_HD static bits_t sr(float x, uint32_t r) { return (bits_t)sr_bf16_bits(x, r); }
};

// bf16 whose nearest-even rounding is the hardware conversion (cvt.rn.bf16.f32, IEEE nearest-even; its NaN replaced
// by the spec's 0x7FC0) instead of integer operations: the same bits for every float32 input, on the device
// (bench/check_bf16_cvt.cu checked all 2^32 on an H200: bench/results/h200_2026-12-01/s8_hw_bf16/). The CUDA
// extension's bf16 calls use it unless MAZO_CUDA_HW_BF16=0; elsewhere (host code, older GPUs) it is Storage<DT_BF16>.
constexpr int DT_BF16_HW = 3;

template <>
struct Storage<DT_BF16_HW> : Storage<DT_BF16> {
  MAZO_HD static bits_t rne(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return x != x ? (bits_t)0x7FC0u : (bits_t)r;
#else
    return Storage<DT_BF16>::rne(x);
#endif
  }
  MAZO_HD static bits_t rne_not_nan(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return (bits_t)r;
#else
    return Storage<DT_BF16>::rne_not_nan(x);
#endif
  }
};

// fp16 with the hardware conversions on the device (the CUDA extension's default; MAZO_CUDA_HW_F16=0 turns it
// off): float32 from the stored fp16 by cvt.f32.f16 and the roundings by cvt.rn.f16.f32, with no NaN fix-ups. Both
// give the spec's bits for every non-NaN value (bench/probe_cuda_leads.cu: all 65,536 fp16 patterns;
// bench/check_f16_cvt.cu: all 2^32 float32 inputs). The spec fixes a NaN's bits only for bf16 (0x7FC0,
// docs/NOISE_SPEC.md section 4); an fp16 or float32 NaN result is a NaN whose sign and payload are the platform's
// (the reference's are x86's, where arithmetic keeps a NaN operand's sign; the GPU's arithmetic returns 0x7FFFFFFF
// and its conversion 0x7FFF). No NaN weight's payload reaches a result anyway: every op computes on the float32
// value before it rounds, and unselected elements are copied as stored bits.
constexpr int DT_F16_HW = 4;

template <>
struct Storage<DT_F16_HW> : Storage<DT_F16> {
  MAZO_HD static float to_f32(bits_t b) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half((unsigned short)b));
#else
    return Storage<DT_F16>::to_f32(b);
#endif
  }
  MAZO_HD static bits_t rne_not_nan(float x) {
#if defined(__CUDA_ARCH__)
    return (bits_t)__half_as_ushort(__float2half_rn(x));
#else
    return Storage<DT_F16>::rne_not_nan(x);
#endif
  }
  MAZO_HD static bits_t rne(float x) { return rne_not_nan(x); }  // on the device a NaN becomes the hardware's 0x7FFF
  MAZO_HD static bits_t sr(float x, uint32_t r) { return rne_not_nan(sr_fp16_value(x, r)); }  // exact but for NaN
  MAZO_HD static bits_t bits_of(float v) { return rne_not_nan(v); }  // v a non-NaN fp16 value: exact
};

// The base a pass starts from when the stored value w carries the shift d = p*z (reference.invert_rounding and
// docs/NOISE_SPEC.md, "Restore"): c0 = rne(w - d), unless rounding lost a bit and two storage values map to w; then
// the one with the even bit pattern, so that a weight moved once by a lost bit is returned exactly ever after.
// fp16 through the hardware conversions, with no NaN test: a NaN y = w - d converts to a NaN c0, which is not finite
// and is returned (a NaN, as the spec asks of fp16; Storage<DT_F16_HW>). Every other conversion here equals the
// spec's on the device (cvt.rn.f16.f32 for every non-NaN float32: bench/check_f16_cvt.cu; cvt.f32.f16 for every
// non-NaN fp16: bench/probe_cuda_leads.cu). On the host the same structure runs on the spec's conversions, so
// bench/check_invert_rounding.cpp checks it for every fp16 value.
MAZO_HD float f16_to_f32_finite(uint32_t h) {  // a NaN pattern gives some NaN
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half((unsigned short)h));
#else
  return f16_bits_to_f32(h);
#endif
}

MAZO_HD float invert_rounding_f16_hw(float w, float d) {
  using S = Storage<DT_F16_HW>;  // rne_not_nan: the bare hardware rounding on the device
  const float y = fsub(w, d);
  const uint32_t b0 = S::rne_not_nan(y);
  const float c0 = f16_to_f32_finite(b0);
  // Selects, not a branch (the condition holds for most elements, and a branch per element cost the unit's
  // straight-line schedule): where c0 is not finite or y == c0 the values below are computed and discarded (b1 may
  // then be a NaN or wrapped pattern; its conversion is harmless).
  const uint32_t b1 = (f2u(y) > f2u(c0) ? b0 + 1u : b0 - 1u) & 0xFFFFu;
  const float c1 = f16_to_f32_finite(b1);
  const uint32_t wb = S::rne_not_nan(w);  // w finite where it matters (an infinite or NaN w gives a non-finite c0 or NaN y)
  const bool ok0 = S::rne_not_nan(fadd(c0, d)) == wb;
  const bool ok1 = S::rne_not_nan(fadd(c1, d)) == wb;
  const bool take1 = (f2u(c0) & 0x7F800000u) != 0x7F800000u && y != c0 && ok1 && (!ok0 || (b1 & 1u) == 0u);
  return take1 ? c1 : c0;
}

// bf16 through the hardware conversion, in float32 bit patterns (low 16 bits zero). c0 = rne(y) is y's truncation t
// or the next value up in magnitude, so its neighbour on y's side is the other one: c1 = 2t + 1 ulp - c0 (modulo
// 2^32, sign included; for c0 = +-0 the smallest subnormal with y's sign). A NaN y gives some NaN c0 (not finite:
// returned as it is); every caller rounds the base again, which maps each NaN to the spec's 0x7FC0, so the device
// conversion needs no NaN fix-up. Same results as the generic form below (bench/check_invert_rounding.cpp, every w).
MAZO_HD float invert_rounding_bf16_hw(float w, float d) {
  using S = Storage<DT_BF16_HW>;
  const float y = fsub(w, d);
  const uint32_t yb = f2u(y);
#if defined(__CUDA_ARCH__)
  const uint32_t c0b = (uint32_t)S::rne_not_nan(y) << 16;
#else
  const uint32_t c0b = (uint32_t)S::rne(y) << 16;  // the host's integer rounding needs the NaN fix-up
#endif
  const uint32_t c1b = 2u * (yb & 0xFFFF0000u) + 0x10000u - c0b;
  const float c0 = u2f(c0b), c1 = u2f(c1b);
  const uint32_t wb = f2u(w) >> 16;
  const bool ok0 = (uint32_t)S::rne_not_nan(fadd(c0, d)) == wb;
  const bool ok1 = (uint32_t)S::rne_not_nan(fadd(c1, d)) == wb;
  const bool take1 = (~c0b & 0x7F800000u) != 0u && y != c0 && ok1 && (!ok0 || (c1b & 0x10000u) == 0u);
  return take1 ? c1 : c0;
}

template <int DT>
MAZO_HD float invert_rounding(float w, float d) {
  if constexpr (DT == DT_F16_HW) return invert_rounding_f16_hw(w, d);
  if constexpr (DT == DT_BF16_HW) return invert_rounding_bf16_hw(w, d);
  using S = Storage<DT>;
  using bits_t = typename S::bits_t;
  const float y = fsub(w, d);
  const uint32_t b0 = S::rne(y);
  const float c0 = S::to_f32((bits_t)b0);
  if ((f2u(c0) & 0x7F800000u) == 0x7F800000u || y == c0) return c0;
  // From here w, y, c0 are finite and y != c0. Rounding keeps the sign (c0 = -0 for a tiny negative y), so y and
  // c0 share a sign and their float32 bit patterns, compared unsigned, order their magnitudes: b1 is the storage
  // neighbour of c0 on y's side. Nothing below can be NaN (c1 is at worst an infinity), and w is a storage value.
  // These are the spec's comparisons in fewer instructions (same results for every bf16 / fp16 w: bench/check_invert_rounding.cpp).
  const uint32_t b1 = f2u(y) > f2u(c0) ? b0 + 1u : b0 - 1u;
  const float c1 = S::to_f32((bits_t)b1);
  const uint32_t wb = S::bits_of(w);
  const bool ok0 = (uint32_t)S::rne_not_nan(fadd(c0, d)) == wb;
  const bool ok1 = (uint32_t)S::rne_not_nan(fadd(c1, d)) == wb;
  return (ok1 && (!ok0 || (b1 & 1u) == 0u)) ? c1 : c0;
}

}  // namespace mazo
