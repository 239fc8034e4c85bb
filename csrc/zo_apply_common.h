// The per-element work of zo_apply_ (reference.zo_apply_), shared by the CPU and CUDA backends.
//
// Work is split into units that the backends hand to threads:
//  * element units: 8 consecutive LOCAL elements (one mask byte), [8u, 8u + 8) of the tensor. A unit owns its
//    latch byte, so latch writes never race. Inside a unit the elements are processed by GLOBAL octs
//    (8-aligned global indices, one Philox call per oct and seed).
//  * entry units (row-index masks, ops other than COPY): 8 consecutive entries of the int32 [rows, k] table.
#pragma once

#include "zo_noise.h"
#include "zo_global_access.cuh"

namespace mazo {

constexpr int UNIT = 8;

// How a tensor's work is split (decided on the host from the mask tensor, without reading meta).
enum : int { WORK_ELEMENTS = 0, WORK_ENTRIES = 1 };

struct OpParams {
  int op, dist, rounding, threshold_mode;
  float scale, prior, lr;
  bool prior_nonzero;
  uint64_t seed0, sr_seed;
  int nupd;               // number of update seeds (seeds[1:], or seeds[1:-1] for OP_UPDATE_PERTURB)
  uint64_t seed_next;     // OP_UPDATE_PERTURB: the perturbation's seed (seeds[-1])
  const uint64_t* useeds; // the update seeds
  const float* gs;        // one projected gradient per update seed
  // Experiment (MAZO_CUDA_WHOLE_UNITS=1, CUDA only; off by default): a full masked unit (element unit or the
  // masked kernels' fast path) that selects some elements is stored whole, its unselected elements with their own loaded bits (one 16-byte store instead of one
  // 2-byte store per selected element). The values are the same; the spec's "unselected elements are never
  // written" is not, so it stays an opt-in measurement (bench/NOTES.md, session 12).
  bool whole_unit_store;
};

struct TensorParams {
  uint32_t tid;
  int64_t offset;
  int kind;
  int64_t row_len;
  float scale_mult, lr_mult, wd, g_mult, tau;
};

// Results (storage bits) of the lanes in `lanes` of global oct o (elements 8o .. 8o+7); x: current float32 values.
template <int DT>
MAZO_HD void compute_oct(const OpParams& P, const TensorParams& T, uint64_t o, unsigned lanes, const float x[8],
                         typename Storage<DT>::bits_t res[8]) {
  using S = Storage<DT>;
  float z0[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (P.op != OP_UPDATE || P.prior_nonzero) noise_oct(P.dist, P.seed0, T.tid, o, lanes, z0);
  if (P.op == OP_COPY) {
    const float s = fmul(P.scale, T.scale_mult);
    MAZO_UNROLL
    for (int l = 0; l < 8; ++l) res[l] = S::rne(fadd(x[l], fmul(s, z0[l])));
    return;
  }
  float base[8];
  if (P.prior_nonzero) {
    const float p = fmul(P.prior, T.scale_mult);
    MAZO_UNROLL
    for (int l = 0; l < 8; ++l) base[l] = invert_rounding<DT>(x[l], fmul(p, z0[l]));
  } else {
    MAZO_UNROLL
    for (int l = 0; l < 8; ++l) base[l] = x[l];
  }
  if (P.op == OP_PERTURB) {
    const float s = fmul(P.scale, T.scale_mult);
    MAZO_UNROLL
    for (int l = 0; l < 8; ++l) res[l] = S::rne(fadd(base[l], fmul(s, z0[l])));
    return;
  }
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int k = 0; k < P.nupd; ++k) {
    const float gk = fmul(P.gs[k], T.g_mult);
    float z[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (P.prior_nonzero && P.useeds[k] == P.seed0) {  // the usual ZO step: same noise as the restore (same bits)
      MAZO_UNROLL
      for (int l = 0; l < 8; ++l) z[l] = z0[l];
    } else {
      noise_oct(P.dist, P.useeds[k], T.tid, o, lanes, z);
    }
    MAZO_UNROLL
    for (int l = 0; l < 8; ++l) acc[l] = fadd(acc[l], fmul(gk, z[l]));
  }
  const float lrm = fmul(P.lr, T.lr_mult);
  float nw[8];
  MAZO_UNROLL
  for (int l = 0; l < 8; ++l) nw[l] = fsub(base[l], fmul(lrm, fadd(acc[l], fmul(T.wd, base[l]))));
  if (DT != DT_F32 && P.rounding == ROUND_STOCHASTIC) {
    const U4 rb = rounding_words(P.sr_seed, T.tid, o);
    MAZO_UNROLL
    for (int l = 0; l < 8; ++l) res[l] = S::sr(nw[l], rounding_bits_of(rb, l));
  } else {
    MAZO_UNROLL
    for (int l = 0; l < 8; ++l) res[l] = S::rne(nw[l]);
  }
}

// The lanes of local elements [i0, i0 + cnt) that a row-index mask selects. Per row the unit touches: one binary
// search for the first listed column >= the unit's first column there, then a walk along the row's sorted columns
// while they fall inside the unit (one search per unit instead of one per element). Columns outside [0, row_len)
// select nothing.
MAZO_HD unsigned rowidx_unit_sel(const int32_t* cols, int64_t k, int64_t row_len, int64_t i0, int cnt) {
  if (k <= 0 || row_len <= 0) return 0u;
  unsigned sel = 0;
  int j = 0;
  while (j < cnt) {
    const int64_t r = (i0 + j) / row_len;
    const int64_t c = i0 + j - r * row_len;
    const int64_t left = row_len - c;
    const int span = (int)(left < (int64_t)(cnt - j) ? left : (int64_t)(cnt - j));  // lanes of this unit in row r
    const int32_t* row = cols + r * k;
    int64_t lo = 0, hi = k;
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (row[mid] < c)
        lo = mid + 1;
      else
        hi = mid;
    }
    for (; lo < k && row[lo] < c + span; ++lo) sel |= 1u << (j + (int)(row[lo] - c));
    j += span;
  }
  return sel;
}

// Do the in-place ops run a row-index mask of k columns per row of row_len as element units (every element visited,
// coalesced, the selection by rowidx_unit_sel) rather than entry units (only the listed elements)? From 1/8 of a row
// on: there a 32-byte sector of bf16 holds two listed elements on average, so the entry walk touches most sectors
// anyway. (perturbed_copy always runs element units: it writes every element.)
MAZO_HD constexpr bool rowidx_as_elements(int64_t k, int64_t row_len) { return k * 8 >= row_len; }

template <int DT>
MAZO_HD void load_unit(const typename Storage<DT>::bits_t* p, int cnt, typename Storage<DT>::bits_t raw[UNIT]) {
  using bits_t = typename Storage<DT>::bits_t;
#if defined(__CUDA_ARCH__)
  if (cnt == UNIT && (reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    if (sizeof(bits_t) == 2) {
      const uint4 v = ld_global_u4(p);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
      for (int j = 0; j < 4; ++j) {
        raw[2 * j] = (bits_t)(w[j] & 0xFFFFu);
        raw[2 * j + 1] = (bits_t)(w[j] >> 16);
      }
    } else {
      const uint4 v0 = ld_global_u4(p), v1 = ld_global_u4(reinterpret_cast<const uint4*>(p) + 1);
      raw[0] = (bits_t)v0.x; raw[1] = (bits_t)v0.y; raw[2] = (bits_t)v0.z; raw[3] = (bits_t)v0.w;
      raw[4] = (bits_t)v1.x; raw[5] = (bits_t)v1.y; raw[6] = (bits_t)v1.z; raw[7] = (bits_t)v1.w;
    }
    return;
  }
#endif
  MAZO_UNROLL
  for (int j = 0; j < UNIT; ++j) raw[j] = j < cnt ? p[j] : (bits_t)0;
}

template <int DT>
MAZO_HD void store_unit(typename Storage<DT>::bits_t* p, int cnt, unsigned which,
                        const typename Storage<DT>::bits_t res[UNIT]) {
#if defined(__CUDA_ARCH__)
  using bits_t = typename Storage<DT>::bits_t;
  if (cnt == UNIT && which == 0xFFu && (reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    if (sizeof(bits_t) == 2) {
      uint4 v;
      v.x = (uint32_t)res[0] | ((uint32_t)res[1] << 16);
      v.y = (uint32_t)res[2] | ((uint32_t)res[3] << 16);
      v.z = (uint32_t)res[4] | ((uint32_t)res[5] << 16);
      v.w = (uint32_t)res[6] | ((uint32_t)res[7] << 16);
      st_global_u4(p, v);
    } else {
      st_global_u4(p, make_uint4(res[0], res[1], res[2], res[3]));
      st_global_u4(reinterpret_cast<uint4*>(p) + 1, make_uint4(res[4], res[5], res[6], res[7]));
    }
    return;
  }
#endif
  MAZO_UNROLL
  for (int j = 0; j < UNIT; ++j)
    if (j < cnt && ((which >> j) & 1u)) p[j] = res[j];
}

// One element unit: local elements [8u, 8u + 8) ∩ [0, n).
//   mask8: the packed mask / latch (kinds 1, 2); cols/k: the row-index table (kind 3: op COPY, or a dense mask).
// raw: the unit's stored values, already loaded (load_unit), so that a caller can prefetch the next unit.
template <int DT>
MAZO_HD void process_loaded_unit(const OpParams& P, const TensorParams& T, const typename Storage<DT>::bits_t raw[UNIT],
                                 typename Storage<DT>::bits_t* out, uint8_t* mask8, const int32_t* cols, int64_t k,
                                 int64_t n, int64_t u) {
  using S = Storage<DT>;
  using bits_t = typename S::bits_t;
  const int64_t i0 = u * UNIT;
  const int cnt = (int)((n - i0) < UNIT ? (n - i0) : UNIT);
  const unsigned valid = (1u << cnt) - 1u;
  float x[UNIT];
  MAZO_UNROLL
  for (int j = 0; j < UNIT; ++j) x[j] = S::to_f32(raw[j]);

  unsigned sel = valid;
  if (T.kind == MASK_THRESHOLD) {
    if (P.threshold_mode == THRESH_LATCH_READ) {
      sel = mask8[u] & valid;
    } else {
      sel = 0;
      MAZO_UNROLL
      for (int j = 0; j < UNIT; ++j)
        if (j < cnt && u2f(f2u(x[j]) & 0x7FFFFFFFu) < T.tau) sel |= 1u << j;
      if (P.threshold_mode == THRESH_LATCH_WRITE) mask8[u] = (uint8_t)sel;
    }
  } else if (T.kind == MASK_BITMASK) {
    sel = mask8[u] & valid;
  } else if (T.kind == MASK_ROWIDX) {
    sel = rowidx_unit_sel(cols, k, T.row_len, i0, cnt);
  }

  bits_t res[UNIT];
  MAZO_UNROLL
  for (int j = 0; j < UNIT; ++j) res[j] = raw[j];
  const int64_t g0 = T.offset + i0;
  if (sel && (g0 & 7) == 0) {  // the usual case: the unit is exactly one global oct (static indexing only)
    bits_t ro[8];
    compute_oct<DT>(P, T, (uint64_t)(g0 >> 3), sel, x, ro);
    MAZO_UNROLL
    for (int l = 0; l < 8; ++l)
      if ((sel >> l) & 1u) res[l] = ro[l];
  } else if (sel) {
    // offset not 8-aligned: the unit straddles two octs. Only xo/ro are indexed dynamically here, so res and x
    // stay in registers on the device.
    const int64_t oa = g0 >> 3;
    const unsigned sh = (unsigned)(g0 & 7);
    for (int h = 0; h < 2; ++h) {
      const unsigned lanes = h == 0 ? ((sel << sh) & 0xFFu) : (sel >> (8u - sh));
      if (!lanes) continue;
      float xo[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      MAZO_UNROLL
      for (int j = 0; j < UNIT; ++j) {
        const unsigned l = (unsigned)j + sh;  // lane in oct oa (l < 8) or oa + 1 (l >= 8)
        if (((sel >> j) & 1u) && (l >> 3) == (unsigned)h) xo[l & 7u] = x[j];
      }
      bits_t ro[8];
      compute_oct<DT>(P, T, (uint64_t)(oa + h), lanes, xo, ro);
      MAZO_UNROLL
      for (int j = 0; j < UNIT; ++j) {
        const unsigned l = (unsigned)j + sh;
        if (((sel >> j) & 1u) && (l >> 3) == (unsigned)h) res[j] = ro[l & 7u];
      }
    }
  }
  if (P.op == OP_COPY) {
    store_unit<DT>(out + i0, cnt, valid, res);
  } else if (sel) {
    store_unit<DT>(out + i0, cnt, P.whole_unit_store ? valid : sel, res);
  }
}

template <int DT>
MAZO_HD void process_element_unit(const OpParams& P, const TensorParams& T, const typename Storage<DT>::bits_t* in,
                                  typename Storage<DT>::bits_t* out, uint8_t* mask8, const int32_t* cols, int64_t k,
                                  int64_t n, int64_t u) {
  const int64_t i0 = u * UNIT;
  const int cnt = (int)((n - i0) < UNIT ? (n - i0) : UNIT);
  typename Storage<DT>::bits_t raw[UNIT];
  load_unit<DT>(in + i0, cnt, raw);
  process_loaded_unit<DT>(P, T, raw, out, mask8, cols, k, n, u);
}

// One entry unit of a row-index mask: entries [8u, 8u + 8) ∩ [0, rows * k). Not for op COPY; for sparse masks.
// Consecutive entries that fall in the same global oct share one compute_oct.
template <int DT>
MAZO_HD void process_entry_unit(const OpParams& P, const TensorParams& T, const typename Storage<DT>::bits_t* in,
                                typename Storage<DT>::bits_t* out, const int32_t* cols, int64_t k, int64_t nent,
                                int64_t u) {
  using S = Storage<DT>;
  using bits_t = typename S::bits_t;
  const int64_t e0 = u * UNIT;
  const int cnt = (int)((nent - e0) < UNIT ? (nent - e0) : UNIT);
  int64_t r = e0 / k;
  int64_t c_in_row = e0 - r * k;
  int64_t cur_o = -1;
  unsigned lanes = 0;
  float xo[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t loc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int j = 0; j <= cnt; ++j) {
    int64_t local = 0, o = -2;
    if (j < cnt) {
      local = r * T.row_len + (int64_t)cols[e0 + j];
      o = (T.offset + local) >> 3;
      if (++c_in_row == k) {
        c_in_row = 0;
        ++r;
      }
    }
    if (o != cur_o) {
      if (lanes) {
        bits_t ro[8];
        compute_oct<DT>(P, T, (uint64_t)cur_o, lanes, xo, ro);
        for (int l = 0; l < 8; ++l)
          if ((lanes >> l) & 1u) out[loc[l]] = ro[l];
      }
      lanes = 0;
      cur_o = o;
    }
    if (j < cnt) {
      const int l = (int)((T.offset + local) & 7);
      lanes |= 1u << l;
      xo[l] = S::to_f32(in[local]);
      loc[l] = local;
    }
  }
}

}  // namespace mazo
