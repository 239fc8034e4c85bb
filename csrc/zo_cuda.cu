// CUDA backend of mazo_C::zo_apply_: one kernel launch per call, for any number of tensors.
// Build with --fmad=false (the float ops also use __fmul_rn/__fadd_rn, which are never contracted).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "zo_f32_exchange.cuh"
#include "zo_host_common.h"

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
  const uint4 v = q[0];
  raw[0] = v.x; raw[1] = v.y; raw[2] = v.z; raw[3] = v.w;
  if (DT == DT_F32) {
    const uint4 v1 = q[1];
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
  if constexpr (DT == DT_F16_HW) {
    // NaN patterns are the only fp16 values whose hardware conversion differs from the spec's: one packed test per
    // word (HSET2), and the per-element NaN select of Storage<DT_F16_HW>::to_f32 only for a unit that holds one.
    uint32_t nan = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __half2 t = __hisnan2(*reinterpret_cast<const __half2*>(&raw[j]));
      nan |= *reinterpret_cast<const uint32_t*>(&t);
    }
    if (nan == 0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        x[2 * j] = __half2float(__ushort_as_half((unsigned short)(raw[j] & 0xFFFFu)));
        x[2 * j + 1] = __half2float(__ushort_as_half((unsigned short)(raw[j] >> 16)));
      }
      return;
    }
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
    q[0] = make_uint4((uint32_t)res[0], (uint32_t)res[1], (uint32_t)res[2], (uint32_t)res[3]);
    q[1] = make_uint4((uint32_t)res[4], (uint32_t)res[5], (uint32_t)res[6], (uint32_t)res[7]);
  } else {
    q[0] = make_uint4((uint32_t)res[0] | ((uint32_t)res[1] << 16), (uint32_t)res[2] | ((uint32_t)res[3] << 16),
                      (uint32_t)res[4] | ((uint32_t)res[5] << 16), (uint32_t)res[6] | ((uint32_t)res[7] << 16));
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

// compute_oct with all eight lanes selected and z0 given (valid whenever op != UPDATE or prior != 0).
template <int DT>
__device__ __forceinline__ void fast_oct(const OpParams& P, const TensorParams& T, uint64_t o, const float x[8],
                                         const float z0[8], typename Storage<DT>::bits_t res[8]) {
  using S = Storage<DT>;
  if (P.op == OP_COPY) {
    const float s = fmul(P.scale, T.scale_mult);
#pragma unroll
    for (int l = 0; l < 8; ++l) res[l] = S::rne(fadd(x[l], fmul(s, z0[l])));
    return;
  }
  float base[8];
  if (P.prior_nonzero) {
    const float p = fmul(P.prior, T.scale_mult);
#pragma unroll
    for (int l = 0; l < 8; ++l) base[l] = invert_rounding<DT>(x[l], fmul(p, z0[l]));
  } else {
#pragma unroll
    for (int l = 0; l < 8; ++l) base[l] = x[l];
  }
  if (P.op == OP_PERTURB) {
    const float s = fmul(P.scale, T.scale_mult);
#pragma unroll
    for (int l = 0; l < 8; ++l) res[l] = S::rne(fadd(base[l], fmul(s, z0[l])));
    return;
  }
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int k = 0; k < P.nupd; ++k) {
    const float gk = fmul(P.gs[k], T.g_mult);
    float z[8];
    if (P.prior_nonzero && P.useeds[k] == P.seed0) {
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
    const U4 rb = rounding_words(P.sr_seed, T.tid, o);
#pragma unroll
    for (int l = 0; l < 8; ++l) res[l] = S::sr(nw[l], rounding_bits_of(rb, l));
  } else {
#pragma unroll
    for (int l = 0; l < 8; ++l) res[l] = S::rne(nw[l]);
  }
}

// SPEC: -1 for the generic kernel (op, distribution and "prior != 0" read at run time), else spec_of(op, prior, dist)
// (dist in the low two bits):
// the same code with those three fixed at compile time, so every branch on them folds away and each instantiation
// holds only its own path's registers (the generic kernel's 126-128 registers left 16 warps per SM: latency-bound).
constexpr int spec_of(int op, bool prior_nonzero, int dist) { return op * 8 + (prior_nonzero ? 4 : 0) + dist; }

// MIN_BLOCKS: blocks per SM the register budget must allow (2: 128 registers; 3: 80; 4: 64). Same bits either way;
// which one a call gets: see the launch below.
template <int DT, int MIN_BLOCKS = 2, int SPEC = -1, bool F32_XOR = false>
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
  }
  constexpr int RW = DT == DT_F32 ? 8 : 4;  // 32-bit words per unit
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
    if (d.work == WORK_ELEMENTS) {
      if ((T.kind == MASK_THRESHOLD && P.threshold_mode != THRESH_EVAL) || T.kind == MASK_BITMASK) {
        if (d.mask8 == nullptr) continue;  // malformed call: nothing safe to do
      }
    }
    const int64_t ub = (b - d.block_start) * UNITS_PER_BLOCK;
    const bits_t* in = reinterpret_cast<const bits_t*>(d.in);
    bits_t* out = reinterpret_cast<bits_t*>(d.out);
    if (d.fast && T.kind == MASK_NONE && (T.offset & 7) == 0) {  // block-uniform
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
      const bool need_z0 = P.op != OP_UPDATE || P.prior_nonzero;
      U4 rw;  // Rademacher: this lane's Philox call, shared through the warp (one call covers 16 units)
      if (P.dist == DIST_RADEMACHER && need_z0) {
        const unsigned lane = threadIdx.x & 31u, jj = lane % (3u * ITERS);
        const uint64_t o_first = o_base + (uint64_t)((jj / 3u) * THREADS + (threadIdx.x & ~31u));
        rw = philox_words(P.seed0, T.tid, (o_first >> 4) + (jj % 3u), STREAM_RADEMACHER);
      }
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
        const uint64_t o = o_base + (uint64_t)(it * THREADS + threadIdx.x);
        if constexpr (XOR) {
          if (xor_block) xor_exchange_in(raw[it]);  // before any lane leaves the iteration
        }
        float z0[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (P.dist == DIST_RADEMACHER) {
          if (need_z0) {
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
          if (u >= full) continue;
        } else {
          if (u >= full) continue;
          if (need_z0) {
            if (P.dist == DIST_GAUSSIAN_FAST)
              gaussian_fast_from_words(philox_words(P.seed0, T.tid, o, STREAM_GAUSSIAN_FAST), z0);
            else
              gaussian_from_words(philox_words(P.seed0, T.tid, o, STREAM_GAUSSIAN), z0);
          }
        }
        float x[8];
        fast_unpack<DT>(raw[it], x);
        bits_t res[8];
        fast_oct<DT>(P, T, o, x, z0, res);
        if constexpr (XOR) {
          if (xor_block) {
            xor_store(reinterpret_cast<uint4*>(out) + 2 * (ub + (int64_t)it * THREADS + warp0), res);
            continue;
          }
        }
        fast_store<DT>(out + u * UNIT, res);
      }
      if (ub + UNITS_PER_BLOCK > full) {  // the tensor's last, partial unit (n % 8 != 0)
        for (int it = 0; it < ITERS; ++it) {
          const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
          if (u >= full && u < d.units) process_element_unit<DT>(P, T, in, out, d.mask8, d.cols, d.k, d.n, u);
        }
      }
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
// (ptxas -v for sm_90, bench/NOTES.md): 16-bit perturb_ without a prior 64 registers (4 blocks, 32 warps per SM),
// the restoring passes 80 (3 blocks); fp32 holds twice the data per unit.
constexpr int spec_minblocks(int dt, int spec) {
  return dt == DT_F32 ? (spec / 8 == OP_UPDATE ? 2 : 3) : (spec / 8 == OP_PERTURB && (spec & 4) == 0 ? 4 : 3);
}

template <int DT, int SPEC, bool XOR>
const void* spec_kernel_of() {
  // the fp32 exchange spills at 3 blocks' 80 registers (ptxas: 150-250 B); 2 blocks keep 64 KB per SM in flight
  return (const void*)zo_apply_kernel<DT, XOR ? 2 : spec_minblocks(DT, SPEC), SPEC, XOR>;
}

// gaussian_fast (spec v2) is specialised only for the default storage kernels (bf16 and fp16 with the hardware
// conversions, fp32 with and without the exchange): each distribution costs a dozen kernels of build time.
constexpr bool has_fast_gaussian_spec(int dt) { return dt == DT_BF16_HW || dt == DT_F16_HW || dt == DT_F32; }

// The three specialised passes of one distribution: perturb_ with prior 0 and with a prior, the restoring update_.
template <int DT, bool XOR, int DIST>
const void* spec_kernel_dist(int spec) {
  switch (spec) {
    case spec_of(OP_PERTURB, false, DIST): return spec_kernel_of<DT, spec_of(OP_PERTURB, false, DIST), XOR>();
    case spec_of(OP_PERTURB, true, DIST): return spec_kernel_of<DT, spec_of(OP_PERTURB, true, DIST), XOR>();
    case spec_of(OP_UPDATE, true, DIST): return spec_kernel_of<DT, spec_of(OP_UPDATE, true, DIST), XOR>();
  }
  return nullptr;
}

template <int DT, bool XOR = false>
const void* spec_kernel_dt(int spec) {
  const void* k = (spec & 3) == DIST_GAUSSIAN     ? spec_kernel_dist<DT, XOR, DIST_GAUSSIAN>(spec)
                  : (spec & 3) == DIST_RADEMACHER ? spec_kernel_dist<DT, XOR, DIST_RADEMACHER>(spec)
                                                  : nullptr;
  if constexpr (has_fast_gaussian_spec(DT)) {
    if ((spec & 3) == DIST_GAUSSIAN_FAST) k = spec_kernel_dist<DT, XOR, DIST_GAUSSIAN_FAST>(spec);
  }
  TORCH_CHECK(k != nullptr, cat("zo_apply_ (CUDA): no specialised kernel for spec ", spec));
  return k;
}

const void* spec_kernel(int dt, int spec, bool f32_xor) {
  return dt == DT_F32       ? (f32_xor ? spec_kernel_dt<DT_F32, true>(spec) : spec_kernel_dt<DT_F32>(spec))
         : dt == DT_F16     ? spec_kernel_dt<DT_F16>(spec)
         : dt == DT_F16_HW  ? spec_kernel_dt<DT_F16_HW>(spec)
         : dt == DT_BF16_HW ? spec_kernel_dt<DT_BF16_HW>(spec)
                            : spec_kernel_dt<DT_BF16>(spec);
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &st));
  return st != cudaStreamCaptureStatusNone;
}

