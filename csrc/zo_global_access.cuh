// 16-byte global loads and stores for the CUDA kernels (csrc/zo_cuda_kernel.cuh, zo_apply_common.h,
// zo_f32_exchange.cuh). Empty outside nvcc, so the CPU backend can include zo_apply_common.h.
#pragma once
#include <cstdint>

namespace mazo {

#if defined(__CUDACC__)
// 16-byte global accesses as single instructions. A plain uint4 dereference of these pointers (read from the call's
// descriptor table, so not provably global) compiled to generic LD.E.128 loads and, for the stores, four 32-bit
// ST.E per uint4 (nvcc 13.0: the vector store was split), i.e. four store requests per 16 bytes where Triton issues
// one st.global.v4. Same ordering rules as CUDA's own __ldcs/__stcs (volatile load; store with a memory clobber).
__device__ __forceinline__ uint4 ld_global_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ void st_global_u4(void* p, uint4 v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
#endif
}  // namespace mazo
