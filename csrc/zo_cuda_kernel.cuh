// The CUDA kernel of mazo_C::zo_apply_ (one template), and the table of its instantiations for one storage type.
// Each csrc/zo_cuda_k_*.cu instantiates one storage type's kernels, so that the build compiles them in parallel
// (one file held all 55 and took most of a GPU session's build); csrc/zo_cuda.cu is the host side and picks one.
// Everything here is in an anonymous namespace: every translation unit has its own kernels, none shared.
#pragma once

#include <cstdint>

#include "zo_apply_common.h"
#include "zo_f32_exchange.cuh"

namespace mazo_cuda {
// One per storage kernel family (csrc/zo_cuda_k_*.cu): the kernel for spec (-1: the generic kernel; minb its blocks
// per SM where the family has a choice), or nullptr where the family has no such specialisation.
const void* kernels_bf16(int spec, int minb);
const void* kernels_bf16_hw(int spec, int minb);
const void* kernels_f16(int spec, int minb);
const void* kernels_f16_hw(int spec, int minb);
const void* kernels_f32(int spec, int minb);
const void* kernels_f32_xor(int spec, int minb);
}  // namespace mazo_cuda

namespace {

using namespace mazo;

constexpr int THREADS = 256;
constexpr int ITERS = 4;                            // units per thread per block
constexpr int64_t UNITS_PER_BLOCK = (int64_t)THREADS * ITERS;  // 8192 elements

struct Desc {
  const void* in;
  void* out;
  uint8_t* mask8;       // packed bits / latch (kinds 1, 2), else null
  const int32_t* cols;  // row-index table (kind 3), else null
  int64_t n;            // elements
  int64_t k;            // row-index: entries per row
  int64_t work_n;       // elements or entries this tensor's units cover
  int64_t units;
  int64_t block_start;  // first block of this tensor
  int32_t work;         // WORK_ELEMENTS or WORK_ENTRIES
  int32_t fast;         // unmasked elements, in/out 16-byte aligned: fast path when offset % 8 == 0
};

struct KArgs {
  OpParams P;
  const Desc* descs;
  const int64_t* meta;  // [T, 4]
  const float* fvals;   // [T, 5]
  const int64_t* seed_dev;  // null, or [nseeds + 1]: the seeds then sr_seed, read in place of P's values
  int nseeds;
  int T;
  int64_t total_blocks;
};

// ------------------------------------------------------------------ fast path
// Unmasked tensors whose global offset is 8-aligned and whose data is 16-byte aligned: every full unit is exactly
// one global oct, processed without lane masks from one 16-byte (bf16/fp16) or 32-byte (fp32) load and store.
// The arithmetic is the same header functions, in the same order, as compute_oct (same bits).
template <int DT>
__device__ __forceinline__ void fast_load(const typename Storage<DT>::bits_t* p, uint32_t raw[DT == DT_F32 ? 8 : 4]) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
  const uint4 v = ld_global_u4(q);
  raw[0] = v.x; raw[1] = v.y; raw[2] = v.z; raw[3] = v.w;
  if (DT == DT_F32) {
    const uint4 v1 = ld_global_u4(q + 1);
    raw[DT == DT_F32 ? 4 : 0] = v1.x; raw[DT == DT_F32 ? 5 : 1] = v1.y;
    raw[DT == DT_F32 ? 6 : 2] = v1.z; raw[DT == DT_F32 ? 7 : 3] = v1.w;
  }
}

template <int DT>
__device__ __forceinline__ void fast_unpack(const uint32_t* raw, float x[8]) {
  using S = Storage<DT>;
  if (DT == DT_F32) {
#pragma unroll
    for (int l = 0; l < 8; ++l) x[l] = u2f(raw[l]);
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    x[2 * j] = S::to_f32((typename S::bits_t)(raw[j] & 0xFFFFu));
    x[2 * j + 1] = S::to_f32((typename S::bits_t)(raw[j] >> 16));
  }
}

template <int DT>
__device__ __forceinline__ void fast_store(typename Storage<DT>::bits_t* p, const typename Storage<DT>::bits_t res[8]) {
  uint4* q = reinterpret_cast<uint4*>(p);
  if (DT == DT_F32) {
    st_global_u4(q, make_uint4((uint32_t)res[0], (uint32_t)res[1], (uint32_t)res[2], (uint32_t)res[3]));
    st_global_u4(q + 1, make_uint4((uint32_t)res[4], (uint32_t)res[5], (uint32_t)res[6], (uint32_t)res[7]));
  } else {
    st_global_u4(q, make_uint4((uint32_t)res[0] | ((uint32_t)res[1] << 16), (uint32_t)res[2] | ((uint32_t)res[3] << 16),
                               (uint32_t)res[4] | ((uint32_t)res[5] << 16), (uint32_t)res[6] | ((uint32_t)res[7] << 16)));
  }
}

__device__ __forceinline__ void gaussian_from_words(const U4& w, float z[8]) {
#pragma unroll
  for (int pr = 0; pr < 4; ++pr) {
    const float r = box_muller_radius(w.v[pr]);
    float c, s;
    box_muller_angle(w.v[pr], c, s);
    z[2 * pr] = fmul(r, c);
    z[2 * pr + 1] = fmul(r, s);
  }
}

// This lane's share of the warp's Rademacher Philox calls (one call covers 16 units; lanes hold them in the order
// rademacher_from_warp reads them) for a block whose first unit is global oct o_base.
__device__ __forceinline__ U4 rademacher_warp_words(uint64_t seed, const TensorParams& T, uint64_t o_base) {
  const unsigned lane = threadIdx.x & 31u, jj = lane % (3u * ITERS);
  const uint64_t o_first = o_base + (uint64_t)((jj / 3u) * THREADS + (threadIdx.x & ~31u));
  return philox_words(seed, T.tid, (o_first >> 4) + (jj % 3u), STREAM_RADEMACHER);
}

// Gaussian z0 of oct o from this lane's own Philox call (v1 or gaussian_fast).
__device__ __forceinline__ void gaussian_z0(const OpParams& P, uint64_t seed, const TensorParams& T, uint64_t o,
                                            float z0[8]) {
  if (P.dist == DIST_GAUSSIAN_FAST)
    gaussian_fast_from_words(philox_words(seed, T.tid, o, STREAM_GAUSSIAN_FAST), z0);
  else
    gaussian_from_words(philox_words(seed, T.tid, o, STREAM_GAUSSIAN), z0);
}