// Device copies of descriptor tables, keyed by device and content, least recently used first out.
at::Tensor descriptor_table(const std::vector<Desc>& descs, const at::Device& device, cudaStream_t stream) {
  constexpr size_t CAPACITY = 64;
  // never destroyed: freeing device memory from a static destructor after CUDA shut down at exit would fail
  static std::mutex& mu = *new std::mutex;
  static std::list<std::string>& order = *new std::list<std::string>;
  static auto& cache = *new std::unordered_map<std::string, std::pair<at::Tensor, std::list<std::string>::iterator>>;
  const size_t bytes = sizeof(Desc) * descs.size();
  std::string key(reinterpret_cast<const char*>(descs.data()), bytes);
  key.push_back((char)device.index());
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) {
    order.splice(order.begin(), order, it->second.second);
    return it->second.first;
  }
  TORCH_CHECK(!capturing(stream),
              "zo_apply_ (CUDA): this call's tensor table is not on the device yet, and it cannot be uploaded during "
              "CUDA graph capture; run the same call once before capturing (a warm-up step)");
  at::Tensor host = at::empty({(int64_t)bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), descs.data(), bytes);
  at::Tensor table = at::empty({(int64_t)bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  table.copy_(host, /*non_blocking=*/true);
  order.push_front(key);
  cache.emplace(key, std::make_pair(table, order.begin()));
  if (cache.size() > CAPACITY) {
    cache.erase(order.back());
    order.pop_back();
  }
  return table;
}

void zo_apply_cuda(at::TensorList params, at::TensorList outs, at::TensorList masks, const at::Tensor& meta,
                   const at::Tensor& fvals, at::IntArrayRef seeds, const at::Tensor& gs, int64_t op, int64_t dist,
                   int64_t rounding, int64_t sr_seed, int64_t threshold_mode, double scale, double prior, double lr,
                   const c10::optional<at::Tensor>& seed_dev) {
  if (params.empty()) return;
  const int dt = check_args(params, outs, masks, meta, fvals, seeds, gs, op, dist, rounding, threshold_mode);
  check_seed_dev(seed_dev, seeds);
  const bool has_seed_dev = seed_dev.has_value() && seed_dev->defined();
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "zo_apply_ (CUDA): params must be CUDA tensors");
  for (const auto& p : params) TORCH_CHECK(p.device() == device, "zo_apply_ (CUDA): params on several devices");
  if (has_seed_dev)
    TORCH_CHECK(seed_dev->device() == device, cat("zo_apply_ (CUDA): seed_dev must be on the params' device ", device.str(),
                    ", got ", seed_dev->device().str()));
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  OpParams P = make_op_params(seeds, op, dist, rounding, sr_seed, threshold_mode, scale, prior, lr);
  const int T = (int)params.size();
  // meta / fvals / gs live on the device already (the plan puts them there); no host sync is needed.
  const at::Tensor meta_d = meta.to(device, at::kLong).contiguous();
  const at::Tensor fvals_d = fvals.to(device, at::kFloat).contiguous();
  at::Tensor gs_d;
  if (P.nupd > 0) gs_d = gs.to(device, at::kFloat).contiguous();

  std::vector<Desc> descs(T);
  int64_t total_blocks = 0;
  for (int t = 0; t < T; ++t) {
    const at::Tensor& theta = params[t];
    const at::Tensor& outt = outs.empty() ? theta : outs[t];
    const at::Tensor& mask = masks[t];
    Desc& d = descs[t];
    std::memset(&d, 0, sizeof(Desc));
    d.in = theta.data_ptr();
    d.out = outt.data_ptr();
    d.n = theta.numel();
    d.work = WORK_ELEMENTS;
    d.work_n = d.n;
    if (is_rowidx_mask(mask)) {
      d.cols = mask.numel() ? mask.data_ptr<int32_t>() : nullptr;
      d.k = mask.size(1);
      TORCH_CHECK(theta.dim() == 2 && mask.size(0) == theta.size(0), cat("zo_apply_: row-index mask ", t,
                  " must be int32 [rows, k] for a 2-D weight"));
      if (op != OP_COPY && !rowidx_as_elements(mask.size(1), theta.size(1))) {
        d.work = WORK_ENTRIES;
        d.work_n = mask.numel();
      }
    } else if (mask.numel() > 0) {
      TORCH_CHECK(mask.scalar_type() == at::kByte && mask.numel() >= (d.n + 7) / 8, cat("zo_apply_: mask ", t,
                  " must be uint8 with ceil(numel / 8) bytes"));
      d.mask8 = mask.data_ptr<uint8_t>();
    }
    d.fast = (d.work == WORK_ELEMENTS && mask.numel() == 0 && (reinterpret_cast<uintptr_t>(d.in) & 15u) == 0 &&
              (reinterpret_cast<uintptr_t>(d.out) & 15u) == 0)
                 ? 1
                 : 0;
    d.units = d.n == 0 ? 0 : (d.work_n + UNIT - 1) / UNIT;
    d.block_start = total_blocks;
    total_blocks += (d.units + UNITS_PER_BLOCK - 1) / UNITS_PER_BLOCK;
  }
  if (total_blocks == 0) return;

  // The descriptor table (pointers and sizes only) is the same for every pass of a plan: kept on the device and
  // reused, so a pass uploads nothing (and can be captured in a CUDA graph once the table exists).
  const at::Tensor table = descriptor_table(descs, device, stream);
  // Update seeds given as ints: one small pinned upload per call.
  at::Tensor useeds_d;
  if (P.nupd > 0 && !has_seed_dev) {
    TORCH_CHECK(!capturing(stream),
                "zo_apply_ (CUDA): update seeds given as ints cannot be captured in a CUDA graph; pass seed_dev");
    at::Tensor host = at::empty({(int64_t)P.nupd}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    for (int k = 0; k < P.nupd; ++k) host.data_ptr<int64_t>()[k] = seeds[k + 1];
    useeds_d = at::empty({(int64_t)P.nupd}, at::TensorOptions().dtype(at::kLong).device(device));
    useeds_d.copy_(host, /*non_blocking=*/true);
  }
  KArgs a;
  a.P = P;
  a.descs = reinterpret_cast<const Desc*>(table.data_ptr<uint8_t>());
  a.P.useeds = useeds_d.defined() ? reinterpret_cast<const uint64_t*>(useeds_d.data_ptr<int64_t>()) : nullptr;
  a.seed_dev = has_seed_dev ? seed_dev->data_ptr<int64_t>() : nullptr;
  a.nseeds = (int)seeds.size();
  a.P.gs = P.nupd ? gs_d.data_ptr<float>() : nullptr;
  a.meta = meta_d.data_ptr<int64_t>();
  a.fvals = fvals_d.data_ptr<float>();
  a.T = T;
  a.total_blocks = total_blocks;
  // Grid: one block per 8192 units (default), or, with MAZO_CUDA_WAVES=w > 0 (a speed experiment), w times the
  // blocks that fit on the device at once, each looping over blocks (same work per block, same bits).
  int64_t max_grid = 1 << 30;
  const char* waves_env = std::getenv("MAZO_CUDA_WAVES");  // read per call so that one process can compare
  const int waves = waves_env ? std::atoi(waves_env) : 0;
  // The three passes of a ZO step (perturb_ with prior 0 and with a prior, update_ with a prior) run a kernel
  // specialised on (op, prior != 0, distribution); perturbed_copy and update_ with prior 0 run the generic one.
  // MAZO_CUDA_SPEC=0 forces the generic kernel (read per call so that one process can compare; same bits).
  const char* spec_env = std::getenv("MAZO_CUDA_SPEC");
  const bool spec_on = !(spec_env && std::atoi(spec_env) == 0);
  const bool prior_nz = P.prior_nonzero;
  // fp32 fast path with warp-coalesced accesses (same bits). On an H200 over 7B (bench/results/h200_2026-12-02/
  // s9_fp_experiments) it ran perturb_ 26.3 -> 18.8 ms (Gaussian) and 22.1 -> 14.8 (Rademacher), update_ Rademacher
  // 20.2 -> 17.6, but update_ Gaussian 21.7 -> 23.2 (its 2-blocks register budget halves the warps of the most
  // instruction-heavy pass; the restoring Gaussian perturb_ too: 19.4 -> 20.0-20.4, s9_defaults_ab): on by default
  // for perturb_ with prior 0 and the restoring Rademacher passes (and gaussian_fast's, whose transform is as light:
  // unmeasured when chosen). Its generic kernel spills, so calls that run
  // generic (perturbed_copy, update_ with prior 0, MAZO_CUDA_SPEC=0) keep the plain kernel unless
  // MAZO_CUDA_F32_XOR=1 forces it; MAZO_CUDA_F32_XOR=0 turns it off (read per call).
  const char* xor_env = std::getenv("MAZO_CUDA_F32_XOR");
  const bool f32_xor =
      dt == DT_F32 && (xor_env ? std::atoi(xor_env) == 1
                               : spec_on && ((op == OP_PERTURB && !prior_nz) ||
                                             (prior_nz && (op == OP_PERTURB || op == OP_UPDATE) &&
                                              dist != DIST_GAUSSIAN)));
  // fp32 perturb_ with prior 0 and Gaussian noise stays generic: on an H200 the specialisation (80 registers, 3
  // blocks) ran it 12% slower (28.2 vs 25.2 ms over 7B; bench/results/h200_2026-12-01/s8_final/). The exchange's
  // specialisation has 2 blocks' budget, and its generic kernel spills: it keeps the specialisation.
  const bool f32_plain_perturb =
      dt == DT_F32 && op == OP_PERTURB && !prior_nz && dist == DIST_GAUSSIAN && !f32_xor;
  const bool hot = (op == OP_PERTURB || (op == OP_UPDATE && prior_nz)) && !f32_plain_perturb;
  int spec = spec_on && hot ? spec_of((int)op, prior_nz, (int)dist) : -1;
  // Generic bf16 kernel: calls whose tensors all take the fast path run the 3-blocks-per-SM kernel for update_ and
  // Gaussian noise (on an H200 6-11% faster there, 6% slower for Rademacher perturb_: bench/results/h200_2026-12-01/
  // minblocks); MAZO_CUDA_MINBLOCKS=2|3 forces one (bf16 only).
  bool all_fast = true;
  for (const Desc& d : descs) all_fast = all_fast && (d.fast || d.units == 0);
  int minb = (all_fast && (op == OP_UPDATE || dist == DIST_GAUSSIAN)) ? 3 : 2;
  const char* minb_env = std::getenv("MAZO_CUDA_MINBLOCKS");
  if (minb_env) minb = std::atoi(minb_env);
  const bool minb3 = dt == DT_BF16 && minb == 3;
  // bf16 rounded by the hardware conversion: the same bits for all 2^32 inputs (bench/check_bf16_cvt.cu on an H200)
  // in fewer instructions. MAZO_CUDA_HW_BF16=0 (read per call) gives the integer rounding back.
  const char* hw_env = std::getenv("MAZO_CUDA_HW_BF16");
  // fp16 through the hardware conversions: __half2float gives the spec's float32 for every non-NaN fp16 pattern
  // (bench/probe_cuda_leads.cu, all 65,536 on an H200) and the NaN patterns get the spec's bits by a select; on an
  // H200 over 7B, perturb_ 17.9 -> 15.7 ms, update_ 55.5 -> 40.8 (Gaussian; s9_fp_experiments). MAZO_CUDA_HW_F16=0
  // (read per call) gives the integer conversions back.
  const char* hw16_env = std::getenv("MAZO_CUDA_HW_F16");
  const bool hw16 = dt == DT_F16 && !(hw16_env && std::atoi(hw16_env) == 0);
  const int kdt = dt == DT_BF16 && !(hw_env && std::atoi(hw_env) == 0) ? DT_BF16_HW : hw16 ? DT_F16_HW : dt;
  if (dist == DIST_GAUSSIAN_FAST && !has_fast_gaussian_spec(kdt)) spec = -1;  // generic kernel
  const void* kfn = spec >= 0             ? spec_kernel(kdt, spec, f32_xor)
                    : f32_xor             ? (const void*)zo_apply_kernel<DT_F32, 2, -1, true>
                    : kdt == DT_F32       ? (const void*)zo_apply_kernel<DT_F32>
                    : kdt == DT_F16       ? (const void*)zo_apply_kernel<DT_F16>
                    : kdt == DT_F16_HW    ? (const void*)zo_apply_kernel<DT_F16_HW>
                    : kdt == DT_BF16_HW   ? (const void*)zo_apply_kernel<DT_BF16_HW>
                    : minb3               ? (const void*)zo_apply_kernel<DT_BF16, 3>
                                          : (const void*)zo_apply_kernel<DT_BF16>;
  if (waves > 0) {
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kfn, THREADS, 0));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
    max_grid = (int64_t)waves * (per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
  }
  const unsigned grid = (unsigned)(total_blocks < max_grid ? total_blocks : max_grid);
  void* kargs[] = {&a};
  C10_CUDA_CHECK(cudaLaunchKernel(kfn, dim3(grid), dim3(THREADS), kargs, 0, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(mazo_C, CUDA, m) { m.impl("zo_apply_", &zo_apply_cuda); }

#define MAZO_CAT_(a, b) a##b
#define MAZO_CAT(a, b) MAZO_CAT_(a, b)
#define MAZO_STR_(a) #a
#define MAZO_STR(a) MAZO_STR_(a)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_cuda
#endif

static PyModuleDef mazo_cuda_module_def = {PyModuleDef_HEAD_INIT, MAZO_STR(TORCH_EXTENSION_NAME),
                                           "mazo_kernels CUDA kernels (registers the CUDA impl of mazo_C)", -1,
                                           nullptr};

PyMODINIT_FUNC MAZO_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&mazo_cuda_module_def); }
