// Shared driver of the exhaustive float32 checks (bench/check_f16_cvt.cu, bench/check_bf16_cvt.cu): runs
// check(base, mismatches, first) over all 2^32 bit patterns in chunks of 2^30 (256 threads per block, one pattern per
// thread), then prints one JSON line. Exit status 0 when no pattern mismatched, 1 otherwise, 2 on a CUDA error.
#pragma once
#include <cstdint>
#include <cstdio>

using CheckKernel = void (*)(uint64_t, unsigned long long*, uint32_t*);

inline int run_all_f32(CheckKernel check) {
  unsigned long long* mm;
  uint32_t* first;
  cudaMallocManaged(&mm, sizeof(*mm));
  cudaMallocManaged(&first, sizeof(*first));
  *mm = 0;
  *first = 0;
  const uint64_t chunk = 1ull << 30;
  for (uint64_t base = 0; base < (1ull << 32); base += chunk) check<<<(unsigned)(chunk / 256), 256>>>(base, mm, first);
  cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) { std::printf("CUDA error: %s\n", cudaGetErrorString(err)); return 2; }
  std::printf("{\"inputs\": 4294967296, \"mismatches\": %llu, \"first_mismatch_bits\": \"0x%08x\"}\n", *mm, *first);
  return *mm == 0 ? 0 : 1;
}