// Rademacher z0 of unit o in iteration it: the warp's lanes hold the Philox calls of its units (rw, one call per 16
// units); every lane of the warp must call this (shuffles).
__device__ __forceinline__ void rademacher_from_warp(const U4& rw, int it, uint64_t o, uint64_t o_base, float z0[8]) {
  const uint64_t o0 = o_base + (uint64_t)(it * THREADS + (threadIdx.x & ~31u));
  const int src = it * 3 + (int)((o >> 4) - (o0 >> 4));
  const uint32_t w0 = __shfl_sync(0xFFFFFFFFu, rw.v[0], src);
  const uint32_t w1 = __shfl_sync(0xFFFFFFFFu, rw.v[1], src);
  const uint32_t w2 = __shfl_sync(0xFFFFFFFFu, rw.v[2], src);
  const uint32_t w3 = __shfl_sync(0xFFFFFFFFu, rw.v[3], src);
  const uint32_t ws = (uint32_t)(o >> 2) & 3u;
  const uint32_t word = ws == 0 ? w0 : ws == 1 ? w1 : ws == 2 ? w2 : w3;
  const unsigned sh = (unsigned)((o & 3u) << 3);
#pragma unroll
  for (int l = 0; l < 8; ++l) z0[l] = ((word >> (sh + l)) & 1u) ? -1.0f : 1.0f;
}

// Element l of a loaded unit, as storage bits.
template <int DT>
__device__ __forceinline__ typename Storage<DT>::bits_t raw_elem(const uint32_t* raw, int l) {
  if (DT == DT_F32) return (typename Storage<DT>::bits_t)raw[l];
  return (typename Storage<DT>::bits_t)((raw[l >> 1] >> (16 * (l & 1))) & 0xFFFFu);
}

// The selection of one full unit u, as process_loaded_unit makes it (the threshold latch byte written in
// THRESH_LATCH_WRITE); kind none selects all eight.
__device__ __forceinline__ unsigned fast_unit_sel(const OpParams& P, const TensorParams& T, uint8_t* mask8, int64_t u,
                                                  const float x[8]) {
  if (T.kind == MASK_BITMASK || (T.kind == MASK_THRESHOLD && P.threshold_mode == THRESH_LATCH_READ))
    return mask8[u];
  if (T.kind != MASK_THRESHOLD) return 0xFFu;
  unsigned sel = 0;
#pragma unroll
  for (int l = 0; l < 8; ++l)
    if (u2f(f2u(x[l]) & 0x7FFFFFFFu) < T.tau) sel |= 1u << l;
  if (P.threshold_mode == THRESH_LATCH_WRITE) mask8[u] = (uint8_t)sel;
  return sel;
}

// ------------------------------------------------------------------ row-index masks in the masked kernel
// A row-index mask (int32 [rows, k]: sorted, distinct columns in [0, row_len) per row, as masks.RowIndexMask
// validates) read as a selection of the block's units: the block's threads stream the table entries that can fall in
// the block's elements once, coalesced, and set one bit per entry that does in a shared-memory bitmap of the block's
// 8192 elements (never in device memory); each unit then reads its byte. Before, every unit ran its own binary search
// over its row (rowidx_unit_sel: ~13 dependent loads per unit).
// Which entries can fall in the block needs no search: in a row of sorted distinct columns, at most row_len - c
// columns are >= c, so the first entry >= c is at index >= c - (row_len - k), and the first entry >= c' at index
// <= min(c', k). The block's entries lie in [ra * k + max(0, ca - (row_len - k)), rb * k + min(cb, k)) for its first
// element (row ra, column ca) and its end (row rb, column cb in (0, row_len]): exactly its entries where the block
// starts and ends at row boundaries, a superset elsewhere (each entry is tested against the block's range anyway).

constexpr int ROWIDX_BATCH = 8;  // table entries per thread loaded before any is used (loads in flight)

// The block's full units [ub, ub + nunits) as bits (bit 8 * (u - ub) + l for element l of unit u) in sel_bits;
// bounds: 3 int64 of shared scratch. Every thread of the block calls it (barriers).
__device__ __forceinline__ void rowidx_block_bits(const Desc& d, const TensorParams& T, int64_t ub, int64_t full,
                                                  uint32_t* sel_bits, int64_t* bounds) {
  const int64_t nunits = full - ub < UNITS_PER_BLOCK ? full - ub : UNITS_PER_BLOCK;
  const int64_t e0 = ub * UNIT, span = nunits * UNIT;
  const int64_t k = d.k, row_len = T.row_len;
  const bool any = nunits > 0 && k > 0 && row_len > 0 && d.cols != nullptr;  // block-uniform
  __syncthreads();  // the previous block of this loop has read its bits
  for (int w = threadIdx.x; w < UNITS_PER_BLOCK / 4; w += THREADS) sel_bits[w] = 0u;
  if (any && threadIdx.x == 0) {
    const int64_t ra = e0 / row_len, ca = e0 - ra * row_len;
    const int64_t rb = (e0 + span - 1) / row_len, cb = e0 + span - rb * row_len;
    const int64_t skip = ca - (row_len - k);
    bounds[0] = ra * k + (skip > 0 ? skip : 0);
    bounds[1] = rb * k + (cb < k ? cb : k);
    bounds[2] = ra;
  }
  __syncthreads();
  if (!any) return;
  const int64_t first = bounds[0], last = bounds[1];
  int64_t r = bounds[2];  // the row of this thread's entry: only grows
  for (int64_t e_batch = first + threadIdx.x; e_batch < last; e_batch += (int64_t)THREADS * ROWIDX_BATCH) {
    int32_t c[ROWIDX_BATCH];
#pragma unroll
    for (int j = 0; j < ROWIDX_BATCH; ++j) {
      const int64_t e = e_batch + (int64_t)j * THREADS;
      c[j] = e < last ? __ldg(d.cols + e) : -1;
    }
#pragma unroll
    for (int j = 0; j < ROWIDX_BATCH; ++j) {
      const int64_t e = e_batch + (int64_t)j * THREADS;
      if (e >= last) break;
      while (e >= (r + 1) * k) ++r;
      const int64_t pos = r * row_len + c[j] - e0;
      if (c[j] >= 0 && c[j] < row_len && pos >= 0 && pos < span) atomicOr(&sel_bits[pos >> 5], 1u << (pos & 31));
    }
  }
  __syncthreads();
}

// Store a full unit: whole when every element is selected (or for perturbed_copy, whose unselected elements are the
// input's, or with P.whole_unit_store), else only the selected elements (unselected ones are never written).
template <int DT>
__device__ __forceinline__ void fast_store_masked(const OpParams& P, typename Storage<DT>::bits_t* p, unsigned sel,
                                                  const uint32_t* raw, typename Storage<DT>::bits_t res[8]) {
  if (sel == 0xFFu) {
    fast_store<DT>(p, res);
    return;
  }
  if (P.op == OP_COPY || P.whole_unit_store) {
#pragma unroll
    for (int l = 0; l < 8; ++l)
      if (!((sel >> l) & 1u)) res[l] = raw_elem<DT>(raw, l);
    fast_store<DT>(p, res);
    return;
  }
#pragma unroll
  for (int l = 0; l < 8; ++l)
    if ((sel >> l) & 1u) p[l] = res[l];
}

