// Two probes for the CUDA extension's fp16 / fp32 gap to Triton (bench/NOTES.md, "Session 8"), one GPU call:
//  1. fp16 -> float32: the hardware conversion (__half2float, cvt.f32.f16) against the spec's integer conversion
//     (mazo::f16_bits_to_f32) for all 65,536 fp16 bit patterns; NaN and non-NaN mismatches counted apart (the
//     kernel may only swap in the hardware form where every non-NaN pattern agrees).
//  2. fp32 access pattern: the fast path's layout (each thread owns one 8-element oct, loaded and stored as two
//     16-byte accesses 32 bytes apart) against a coalesced layout (each warp access 512 contiguous bytes) and against
//     the coalesced layout plus the warp shuffles that hand every thread its whole oct again (two candidate fixes:
//     16 shuffles per unit each way, or a permuted coalesced load with one xor-16 shuffle per word each way),
//     on 2^28 float32 elements updated in place (w = w * a + b: memory-bound by design). Medians of 20 timed runs;
//     the copy floor (cudaMemcpy device to device) in the same process.
//   nvcc -std=c++17 -O3 -arch=sm_90 --fmad=false -Icsrc bench/probe_cuda_leads.cu -o /tmp/probe && /tmp/probe
// Prints one JSON object.
#include <algorithm>
#include <cstdio>
#include <vector>
#include <cuda_fp16.h>
#include "zo_f32_exchange.cuh"
#include "zo_noise.h"

__global__ void f16_check(unsigned* bad_non_nan, unsigned* bad_nan, unsigned* first) {
  const uint32_t h = blockIdx.x * blockDim.x + threadIdx.x;  // 0 .. 65535
  const float hw = __half2float(__ushort_as_half((unsigned short)h));
  const float sw = mazo::f16_bits_to_f32(h);
  if (mazo::f2u(hw) != mazo::f2u(sw)) {
    const bool nan = (h & 0x7FFFu) > 0x7C00u;
    if (atomicAdd(nan ? bad_nan : bad_non_nan, 1u) == 0u && !nan) *first = h;
  }
}

constexpr int THREADS = 256, ITERS = 4;
constexpr int64_t UNITS_PER_BLOCK = (int64_t)THREADS * ITERS;  // 8-element units

__device__ __forceinline__ void work(uint4& v, float a, float b) {
  v.x = mazo::f2u(mazo::u2f(v.x) * a + b);
  v.y = mazo::f2u(mazo::u2f(v.y) * a + b);
  v.z = mazo::f2u(mazo::u2f(v.z) * a + b);
  v.w = mazo::f2u(mazo::u2f(v.w) * a + b);
}

// The fast path's layout: unit u (8 floats, 32 bytes) belongs to thread u % THREADS; two 16-byte accesses per unit.
__global__ void __launch_bounds__(THREADS, 3) strided(uint4* p, int64_t units, float a, float b) {
  const int64_t ub = (int64_t)blockIdx.x * UNITS_PER_BLOCK;
  uint4 r[ITERS][2];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
    if (u < units) { r[it][0] = p[2 * u]; r[it][1] = p[2 * u + 1]; }
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t u = ub + (int64_t)it * THREADS + threadIdx.x;
    if (u < units) {
      work(r[it][0], a, b); work(r[it][1], a, b);
      p[2 * u] = r[it][0]; p[2 * u + 1] = r[it][1];
    }
  }
}

// Coalesced: in each warp's 32 units (64 uint4), lane L accesses uint4 L and 32 + L.
__global__ void __launch_bounds__(THREADS, 3) coalesced(uint4* p, int64_t units, float a, float b) {
  const int64_t ub = (int64_t)blockIdx.x * UNITS_PER_BLOCK;
  const int lane = threadIdx.x & 31, warp0 = threadIdx.x & ~31;
  uint4 r[ITERS][2];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t q = 2 * (ub + (int64_t)it * THREADS + warp0);  // the warp's first uint4
    if (q / 2 + 32 <= units) { r[it][0] = p[q + lane]; r[it][1] = p[q + 32 + lane]; }
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t q = 2 * (ub + (int64_t)it * THREADS + warp0);
    if (q / 2 + 32 <= units) {
      work(r[it][0], a, b); work(r[it][1], a, b);
      p[q + lane] = r[it][0]; p[q + 32 + lane] = r[it][1];
    }
  }
}

