// Exhaustive check: the device's hardware float32 -> bf16 rounding (mazo::Storage<DT_BF16_HW>, cvt.rn.bf16.f32 with
// the spec's NaN) against the integer-op rounding of the spec (mazo::Storage<DT_BF16>) for all 2^32 float32 bit
// patterns; also the restore's form without the NaN fix-up on every non-NaN input. The CUDA extension uses the
// hardware form by default since this passed on an H200 (bench/results/h200_2026-12-01/s8_hw_bf16/).
//   nvcc -std=c++17 -arch=sm_90 --fmad=false -Icsrc bench/check_bf16_cvt.cu -o /tmp/check_bf16_cvt && /tmp/check_bf16_cvt
#include "exhaustive_f32.cuh"
#include "zo_noise.h"

using HW = mazo::Storage<mazo::DT_BF16_HW>;
using SPEC = mazo::Storage<mazo::DT_BF16>;

__global__ void check(uint64_t base, unsigned long long* mismatches, uint32_t* first) {
  const uint64_t i = base + (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t x = (uint32_t)i;
  const float f = mazo::u2f(x);
  const bool nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
  if (HW::rne(f) != SPEC::rne(f) || (!nan && HW::rne_not_nan(f) != SPEC::rne_not_nan(f))) {
    if (atomicAdd(mismatches, 1ull) == 0ull) *first = x;
  }
}

int main() { return run_all_f32(check); }