// The fast paths' block that ends a tensor whose length is not a multiple of 8: its last, partial unit as an element
// unit.
template <int DT>
__device__ __forceinline__ void partial_tail_unit(const OpParams& P, const TensorParams& T, const Desc& d,
                                                  const typename Storage<DT>::bits_t* in,
                                                  typename Storage<DT>::bits_t* out, int64_t ub, int64_t full) {
  if (ub + UNITS_PER_BLOCK <= full) return;
  for (int it = 0; it < ITERS; ++it) {
    const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
    if (u >= full && u < d.units) process_element_unit<DT>(P, T, in, out, d.mask8, d.cols, d.k, d.n, u);
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// Two float32 values rounded to a 16-bit storage type (DT_BF16_HW, DT_F16_HW) by one conversion, lo in the low half:
// cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32, the same nearest-even rounding as the scalar conversions the spec's checks
// compared (bench/check_bf16_cvt.cu, check_f16_cvt.cu); a NaN becomes the hardware's 0x7FFF.
template <int DT>
__device__ __forceinline__ uint32_t cvt_rn_x2(float lo, float hi) {
  uint32_t w;
  if constexpr (DT == DT_BF16_HW)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
}

// A unit's four packed 16-bit words as its eight storage values (low half first).
template <int DT>
__device__ __forceinline__ void split_words(const uint32_t w[4], typename Storage<DT>::bits_t res[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    res[2 * j] = (typename Storage<DT>::bits_t)(w[j] & 0xFFFFu);
    res[2 * j + 1] = (typename Storage<DT>::bits_t)(w[j] >> 16);
  }
}
#endif

// Eight float32 values rounded to the storage type (S::rne of each). 16-bit types through the hardware conversions
// (DT_BF16_HW, DT_F16_HW): two values per conversion (cvt_rn_x2). fp16 needs nothing more (a NaN stays the hardware's NaN: Storage<DT_F16_HW>). bf16 NaNs convert to 0x7FFF where the
// spec has 0x7FC0, so a unit that holds one (never, for finite weights) takes the scalar roundings; one test per
// unit: a half h of a packed word is a NaN iff (h & 0x7FFF) + 0x7F carries into bit 15 (bf16 NaNs lie above 0x7F80;
// no carry crosses the halves).
template <int DT>
__device__ __forceinline__ void rne8(const float v[8], typename Storage<DT>::bits_t res[8]) {
  using S = Storage<DT>;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (DT == DT_BF16_HW || DT == DT_F16_HW) {
    uint32_t w[4], nan = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      w[j] = cvt_rn_x2<DT>(v[2 * j], v[2 * j + 1]);
      if (DT == DT_BF16_HW) nan |= (w[j] & 0x7FFF7FFFu) + 0x007F007Fu;
    }
    if (DT == DT_BF16_HW && (nan & 0x80008000u) != 0u) {  // both paths give packed words: one merge, no repacking
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = (uint32_t)S::rne(v[2 * j]) | ((uint32_t)S::rne(v[2 * j + 1]) << 16);
    }
    split_words<DT>(w, res);
    return;
  }
#endif
#pragma unroll
  for (int l = 0; l < 8; ++l) res[l] = S::rne(v[l]);
}

// Eight float32 values rounded stochastically to the storage type with the unit's rounding bits (S::sr of each).
// bf16 (DT_BF16_HW): (bits + R) >> 16 of two values packed by one byte permute. A NaN must become 0x7FC0 (the add
// would carry a NaN into another pattern), so a unit whose values hold a NaN (their float sum is NaN: a test on the
// FMA pipe, once per unit: the ALU pipe is as loaded as issue in the restoring passes) takes the scalar roundings.
template <int DT>
__device__ __forceinline__ void sr8(const float v[8], const U4& rb, typename Storage<DT>::bits_t res[8]) {
  using S = Storage<DT>;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (DT == DT_BF16_HW) {
    float sum = fadd(fadd(fadd(v[0], v[1]), fadd(v[2], v[3])), fadd(fadd(v[4], v[5]), fadd(v[6], v[7])));
    uint32_t w[4];
    if (sum == sum) {  // no NaN among the eight (an infinite sum is fine: infinities round like any other value)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        w[j] = __byte_perm(f2u(v[2 * j]) + (rb.v[j] & 0xFFFFu), f2u(v[2 * j + 1]) + (rb.v[j] >> 16), 0x7632u);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        w[j] = (uint32_t)S::sr(v[2 * j], rb.v[j] & 0xFFFFu) | ((uint32_t)S::sr(v[2 * j + 1], rb.v[j] >> 16) << 16);
    }
    split_words<DT>(w, res);
    return;
  }
#endif
#pragma unroll
  for (int l = 0; l < 8; ++l) res[l] = S::sr(v[l], rounding_bits_of(rb, l));
}

// invert_rounding<DT> of a loaded unit's eight values (x, shifted by d): the same operations in the same order, with
// the 16-bit roundings two per conversion (cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32 round each half as the scalar
// conversions do) and the stored value's bits taken from the loaded words (raw) instead of rounding x again.
// ok0 / ok1 compare both halves of a packed rounding with the packed stored word at once.
// SMALL_SHIFT: the caller guarantees |d| < 2^103 for bf16, |d| < 8 for fp16 (|z| <= 5.27 for every distribution:
// reference.py; the kernels check |prior * scale_mult| per tensor: small_shift). Then the finite test cannot
// change a result and is left out (two ALU instructions per element of the ~26 in the restoring passes, whose ALU
// pipe is about as loaded as issue). It matters only where c0 is infinite or NaN and c1 rounds to the stored bits:
// - x finite, c0 = +-inf: y = x - d beyond the largest finite value by half an ulp, i.e. |d| >= 2^119 (bf16) or 16
//   (fp16): excluded.
// - x = +-inf: y = x, c0 = x; bf16's c1 is then a NaN pattern, fp16's the largest finite value (y == c0, and
//   c1 + d rounds to a finite value for |d| < 16): neither rounds to the stored infinity.
// - x NaN: y is the canonical NaN, c0 a NaN; bf16's c1 is -0, so c1 + d rounds to a finite pattern (never the stored
//   NaN's); fp16's c1 is a NaN pattern and may be taken: a NaN base either way, and every op's result from a NaN
//   base is the hardware's NaN (fp16 NaN bits are not fixed by the spec: docs/NOISE_SPEC.md section 4).
// python_tests/test_small_shift_restore.py checks this for every 16-bit stored pattern against 814 shifts below the
// bounds, with the device's arithmetic emulated (and finds a difference far past them); the special-values GPU test
// runs the small-shift path on infinities, NaNs, subnormals and the largest values.
template <int DT, bool SMALL_SHIFT = false>
__device__ __forceinline__ void invert8(const uint32_t* raw, const float x[8], const float d[8], float base[8]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (DT == DT_BF16_HW || DT == DT_F16_HW) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float y[2], c0[2], c1[2];
      uint32_t b0[2], b1[2];
      y[0] = fsub(x[2 * j], d[2 * j]);
      y[1] = fsub(x[2 * j + 1], d[2 * j + 1]);
      const uint32_t cy = cvt_rn_x2<DT>(y[0], y[1]);
      if constexpr (DT == DT_BF16_HW) {
        // invert_rounding_bf16_hw, in float32 bit patterns: c1 = 2t + 1 ulp - c0 (t: y truncated to bf16)
        b0[0] = cy << 16;
        b0[1] = cy & 0xFFFF0000u;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          b1[h] = 2u * (f2u(y[h]) & 0xFFFF0000u) + 0x10000u - b0[h];
          c0[h] = u2f(b0[h]);
          c1[h] = u2f(b1[h]);
        }
      } else {
        // invert_rounding_f16_hw: storage bits, the neighbour of c0 on y's side
        b0[0] = cy & 0xFFFFu;
        b0[1] = cy >> 16;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          c0[h] = f16_to_f32_finite(b0[h]);
          b1[h] = (f2u(y[h]) > f2u(c0[h]) ? b0[h] + 1u : b0[h] - 1u) & 0xFFFFu;
          c1[h] = f16_to_f32_finite(b1[h]);
        }
      }
      // rne(c0 + d) and rne(c1 + d) of both halves
      const uint32_t r0 = cvt_rn_x2<DT>(fadd(c0[0], d[2 * j]), fadd(c0[1], d[2 * j + 1]));
      const uint32_t r1 = cvt_rn_x2<DT>(fadd(c1[0], d[2 * j]), fadd(c1[1], d[2 * j + 1]));
      const uint32_t e0 = r0 ^ raw[j], e1 = r1 ^ raw[j];  // zero halves: rounds to the stored value
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool ok0 = h == 0 ? (e0 & 0xFFFFu) == 0u : e0 < 0x10000u;
        const bool ok1 = h == 0 ? (e1 & 0xFFFFu) == 0u : e1 < 0x10000u;
        const bool finite = SMALL_SHIFT || (DT == DT_BF16_HW ? (~b0[h] & 0x7F800000u) != 0u
                                                             : (f2u(c0[h]) & 0x7F800000u) != 0x7F800000u);
        const bool even1 = DT == DT_BF16_HW ? (b1[h] & 0x10000u) == 0u : (b1[h] & 1u) == 0u;
        const bool take1 = finite && y[h] != c0[h] && ok1 && (!ok0 || even1);
        base[2 * j + h] = take1 ? c1[h] : c0[h];
      }
    }
    return;
  }