__device__ __forceinline__ uint32_t pick(uint32_t v0, uint32_t v1, int src, bool hi) {
  const uint32_t a = __shfl_sync(0xFFFFFFFFu, v0, src), c = __shfl_sync(0xFFFFFFFFu, v1, src);
  return hi ? c : a;
}
// Coalesced accesses, then shuffles so that lane L holds unit L whole (uint4 2L and 2L + 1), as the kernel's
// per-oct noise needs; and back before the store.
__device__ __forceinline__ void to_oct(const uint4 v[2], uint4 o[2], int lane) {
  const bool hi = lane >= 16;
  const int s0 = (2 * lane) & 31, s1 = (2 * lane + 1) & 31;
  o[0] = make_uint4(pick(v[0].x, v[1].x, s0, hi), pick(v[0].y, v[1].y, s0, hi), pick(v[0].z, v[1].z, s0, hi),
                    pick(v[0].w, v[1].w, s0, hi));
  o[1] = make_uint4(pick(v[0].x, v[1].x, s1, hi), pick(v[0].y, v[1].y, s1, hi), pick(v[0].z, v[1].z, s1, hi),
                    pick(v[0].w, v[1].w, s1, hi));
}
// The inverse: lane L needs uint4 L (unit L / 2, half L % 2) and 32 + L (unit 16 + L / 2, half L % 2).
__device__ __forceinline__ void from_oct(const uint4 o[2], uint4 v[2], int lane) {
  const int src0 = lane >> 1, src1 = 16 + (lane >> 1);
  const bool odd = lane & 1;
  uint32_t w[2][4];
  const uint32_t in0[4] = {o[0].x, o[0].y, o[0].z, o[0].w}, in1[4] = {o[1].x, o[1].y, o[1].z, o[1].w};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint32_t a0 = __shfl_sync(0xFFFFFFFFu, in0[c], src0), a1 = __shfl_sync(0xFFFFFFFFu, in1[c], src0);
    const uint32_t b0 = __shfl_sync(0xFFFFFFFFu, in0[c], src1), b1 = __shfl_sync(0xFFFFFFFFu, in1[c], src1);
    w[0][c] = odd ? a1 : a0;
    w[1][c] = odd ? b1 : b0;
  }
  v[0] = make_uint4(w[0][0], w[0][1], w[0][2], w[0][3]);
  v[1] = make_uint4(w[1][0], w[1][1], w[1][2], w[1][3]);
}
__global__ void __launch_bounds__(THREADS, 3) coalesced_shfl(uint4* p, int64_t units, float a, float b) {
  const int64_t ub = (int64_t)blockIdx.x * UNITS_PER_BLOCK;
  const int lane = threadIdx.x & 31, warp0 = threadIdx.x & ~31;
  uint4 r[ITERS][2];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t q = 2 * (ub + (int64_t)it * THREADS + warp0);
    if (q / 2 + 32 <= units) { r[it][0] = p[q + lane]; r[it][1] = p[q + 32 + lane]; }
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t q = 2 * (ub + (int64_t)it * THREADS + warp0);
    if (q / 2 + 32 <= units) {  // warp-uniform
      uint4 o[2], v[2];
      to_oct(r[it], o, lane);
      work(o[0], a, b); work(o[1], a, b);  // per-unit work happens here, on the thread's whole oct
      from_oct(o, v, lane);
      p[q + lane] = v[0]; p[q + 32 + lane] = v[1];
    }
  }
}

