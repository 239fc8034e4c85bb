// Exhaustive check: the device's hardware float32 -> fp16 conversion (mazo::f32_to_f16_rne, with its NaN fix-up)
// against the integer-op reference (mazo::f32_to_f16_rne_soft) for all 2^32 float32 bit patterns.
//   nvcc -std=c++17 -arch=sm_90 --fmad=false -Icsrc bench/check_f16_cvt.cu -o /tmp/check_f16_cvt && /tmp/check_f16_cvt
#include "exhaustive_f32.cuh"
#include "zo_noise.h"

__global__ void check(uint64_t base, unsigned long long* mismatches, uint32_t* first) {
  const uint64_t i = base + (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t x = (uint32_t)i;
  const float f = mazo::u2f(x);
  if (mazo::f32_to_f16_rne(f) != mazo::f32_to_f16_rne_soft(f)) {
    if (atomicAdd(mismatches, 1ull) == 0ull) *first = x;
  }
}

int main() { return run_all_f32(check); }