#endif
#pragma unroll
  for (int l = 0; l < 8; ++l) base[l] = invert_rounding<DT>(x[l], d[l]);
}

// compute_oct with all eight lanes selected and z0 given: the noise of the pass's seed, or for update_ with prior 0
// and Rademacher noise the noise of its first update seed (unused for Gaussian update_ with prior 0).
// ONE_SEED (the dense-only and masked kernels): the host sends them only update_ calls with one update seed, which
// with a prior is the restored one (seed0); u0 / g0 are that seed and its projected gradient (read once per kernel;
// were there none, g0 = 0 would make acc +0, as after no iteration). The update is then straight-line code: no loop
// over the seeds, no loads of them per unit, and a unit's noise and rounding can be scheduled with its neighbours'.
template <int DT, bool ONE_SEED = false, bool SMALL_SHIFT = false>
__device__ __forceinline__ void fast_oct(const OpParams& P, const TensorParams& T, uint64_t o, const uint32_t* raw,
                                         const float x[8], const float z0[8], typename Storage<DT>::bits_t res[8],
                                         uint64_t u0 = 0, float g0 = 0.f) {
  using S = Storage<DT>;
  if (P.op == OP_COPY) {
    const float s = fmul(P.scale, T.scale_mult);
    float v[8];
#pragma unroll
    for (int l = 0; l < 8; ++l) v[l] = fadd(x[l], fmul(s, z0[l]));
    rne8<DT>(v, res);
    return;
  }
  float base[8];
  if (P.prior_nonzero) {
    const float p = fmul(P.prior, T.scale_mult);
    float pz[8];
#pragma unroll
    for (int l = 0; l < 8; ++l) pz[l] = fmul(p, z0[l]);
    invert8<DT, SMALL_SHIFT>(raw, x, pz, base);
  } else {
#pragma unroll
    for (int l = 0; l < 8; ++l) base[l] = x[l];
  }
  if (P.op == OP_PERTURB) {
    const float s = fmul(P.scale, T.scale_mult);
    float v[8];
#pragma unroll
    for (int l = 0; l < 8; ++l) v[l] = fadd(base[l], fmul(s, z0[l]));
    rne8<DT>(v, res);
    return;
  }
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if constexpr (ONE_SEED) {
    const float gk = fmul(g0, T.g_mult);
    float z[8];
    if (P.prior_nonzero || P.dist == DIST_RADEMACHER) {  // z0 is the update seed's noise (see the loop below)
#pragma unroll
      for (int l = 0; l < 8; ++l) z[l] = z0[l];
    } else {
      noise_oct(P.dist, u0, T.tid, o, 0xFFu, z);
    }
#pragma unroll
    for (int l = 0; l < 8; ++l) acc[l] = fadd(acc[l], fmul(gk, z[l]));
  }
  for (int k = 0; k < (ONE_SEED ? 0 : P.nupd); ++k) {
    const float gk = fmul(P.gs[k], T.g_mult);
    float z[8];
    // z0 is this seed's noise: the restored noise's seed (prior != 0), or the first update seed (prior 0, Rademacher)
    if (P.prior_nonzero ? P.useeds[k] == P.seed0 : (k == 0 && P.dist == DIST_RADEMACHER)) {
#pragma unroll
      for (int l = 0; l < 8; ++l) z[l] = z0[l];
    } else {
      noise_oct(P.dist, P.useeds[k], T.tid, o, 0xFFu, z);
    }
#pragma unroll
    for (int l = 0; l < 8; ++l) acc[l] = fadd(acc[l], fmul(gk, z[l]));
  }
  const float lrm = fmul(P.lr, T.lr_mult);
  float nw[8];
#pragma unroll
  for (int l = 0; l < 8; ++l) nw[l] = fsub(base[l], fmul(lrm, fadd(acc[l], fmul(T.wd, base[l]))));
  if (DT != DT_F32 && P.rounding == ROUND_STOCHASTIC) {
    sr8<DT>(nw, rounding_words(P.sr_seed, T.tid, o), res);
  } else {
#pragma unroll
    rne8<DT>(nw, res);
  }
}