// to_oct must hand lane L exactly unit L of its warp's 32 units: compared with the unit loaded directly.
__global__ void check_to_oct(const uint4* p, int64_t units, unsigned* wrong) {
  const int64_t ub = (int64_t)blockIdx.x * UNITS_PER_BLOCK;
  const int lane = threadIdx.x & 31, warp0 = threadIdx.x & ~31;
  for (int it = 0; it < ITERS; ++it) {
    const int64_t q = 2 * (ub + (int64_t)it * THREADS + warp0), u = q / 2 + lane;
    if (q / 2 + 32 > units) continue;
    const uint4 v[2] = {p[q + lane], p[q + 32 + lane]};
    uint4 o[2];
    to_oct(v, o, lane);
    const uint4 d0 = p[2 * u], d1 = p[2 * u + 1];
    const bool ok = o[0].x == d0.x && o[0].y == d0.y && o[0].z == d0.z && o[0].w == d0.w && o[1].x == d1.x &&
                    o[1].y == d1.y && o[1].z == d1.z && o[1].w == d1.w;
    if (!ok) atomicAdd(wrong, 1u);
  }
}

// The cheaper exchange, the kernel's own (csrc/zo_f32_exchange.cuh): a permuted coalesced load, one xor-16 shuffle
// per word each way.
__device__ __forceinline__ void work_words(uint32_t r[8], float a, float b) {
#pragma unroll
  for (int l = 0; l < 8; ++l) r[l] = mazo::f2u(mazo::u2f(r[l]) * a + b);
}
__global__ void __launch_bounds__(THREADS, 2) coalesced_xor(uint4* p, int64_t units, float a, float b) {
  const int64_t ub = (int64_t)blockIdx.x * UNITS_PER_BLOCK;
  const int warp0 = threadIdx.x & ~31;
  uint32_t r[ITERS][8];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t q = 2 * (ub + (int64_t)it * THREADS + warp0);
    if (q / 2 + 32 <= units) mazo::xor_load(p + q, r[it]);
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t q = 2 * (ub + (int64_t)it * THREADS + warp0);
    if (q / 2 + 32 <= units) {  // warp-uniform
      mazo::xor_exchange_in(r[it]);
      work_words(r[it], a, b);  // the thread's whole oct
      mazo::xor_store(p + q, r[it]);
    }
  }
}
__global__ void check_xor_oct(const uint4* p, int64_t units, unsigned* wrong) {
  const int64_t ub = (int64_t)blockIdx.x * UNITS_PER_BLOCK;
  const int lane = threadIdx.x & 31, warp0 = threadIdx.x & ~31;
  for (int it = 0; it < ITERS; ++it) {
    const int64_t q = 2 * (ub + (int64_t)it * THREADS + warp0), u = q / 2 + lane;
    if (q / 2 + 32 > units) continue;
    uint32_t r[8];
    mazo::xor_load(p + q, r);
    mazo::xor_exchange_in(r);
    const uint4 d0 = p[2 * u], d1 = p[2 * u + 1];
    const bool ok = r[0] == d0.x && r[1] == d0.y && r[2] == d0.z && r[3] == d0.w && r[4] == d1.x && r[5] == d1.y &&
                    r[6] == d1.z && r[7] == d1.w;
    if (!ok) atomicAdd(wrong, 1u);
  }
}

