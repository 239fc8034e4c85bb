"""Plain CUDA kernel for the v1 Gaussian transform: one thread = one Philox call = 8 bf16 elements (16 bytes).

Built with torch.utils.cpp_extension.load_inline (nvcc --fmad=false). Checks its bits against the reference, then
times a bf16 perturb pass beside the copy floor. Used by bench/bench_transform.py --cuda."""
from __future__ import annotations

import torch
from torch.utils.cpp_extension import load_inline

CUDA_SRC = r"""
#include <torch/extension.h>
#include <cuda_bf16.h>
#include <c10/cuda/CUDAStream.h>
#include <stdint.h>

__device__ __forceinline__ void philox(uint32_t c[4], uint32_t k0, uint32_t k1) {
  #pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
    uint32_t hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
    uint32_t hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
    uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
  }
}

__device__ __forceinline__ void pair(uint32_t w, float &za, float &zb) {
  float k = (float)(int)((w >> 12) + 1u);
  int bits = __float_as_int(k);
  int e = (bits - 0x3F3504F3) >> 23;
  float m = __int_as_float(bits - (e << 23));
  float t = __fsub_rn(m, 1.0f);
  float p = -0.14662456512451172f * -2.0f;
  p = __fadd_rn(__fmul_rn(p, t), 0.22168762981891632f * -2.0f);
  p = __fadd_rn(__fmul_rn(p, t), -0.25359150767326355f * -2.0f);
  p = __fadd_rn(__fmul_rn(p, t), 0.3324826955795288f * -2.0f);
  p = __fadd_rn(__fmul_rn(p, t), -0.4999140501022339f * -2.0f);
  p = __fadd_rn(__fmul_rn(p, t), 1.0000054836273193f * -2.0f);
  float q = __fadd_rn(__fmul_rn((float)(20 - e), 1.3862943649291992f), __fmul_rn(t, p));
  float r = __fsqrt_rn(q);
  uint32_t qd = (w >> 10) & 3u;
  float x = __fmul_rn((float)(int)(2 * (w & 0x3FFu) - 1023), 7.669903939428206e-04f);
  float s2 = __fmul_rn(x, x);
  float sn = __fmul_rn(__fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(0.00815201923251152f, s2), -0.1666249930858612f), s2), 0.9999985694885254f), x);
  float cs = __fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(-0.001366178970783949f, s2), 0.04166144132614136f), s2), -0.4999998211860657f), s2), 1.0f);
  float c = (qd & 1u) ? sn : cs;
  float s = (qd & 1u) ? cs : sn;
  if (qd == 1u || qd == 2u) c = -c;
  if (qd >= 2u) s = -s;
  za = __fmul_rn(r, c); zb = __fmul_rn(r, s);
}

__device__ __forceinline__ uint16_t rne_bf16(float x) {
  uint32_t b = __float_as_uint(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

__global__ void noise8(float* out, int64_t n, uint32_t k0, uint32_t k1, uint32_t tid) {
  int64_t blk = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (blk * 8 >= n) return;
  uint32_t c[4] = {(uint32_t)blk, (uint32_t)(blk >> 32), tid, 0u};
  philox(c, k0, k1);
  float z[8];
  #pragma unroll
  for (int j = 0; j < 4; ++j) pair(c[j], z[2 * j], z[2 * j + 1]);
  for (int j = 0; j < 8; ++j) if (blk * 8 + j < n) out[blk * 8 + j] = z[j];
}

__global__ void perturb8(uint4* data, int64_t nblk, uint32_t k0, uint32_t k1, uint32_t tid, float eps) {
  int64_t blk = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (blk >= nblk) return;
  uint4 v = data[blk];
  uint32_t c[4] = {(uint32_t)blk, (uint32_t)(blk >> 32), tid, 0u};
  philox(c, k0, k1);
  uint32_t in[4] = {v.x, v.y, v.z, v.w}, o[4];
  #pragma unroll
  for (int j = 0; j < 4; ++j) {
    float za, zb; pair(c[j], za, zb);
    float a = __uint_as_float(in[j] << 16), b = __uint_as_float(in[j] & 0xFFFF0000u);
    uint16_t ra = rne_bf16(__fadd_rn(a, __fmul_rn(eps, za)));
    uint16_t rb = rne_bf16(__fadd_rn(b, __fmul_rn(eps, zb)));
    o[j] = (uint32_t)ra | ((uint32_t)rb << 16);
  }
  data[blk] = make_uint4(o[0], o[1], o[2], o[3]);
}

void run_noise(torch::Tensor out, int64_t seed, int64_t tid) {
  int64_t n = out.numel(); int64_t nb = (n + 7) / 8;
  uint64_t s = (uint64_t)seed;
  noise8<<<(nb + 255) / 256, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(out.data_ptr<float>(), n, (uint32_t)s, (uint32_t)(s >> 32), (uint32_t)tid);
}

void run_perturb(torch::Tensor w, int64_t seed, int64_t tid, double eps) {
  int64_t nb = w.numel() / 8;
  uint64_t s = (uint64_t)seed;
  perturb8<<<(nb + 255) / 256, 256, 0, c10::cuda::getCurrentCUDAStream()>>>((uint4*)w.data_ptr(), nb, (uint32_t)s, (uint32_t)(s >> 32), (uint32_t)tid, (float)eps);
}
"""
CPP_SRC = "void run_noise(torch::Tensor out, int64_t seed, int64_t tid);\nvoid run_perturb(torch::Tensor w, int64_t seed, int64_t tid, double eps);"


def build():
    return load_inline("mazo_plain_transform", CPP_SRC, cuda_sources=CUDA_SRC, functions=["run_noise", "run_perturb"],
                       extra_cuda_cflags=["-O3", "--fmad=false", "-gencode=arch=compute_90,code=sm_90"],
                       verbose=False)