// A bound on the shift a restoring pass undoes (p = prior * scale_mult, |z| <= 5.27 for every distribution) under
// which invert8's finite test cannot change a result (SMALL_SHIFT, see invert8): |p| < 2^100 (bf16), |p| < 1 (fp16).
__device__ __forceinline__ bool small_shift(int dt, float p) {
  return fabsf(p) < (dt == DT_BF16_HW ? 0x1p100f : dt == DT_F16_HW ? 1.f : 0.f);
}

// One block of a dense-only kernel (every unit whole, 16-byte aligned, unmasked; every block of those kernels runs
// here, the restoring passes' tensors past small_shift out of line below): the four units' loads first,
// then each unit's noise, op and store. The block's units past the tensor's end (its last block only) load and
// compute its last unit and store nothing, so that the four units are straight-line code (no branch between them:
// the Philox key schedule is computed once for all four, not once per unit).
template <int DT, int SPEC, bool ONE_SEED, bool SMALL_SHIFT>
__device__ __forceinline__ void dense_units(const OpParams& P_, const TensorParams& T,
                                            const typename Storage<DT>::bits_t* in, typename Storage<DT>::bits_t* out,
                                            int64_t ub, int64_t full, bool need_z0, uint64_t z0_seed, uint64_t u0,
                                            float g0) {
  OpParams P = P_;  // SPEC's fields as constants here too (the out-of-line copy gets P_ from memory)
  P.op = SPEC / 8;
  P.prior_nonzero = (SPEC & 4) != 0;
  P.dist = SPEC & 3;
  constexpr int RW16 = 4;  // 32-bit words per unit (16-bit storage: the dense-only kernels' types)
  uint32_t raw[ITERS][4];
  const uint64_t o_base = (uint64_t)(T.offset >> 3) + (uint64_t)ub;  // global oct of the block's first unit
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
    fast_load<DT>(in + (u < full ? u : full - 1) * UNIT, raw[it]);
  }
  // OP_UPDATE_PERTURB: after the update, the next step's perturbation of the updated unit (reference.zo_apply_:
  // perturb_ with prior 0 on the stored result, so the result is converted back from its storage bits first)
  constexpr bool NEXT = SPEC / 8 == OP_UPDATE_PERTURB;
  U4 rw, rwn;
  if (P.dist == DIST_RADEMACHER && need_z0) rw = rademacher_warp_words(z0_seed, T, o_base);
  if (NEXT && P.dist == DIST_RADEMACHER) rwn = rademacher_warp_words(P.seed_next, T, o_base);
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
    const uint64_t o = o_base + (uint64_t)(it * THREADS + threadIdx.x);
    float z0[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (P.dist == DIST_RADEMACHER) {
      if (need_z0) rademacher_from_warp(rw, it, o, o_base, z0);
    } else if (need_z0) {
      gaussian_z0(P, z0_seed, T, o, z0);
    }
    float x[8];
    fast_unpack<DT>(raw[it], x);
    typename Storage<DT>::bits_t res[8];
    fast_oct<DT, ONE_SEED, SMALL_SHIFT>(P, T, o, raw[it], x, z0, res, u0, g0);
    if constexpr (NEXT) {
      float zn[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (P.dist == DIST_RADEMACHER)
        rademacher_from_warp(rwn, it, o, o_base, zn);
      else
        gaussian_z0(P, P.seed_next, T, o, zn);
      uint32_t words[RW16];
#pragma unroll
      for (int j = 0; j < RW16; ++j) words[j] = (uint32_t)res[2 * j] | ((uint32_t)res[2 * j + 1] << 16);
      float w[8], v[8];
      fast_unpack<DT>(words, w);
      const float s = fmul(P.scale, T.scale_mult);
#pragma unroll
      for (int l = 0; l < 8; ++l) v[l] = fadd(w[l], fmul(s, zn[l]));
      rne8<DT>(v, res);
    }
    if (u < full) fast_store<DT>(out + u * UNIT, res);
  }
}

// The same for a tensor whose shift is not small_shift: out of line, so that the rarely taken general restore's
// registers do not weigh on the kernel's.
template <int DT, int SPEC, bool ONE_SEED>
__device__ __noinline__ void dense_units_general(const OpParams& P, const TensorParams& T,
                                                 const typename Storage<DT>::bits_t* in,
                                                 typename Storage<DT>::bits_t* out, int64_t ub, int64_t full,
                                                 bool need_z0, uint64_t z0_seed, uint64_t u0, float g0) {
  dense_units<DT, SPEC, ONE_SEED, false>(P, T, in, out, ub, full, need_z0, z0_seed, u0, g0);
}

// SPEC: -1 for the generic kernel (op, distribution and "prior != 0" read at run time), else spec_of(op, prior, dist)
// (dist in the low two bits):
// the same code with those three fixed at compile time, so every branch on them folds away and each instantiation
// holds only its own path's registers (the generic kernel's 126-128 registers left 16 warps per SM: latency-bound).
constexpr int spec_of(int op, bool prior_nonzero, int dist) { return op * 8 + (prior_nonzero ? 4 : 0) + dist; }