template <typename F>
float median_ms(F launch, int reps = 20) {
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> t;
  launch();
  launch();
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(e0);
    launch();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, e0, e1);
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  unsigned *bad, h_bad[3] = {0, 0, 0};
  cudaMalloc(&bad, 3 * sizeof(unsigned));
  cudaMemset(bad, 0, 3 * sizeof(unsigned));
  f16_check<<<256, 256>>>(bad, bad + 1, bad + 2);
  cudaMemcpy(h_bad, bad, sizeof(h_bad), cudaMemcpyDeviceToHost);

  const int64_t n = 1ll << 28, units = n / 8, bytes = n * 4;
  uint4 *p, *q;
  cudaMalloc(&p, bytes);
  cudaMalloc(&q, bytes);
  cudaMemset(p, 0, bytes);
  const unsigned grid = (unsigned)((units + UNITS_PER_BLOCK - 1) / UNITS_PER_BLOCK);
  const float a = 1.0f, b = 0.0f;  // values unchanged run to run
  const float copy = median_ms([&] { cudaMemcpyAsync(q, p, bytes, cudaMemcpyDeviceToDevice); });
  const float t_str = median_ms([&] { strided<<<grid, THREADS>>>(p, units, a, b); });
  const float t_coal = median_ms([&] { coalesced<<<grid, THREADS>>>(p, units, a, b); });
  const float t_shfl = median_ms([&] { coalesced_shfl<<<grid, THREADS>>>(p, units, a, b); });
  const float t_xor = median_ms([&] { coalesced_xor<<<grid, THREADS>>>(p, units, a, b); });
  // the shuffled kernel must leave the same values as the others: check it moves data correctly on a pattern
  std::vector<uint32_t> h(1 << 20), g(1 << 20);
  for (size_t i = 0; i < h.size(); ++i) h[i] = (uint32_t)(i * 2654435761u) & 0x3FFFFFFFu;  // finite floats
  cudaMemcpy(p, h.data(), h.size() * 4, cudaMemcpyHostToDevice);
  coalesced_shfl<<<(unsigned)((h.size() / 8 + UNITS_PER_BLOCK - 1) / UNITS_PER_BLOCK), THREADS>>>(
      p, (int64_t)h.size() / 8, 1.0f, 0.0f);
  cudaMemcpy(g.data(), p, g.size() * 4, cudaMemcpyDeviceToHost);
  size_t moved_wrong = 0;
  for (size_t i = 0; i < h.size(); ++i) moved_wrong += h[i] != g[i];
  cudaMemset(bad, 0, sizeof(unsigned));
  check_to_oct<<<(unsigned)((h.size() / 8 + UNITS_PER_BLOCK - 1) / UNITS_PER_BLOCK), THREADS>>>(
      p, (int64_t)h.size() / 8, bad);
  unsigned oct_wrong = 0;
  cudaMemcpy(&oct_wrong, bad, sizeof(unsigned), cudaMemcpyDeviceToHost);
  moved_wrong += oct_wrong;
  cudaMemcpy(p, h.data(), h.size() * 4, cudaMemcpyHostToDevice);  // the xor layout: loads, and the round trip
  cudaMemset(bad, 0, sizeof(unsigned));
  const unsigned small_grid = (unsigned)((h.size() / 8 + UNITS_PER_BLOCK - 1) / UNITS_PER_BLOCK);
  check_xor_oct<<<small_grid, THREADS>>>(p, (int64_t)h.size() / 8, bad);
  coalesced_xor<<<small_grid, THREADS>>>(p, (int64_t)h.size() / 8, 1.0f, 0.0f);
  cudaMemcpy(g.data(), p, g.size() * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(&oct_wrong, bad, sizeof(unsigned), cudaMemcpyDeviceToHost);
  moved_wrong += oct_wrong;
  for (size_t i = 0; i < h.size(); ++i) moved_wrong += h[i] != g[i];
  const cudaError_t err = cudaDeviceSynchronize();
  const double floor_ms = copy;  // same bytes read + written as one in-place pass
  std::printf("{\"f16_to_f32_mismatches_non_nan\": %u, \"f16_to_f32_mismatches_nan\": %u, \"first_non_nan\": "
              "\"0x%04x\", \"fp32_elements\": %lld, \"copy_ms\": %.4f, \"strided_ms\": %.4f, \"coalesced_ms\": %.4f, "
              "\"coalesced_shfl_ms\": %.4f, \"strided_fraction\": %.3f, \"coalesced_fraction\": %.3f, "
              "\"coalesced_shfl_fraction\": %.3f, \"coalesced_xor_ms\": %.4f, \"coalesced_xor_fraction\": %.3f, "
              "\"shfl_layout_wrong\": %zu, \"cuda_error\": \"%s\"}\n",
              h_bad[0], h_bad[1], h_bad[2], (long long)n, copy, t_str, t_coal, t_shfl, floor_ms / t_str,
              floor_ms / t_coal, floor_ms / t_shfl, t_xor, floor_ms / t_xor, moved_wrong, cudaGetErrorString(err));
  return (err == cudaSuccess && moved_wrong == 0) ? 0 : 1;
}
