// The fp32 fast path's warp-coalesced exchange (the default of most specialised fp32 passes: csrc/zo_cuda.cu; and
// bench/probe_cuda_leads.cu, which times and checks these very functions). The plain fast path's two 16-byte
// accesses per 8-float unit are 32 bytes apart, so every warp access touches twice the sectors it uses. Here each
// warp loads its 32 units (64 uint4) as two accesses of 512 contiguous bytes, lanes permuted so that lane L gets its
// unit's first half directly and its second half from lane L ^ 16 (one shuffle per word; the store reverses it).
// Same units per lane: the same bits.
//   access 1: L < 16 -> uint4 2L (own half 0),  L >= 16 -> uint4 2(L - 16) + 1 (lane L - 16's half 1)
//   access 2: L < 16 -> uint4 2(L + 16) + 1 (lane L + 16's half 1),  L >= 16 -> uint4 2L (own half 0)
#pragma once
#include <cstdint>

#include "zo_global_access.cuh"

namespace mazo {

__device__ __forceinline__ int xor_slot1(int lane) { return lane < 16 ? 2 * lane : 2 * (lane - 16) + 1; }
__device__ __forceinline__ int xor_slot2(int lane) { return lane < 16 ? 2 * (lane + 16) + 1 : 2 * lane; }

__device__ __forceinline__ uint32_t shfl_xor16(uint32_t v) { return __shfl_xor_sync(0xFFFFFFFFu, v, 16); }

// The warp's two 512-byte loads of the 32 units starting at q (uint4 index of the first unit's first half):
// raw[0..3] from access 1, raw[4..7] from access 2 (each lane's own unit after xor_exchange_in).
__device__ __forceinline__ void xor_load(const uint4* q, uint32_t raw[8]) {
  const int lane = (int)(threadIdx.x & 31u);
  const uint4 v1 = ld_global_u4(q + xor_slot1(lane)), v2 = ld_global_u4(q + xor_slot2(lane));
  raw[0] = v1.x; raw[1] = v1.y; raw[2] = v1.z; raw[3] = v1.w;
  raw[4] = v2.x; raw[5] = v2.y; raw[6] = v2.z; raw[7] = v2.w;
}

// raw as xor_load left it -> raw[0..7] the lane's own unit. The whole warp calls it.
__device__ __forceinline__ void xor_exchange_in(uint32_t raw[8]) {
  const bool lo = (threadIdx.x & 16u) == 0;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint32_t a = raw[c], b = raw[4 + c];
    raw[c] = lo ? a : b;
    raw[4 + c] = shfl_xor16(lo ? b : a);
  }
}

// The lane's unit res[0..7] (fp32 bits) -> the warp's two 512-byte stores at q. The whole warp calls it.
__device__ __forceinline__ void xor_store(uint4* q, const uint32_t res[8]) {
  const int lane = (int)(threadIdx.x & 31u);
  const bool lo = lane < 16;
  const uint4 own0 = make_uint4(res[0], res[1], res[2], res[3]);
  const uint4 partner1 = make_uint4(shfl_xor16(res[4]), shfl_xor16(res[5]), shfl_xor16(res[6]), shfl_xor16(res[7]));
  st_global_u4(q + xor_slot1(lane), lo ? own0 : partner1);
  st_global_u4(q + xor_slot2(lane), lo ? partner1 : own0);
}

}  // namespace mazo