// MIN_BLOCKS: blocks per SM the register budget must allow (2: 128 registers; 3: 80; 4: 64). Same bits either way;
// which one a call gets: see the launch below.
// MASKED: the kernel for calls with threshold, packed-bit or row-index masks (specialisations only, see
// masked_kernel_of):
// every 16-byte aligned tensor, masked or not, takes a fast path one unit at a time with the unit's selection;
// a separate instantiation, so the dense kernels keep their registers.
// DENSE: the kernel for calls whose caller promised (dense_aligned) that every tensor is unmasked at an 8-aligned
// global offset, and whose tensors the host found 16-byte aligned and a multiple of 8 long: only the fast path is
// compiled in (no masks, tails or unaligned units), so the light passes fit 40 registers (6 blocks per SM) where the
// kernels that carry those paths need 64. A block that finds the promise broken stops the kernel (__trap).
template <int DT, int MIN_BLOCKS = 2, int SPEC = -1, bool F32_XOR = false, bool MASKED = false, bool DENSE = false>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) zo_apply_kernel(KArgs a) {
  using bits_t = typename Storage<DT>::bits_t;
  OpParams P = a.P;
  if (SPEC >= 0) {  // the host launches a specialisation only for calls that have these values
    P.op = SPEC / 8;
    P.prior_nonzero = (SPEC & 4) != 0;
    P.dist = SPEC & 3;
  }
  if (a.seed_dev != nullptr) {  // seeds in device memory (a captured graph replays with new ones)
    P.seed0 = (uint64_t)a.seed_dev[0];
    P.sr_seed = (uint64_t)a.seed_dev[a.nseeds];
    P.useeds = reinterpret_cast<const uint64_t*>(a.seed_dev + 1);
    if (P.op == OP_UPDATE_PERTURB) P.seed_next = (uint64_t)a.seed_dev[a.nseeds - 1];
  }
  constexpr int RW = DT == DT_F32 ? 8 : 4;  // 32-bit words per unit
  // z0, the noise the fast paths compute once per unit (Rademacher: once per 16 units, shared through the warp): the
  // pass's seed, or for update_ with prior 0 and Rademacher noise its first update seed (fast_oct reuses it for
  // k = 0: one Philox call per 16 units instead of one per unit). Gaussian update_ with prior 0 computes its noise in
  // the update loop: computed ahead, on an H200 it ran 0.95x (bench/results/h200_2026-12-02/s14/call3).
  const bool z0_first_update = P.op == OP_UPDATE && !P.prior_nonzero && P.dist == DIST_RADEMACHER;
  const bool need_z0 = P.op != OP_UPDATE || P.prior_nonzero || (z0_first_update && P.nupd > 0);
  const uint64_t z0_seed = z0_first_update ? (P.nupd > 0 ? P.useeds[0] : 0) : P.seed0;
  // update_ with one update seed, which with a prior is the restored one (the ZO step's update): the seed and its
  // gradient read once, and fast_oct's straight-line update (ONE_SEED). The dense-only and masked kernels run only
  // such update_ calls (the host checks; the others run the specialisations with the seed loop).
  constexpr bool ONE_SEED = DENSE || MASKED;
  const bool upd = P.op == OP_UPDATE || P.op == OP_UPDATE_PERTURB;
  const uint64_t u0 = ONE_SEED && upd && P.nupd > 0 ? P.useeds[0] : 0;
  const float g0 = ONE_SEED && upd && P.nupd > 0 ? P.gs[0] : 0.f;
  int lo_prev = 0;  // b only grows, so the tensor of the next block is lo_prev or a later one
  for (int64_t b = blockIdx.x; b < a.total_blocks; b += gridDim.x) {
    // last tensor whose block_start <= b (empty tensors own no block); usually still lo_prev (one load)
    int lo = lo_prev, hi = a.T - 1;
    if (lo < hi && a.descs[lo + 1].block_start > b) hi = lo;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (a.descs[mid].block_start <= b)
        lo = mid;
      else
        hi = mid - 1;
    }
    lo_prev = lo;
    const Desc& d = a.descs[lo];
    TensorParams T;
    const int64_t* mp = a.meta + 4 * (int64_t)lo;
    const float* fp = a.fvals + 5 * (int64_t)lo;
    T.tid = (uint32_t)(uint64_t)mp[0];
    T.offset = mp[1];
    T.kind = (int)mp[2];
    T.row_len = mp[3];
    T.scale_mult = fp[0];
    T.lr_mult = fp[1];
    T.wd = fp[2];
    T.g_mult = fp[3];
    T.tau = fp[4];
    if constexpr (DENSE) {
      if (T.kind != MASK_NONE || (T.offset & 7) != 0) __trap();  // dense_aligned promised, and broken
    }
    if (d.work == WORK_ELEMENTS) {
      if ((T.kind == MASK_THRESHOLD && P.threshold_mode != THRESH_EVAL) || T.kind == MASK_BITMASK) {
        if (d.mask8 == nullptr) continue;  // malformed call: nothing safe to do
      }
    }
    const int64_t ub = (b - d.block_start) * UNITS_PER_BLOCK;
    const bits_t* in = reinterpret_cast<const bits_t*>(d.in);
    bits_t* out = reinterpret_cast<bits_t*>(d.out);
    if constexpr (MASKED) {
      if (d.fast && (T.offset & 7) == 0) {  // block-uniform
        const int64_t full = d.n >> 3;
        const uint64_t o_base = (uint64_t)(T.offset >> 3) + (uint64_t)ub;
        __shared__ uint32_t rowidx_bits[UNITS_PER_BLOCK / 4];
        __shared__ int64_t rowidx_bounds[3];
        const bool rowidx = T.kind == MASK_ROWIDX;  // block-uniform
        if (rowidx) rowidx_block_bits(d, T, ub, full, rowidx_bits, rowidx_bounds);
        U4 rw;
        if (P.dist == DIST_RADEMACHER && need_z0) rw = rademacher_warp_words(z0_seed, T, o_base);
        const bool small = small_shift(DT, fmul(P.prior, T.scale_mult));
        // 16-bit storage: every unit's words (and mask byte) loaded before any unit is stored, so a thread has ITERS
        // loads in flight. Loaded in the loop below, each unit's load waited for the previous unit's store: the
        // passes are in place, and the compiler may not move a load above a store to memory it cannot tell apart.
        constexpr bool PRELOAD = DT != DT_F32 && SPEC >= 0 && (SPEC & 4) != 0;
        const bool reads_byte = T.kind == MASK_BITMASK ||
                                (T.kind == MASK_THRESHOLD && P.threshold_mode == THRESH_LATCH_READ);  // block-uniform
        uint32_t raws[ITERS][RW];
        unsigned bytes[ITERS];
        if constexpr (PRELOAD) {
#pragma unroll
          for (int it = 0; it < ITERS; ++it) {
            const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
            if (u < full) {
              fast_load<DT>(in + u * UNIT, raws[it]);
              if (reads_byte) bytes[it] = d.mask8[u];
            }
          }
        }
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
          const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
          const uint64_t o = o_base + (uint64_t)(it * THREADS + threadIdx.x);
          uint32_t raw_here[RW];
          uint32_t* raw = PRELOAD ? raws[it] : raw_here;
          if (!PRELOAD && u < full) fast_load<DT>(in + u * UNIT, raw);
          float z0[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          if (P.dist == DIST_RADEMACHER && need_z0) rademacher_from_warp(rw, it, o, o_base, z0);
          if (u >= full) continue;
          float x[8];
          fast_unpack<DT>(raw, x);
          const int lu = it * THREADS + (int)threadIdx.x;  // the unit's place in the block
          const unsigned sel = rowidx                ? (rowidx_bits[lu >> 2] >> ((lu & 3) * 8)) & 0xFFu
                               : PRELOAD && reads_byte ? bytes[it]
                                                       : fast_unit_sel(P, T, d.mask8, u, x);
          if (sel == 0 && P.op != OP_COPY) continue;  // nothing selected: nothing written
          if (P.dist != DIST_RADEMACHER && need_z0) gaussian_z0(P, z0_seed, T, o, z0);
          bits_t res[8];
          if constexpr (SPEC >= 0 && (SPEC & 4) != 0 && (DT == DT_BF16_HW || DT == DT_F16_HW)) {
            if (small)  // block-uniform: the restore without its finite test (invert8's SMALL_SHIFT)
              fast_oct<DT, ONE_SEED, true>(P, T, o, raw, x, z0, res, u0, g0);
            else
              fast_oct<DT, ONE_SEED>(P, T, o, raw, x, z0, res, u0, g0);
          } else {
            fast_oct<DT, ONE_SEED>(P, T, o, raw, x, z0, res, u0, g0);
          }
          fast_store_masked<DT>(P, out + u * UNIT, sel, raw, res);
        }
        partial_tail_unit<DT>(P, T, d, in, out, ub, full);
        continue;
      }
    }
    if constexpr (DENSE) {  // every block: dense_units
      if constexpr ((SPEC & 4) != 0) {  // the restoring passes: the small-shift restore where it holds
        if (small_shift(DT, fmul(P.prior, T.scale_mult)))  // block-uniform (one tensor per block)
          dense_units<DT, SPEC, ONE_SEED, true>(P, T, in, out, ub, d.n >> 3, need_z0, z0_seed, u0, g0);
        else
          dense_units_general<DT, SPEC, ONE_SEED>(P, T, in, out, ub, d.n >> 3, need_z0, z0_seed, u0, g0);
      } else {
        dense_units<DT, SPEC, ONE_SEED, false>(P, T, in, out, ub, d.n >> 3, need_z0, z0_seed, u0, g0);
      }
      continue;
    }
    if (!MASKED && d.fast && T.kind == MASK_NONE && (T.offset & 7) == 0) {  // block-uniform
      const int64_t full = d.n >> 3;  // units holding 8 elements
      const uint64_t o_base = (uint64_t)(T.offset >> 3) + (uint64_t)ub;  // global oct of the block's first unit
      uint32_t raw[ITERS][RW];
      constexpr bool XOR = DT == DT_F32 && F32_XOR;
      // block-uniform: every unit of the block is full (so every warp takes part in the exchanges)
      const bool xor_block = XOR && ub + UNITS_PER_BLOCK <= full;
      const int64_t warp0 = (int64_t)(threadIdx.x & ~31u);
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {  // all loads first: ITERS units in flight per thread
        const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
        if constexpr (XOR) {  // csrc/zo_f32_exchange.cuh
          if (xor_block) {
            xor_load(reinterpret_cast<const uint4*>(in) + 2 * (ub + (int64_t)it * THREADS + warp0), raw[it]);
            continue;
          }
        }
        if (u < full) fast_load<DT>(in + u * UNIT, raw[it]);
      }
      U4 rw;  // Rademacher: this lane's Philox call, shared through the warp (one call covers 16 units)
      if (P.dist == DIST_RADEMACHER && need_z0) rw = rademacher_warp_words(z0_seed, T, o_base);
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
        const uint64_t o = o_base + (uint64_t)(it * THREADS + threadIdx.x);
        if constexpr (XOR) {
          if (xor_block) xor_exchange_in(raw[it]);  // before any lane leaves the iteration
        }
        float z0[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (P.dist == DIST_RADEMACHER) {
          if (need_z0) rademacher_from_warp(rw, it, o, o_base, z0);
          if (u >= full) continue;
        } else {
          if (u >= full) continue;
          if (need_z0) gaussian_z0(P, z0_seed, T, o, z0);
        }
        float x[8];
        fast_unpack<DT>(raw[it], x);
        bits_t res[8];
        fast_oct<DT, ONE_SEED>(P, T, o, raw[it], x, z0, res, u0, g0);
        if constexpr (XOR) {
          if (xor_block) {
            xor_store(reinterpret_cast<uint4*>(out) + 2 * (ub + (int64_t)it * THREADS + warp0), res);
            continue;
          }
        }
        fast_store<DT>(out + u * UNIT, res);
      }
      partial_tail_unit<DT>(P, T, d, in, out, ub, full);
      continue;
    }
    for (int it = 0; it < ITERS; ++it) {
      const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
      if (u >= d.units) break;
      if (d.work == WORK_ELEMENTS)
        process_element_unit<DT>(P, T, in, out, d.mask8, d.cols, d.k, d.n, u);
      else
        process_entry_unit<DT>(P, T, in, out, d.cols, d.k, d.work_n, u);
    }
  }
}

// Blocks per SM each specialisation's register budget is cut to (__launch_bounds__). Left alone, ptxas gives them
// 90-147 registers (2 blocks per SM); these caps are the most blocks without spills or with a few dozen bytes
// (ptxas -v for sm_90, bench/NOTES.md): 16-bit passes without a prior other than update_ (perturb_,
// perturbed_copy) 64 registers (4 blocks, 32 warps per SM), the restoring passes and update_ 80 (3 blocks); fp32
// holds twice the data per unit.
constexpr int spec_minblocks(int dt, int spec) {
  return dt == DT_F32 ? (spec / 8 == OP_UPDATE ? 2 : 3) : (spec / 8 != OP_UPDATE && (spec & 4) == 0 ? 4 : 3);
}

template <int DT, int SPEC, bool XOR>
const void* spec_kernel_of() {
  // the fp32 exchange spills at 3 blocks' 80 registers (ptxas: 150-250 B); 2 blocks keep 64 KB per SM in flight
  return (const void*)zo_apply_kernel<DT, XOR ? 2 : spec_minblocks(DT, SPEC), SPEC, XOR>;
}

// gaussian_fast (spec v2) is specialised only for the default storage kernels (bf16 and fp16 with the hardware
// conversions, fp32 with and without the exchange): each distribution costs a dozen kernels of build time.
constexpr bool has_fast_gaussian_spec(int dt) { return dt == DT_BF16_HW || dt == DT_F16_HW || dt == DT_F32; }

// The transient mode's passes (perturbed_copy, update_ with prior 0) are specialised for the default storage
// kernels without the fp32 exchange (the kernels a default call of those ops runs).
constexpr bool has_transient_spec(int dt, bool xor_) { return !xor_ && has_fast_gaussian_spec(dt); }

// The specialised passes of one distribution: perturb_ with prior 0 and with a prior, the restoring update_; for
// the transient mode also perturbed_copy and update_ with prior 0.
template <int DT, bool XOR, int DIST>
const void* spec_kernel_dist(int spec) {
  switch (spec) {
    case spec_of(OP_PERTURB, false, DIST): return spec_kernel_of<DT, spec_of(OP_PERTURB, false, DIST), XOR>();
    case spec_of(OP_PERTURB, true, DIST): return spec_kernel_of<DT, spec_of(OP_PERTURB, true, DIST), XOR>();
    case spec_of(OP_UPDATE, true, DIST): return spec_kernel_of<DT, spec_of(OP_UPDATE, true, DIST), XOR>();
  }
  if constexpr (has_transient_spec(DT, XOR)) {
    switch (spec) {
      case spec_of(OP_COPY, false, DIST): return spec_kernel_of<DT, spec_of(OP_COPY, false, DIST), XOR>();
      case spec_of(OP_UPDATE, false, DIST): return spec_kernel_of<DT, spec_of(OP_UPDATE, false, DIST), XOR>();
    }
  }
  return nullptr;
}

// spec | MASKED_SPEC: the masked kernel of that specialisation (default storage kernels without the exchange only).
constexpr int MASKED_SPEC = 32;

template <int DT, int SPEC>
const void* masked_kernel_of() {
  return (const void*)zo_apply_kernel<DT, spec_minblocks(DT, SPEC), SPEC, false, true>;
}

template <int DT, int DIST>
const void* masked_kernel_dist(int spec) {
  switch (spec) {
    case spec_of(OP_PERTURB, false, DIST): return masked_kernel_of<DT, spec_of(OP_PERTURB, false, DIST)>();
    case spec_of(OP_PERTURB, true, DIST): return masked_kernel_of<DT, spec_of(OP_PERTURB, true, DIST)>();
    case spec_of(OP_UPDATE, true, DIST): return masked_kernel_of<DT, spec_of(OP_UPDATE, true, DIST)>();
    case spec_of(OP_COPY, false, DIST): return masked_kernel_of<DT, spec_of(OP_COPY, false, DIST)>();
    case spec_of(OP_UPDATE, false, DIST): return masked_kernel_of<DT, spec_of(OP_UPDATE, false, DIST)>();
  }
  return nullptr;
}

// spec | DENSE_SPEC: the dense-only kernel of that specialisation (16-bit default storage kernels only).
constexpr int DENSE_SPEC = 64;

// Blocks per SM of the dense-only kernels: the most whose register budget ptxas (-v, sm_90) meets without spills
// (or 4-8 bytes: bf16 v1 Gaussian and Rademacher light passes), once the generic paths are gone: the light passes
// (perturb_ with prior 0, perturbed_copy) 40 registers (6 blocks); perturb_ with a prior 64 (4). fp16 v1 Gaussian's
// light passes keep 64 (6 blocks spill 136 B, 5 blocks 20 B); the other fp16 light passes 48 (5 blocks): without
// the NaN branches their units overlap, and at 40 registers they spilled 8-36 B. update_ (one seed, straight-line):
// 4 blocks with a prior (63-64 registers), 5 without (47-48), no spills.
// update then perturb (op 3, restoring): update_'s 4 blocks (64 registers; bf16 no spills, fp16 4-8 bytes).
constexpr int dense_minblocks(int dt, int spec) {
  if (spec / 8 == OP_UPDATE) return (spec & 4) ? 4 : 5;
  if (spec / 8 == OP_UPDATE_PERTURB) return 4;
  const bool light = (spec & 4) == 0;
  return light ? (dt == DT_F16_HW ? ((spec & 3) == DIST_GAUSSIAN ? 4 : 5) : 6) : 4;
}

constexpr bool has_dense_spec(int dt, bool xor_) { return !xor_ && (dt == DT_BF16_HW || dt == DT_F16_HW); }

// The dense-only kernels kept: those an H200 ran faster than the kernels with the generic paths, in one process
// over LLaMA-7B's list (MAZO_CUDA_DENSE=0 against the default; bench/results/h200_2026-12-02/s14/call2): perturb_
// and perturbed_copy with gaussian_fast and Rademacher noise (1.02-1.13x), perturb_ with a prior (1.01-1.08x); and
// update_ with one update seed (ONE_SEED), with and without a prior, gaussian_fast and Rademacher (1.08-1.22x,
// bf16 and fp16; s16/call1). Not kept: v1 Gaussian perturb_ with prior 0 and perturbed_copy (0.97-0.98x); v1
// Gaussian update_ (with its seed loop 0.95-1.03x in session 14; not built with ONE_SEED, for build time). Those
// calls run the specialisations.
template <int DT, int DIST>
const void* dense_kernel_dist(int spec) {
#define MAZO_DENSE_CASE(OP, PRIOR) \
  case spec_of(OP, PRIOR, DIST):   \
    return (const void*)zo_apply_kernel<DT, dense_minblocks(DT, spec_of(OP, PRIOR, DIST)), spec_of(OP, PRIOR, DIST), \
                                        false, false, true>;
  switch (spec) {
    MAZO_DENSE_CASE(OP_PERTURB, true)
  }
  if constexpr (DIST != DIST_GAUSSIAN) {
    switch (spec) {
      MAZO_DENSE_CASE(OP_PERTURB, false)
      MAZO_DENSE_CASE(OP_COPY, false)
      MAZO_DENSE_CASE(OP_UPDATE, true)
      MAZO_DENSE_CASE(OP_UPDATE, false)
      MAZO_DENSE_CASE(OP_UPDATE_PERTURB, true)
    }
  }
#undef MAZO_DENSE_CASE
  return nullptr;
}

// One storage kernel family: the generic kernel (spec -1) or a specialisation (nullptr where there is none).
template <int DT, bool XOR>
const void* kernel_table(int spec, int minb) {
  if (spec >= 0 && (spec & DENSE_SPEC)) {
    if constexpr (has_dense_spec(DT, XOR)) {
      switch (spec & 3) {
        case DIST_GAUSSIAN: return dense_kernel_dist<DT, DIST_GAUSSIAN>(spec & ~DENSE_SPEC);
        case DIST_RADEMACHER: return dense_kernel_dist<DT, DIST_RADEMACHER>(spec & ~DENSE_SPEC);
        case DIST_GAUSSIAN_FAST: return dense_kernel_dist<DT, DIST_GAUSSIAN_FAST>(spec & ~DENSE_SPEC);
      }
    }
    return nullptr;
  }
  if (spec >= 0 && (spec & MASKED_SPEC)) {
    if constexpr (has_transient_spec(DT, XOR)) {
      switch (spec & 3) {
        case DIST_GAUSSIAN: return masked_kernel_dist<DT, DIST_GAUSSIAN>(spec & ~MASKED_SPEC);
        case DIST_RADEMACHER: return masked_kernel_dist<DT, DIST_RADEMACHER>(spec & ~MASKED_SPEC);
        case DIST_GAUSSIAN_FAST: return masked_kernel_dist<DT, DIST_GAUSSIAN_FAST>(spec & ~MASKED_SPEC);
      }
    }
    return nullptr;
  }
  if (spec < 0) {
    if constexpr (XOR) {
      return (const void*)zo_apply_kernel<DT, 2, -1, true>;
    } else {
      if constexpr (DT == DT_BF16) {
        if (minb == 3) return (const void*)zo_apply_kernel<DT_BF16, 3>;
      }
      return (const void*)zo_apply_kernel<DT>;
    }
  }
  switch (spec & 3) {
    case DIST_GAUSSIAN: return spec_kernel_dist<DT, XOR, DIST_GAUSSIAN>(spec);
    case DIST_RADEMACHER: return spec_kernel_dist<DT, XOR, DIST_RADEMACHER>(spec);
    case DIST_GAUSSIAN_FAST:
      if constexpr (has_fast_gaussian_spec(DT)) return spec_kernel_dist<DT, XOR, DIST_GAUSSIAN_FAST>(spec);
      return nullptr;
  }
  return nullptr;
}

}  // namespace
