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

#include "zo_cuda_kernel.cuh"
#include "zo_host_common.h"

namespace {

using namespace mazo;

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
                   const c10::optional<at::Tensor>& seed_dev, bool dense_aligned) {
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
  bool any_masked_fast = false;  // a threshold, packed-bit or row-index (element units) mask tensor in the call
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
    // fast: 16-byte aligned element units; the dense kernels take it for unmasked tensors, the masked kernels for
    // threshold, packed-bit and row-index masks too (the kernel tests the kind; row-index tables that run as
    // entries keep the generic path)
    const bool masked = mask.numel() > 0 && d.work == WORK_ELEMENTS;
    any_masked_fast = any_masked_fast || masked;
    d.fast = (d.work == WORK_ELEMENTS &&
              (reinterpret_cast<uintptr_t>(d.in) & 15u) == 0 &&
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
  const char* whole_env = std::getenv("MAZO_CUDA_WHOLE_UNITS");  // experiment (OpParams::whole_unit_store)
  a.P.whole_unit_store = whole_env && std::atoi(whole_env) == 1;
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
  // perturbed_copy and update_ with prior 0 (the transient mode's passes) are specialised for the default
  // storage kernels only (has_transient_spec); elsewhere the family returns no kernel and the call runs generic.
  const bool hot = (op == OP_PERTURB || op == OP_COPY || op == OP_UPDATE || op == OP_UPDATE_PERTURB) &&
                   !f32_plain_perturb;
  int spec = spec_on && hot ? spec_of((int)op, prior_nz, (int)dist) : -1;
  // Generic bf16 kernel: calls whose tensors all take the fast path run the 3-blocks-per-SM kernel for update_ and
  // Gaussian noise (on an H200 6-11% faster there, 6% slower for Rademacher perturb_: bench/results/h200_2026-12-01/
  // minblocks); MAZO_CUDA_MINBLOCKS=2|3 forces one (bf16 only).
  bool all_fast = true, all_whole_units = true;  // all_whole_units: every tensor with work a multiple of 8 long
  for (const Desc& d : descs) {
    all_fast = all_fast && ((d.fast && d.mask8 == nullptr && d.cols == nullptr) || d.units == 0);
    all_whole_units = all_whole_units && (d.n % UNIT == 0 || d.units == 0);
  }
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
  const void* (*family)(int, int) = f32_xor ? mazo_cuda::kernels_f32_xor
                                   : kdt == DT_F32 ? mazo_cuda::kernels_f32
                                   : kdt == DT_F16 ? mazo_cuda::kernels_f16
                                   : kdt == DT_F16_HW ? mazo_cuda::kernels_f16_hw
                                   : kdt == DT_BF16_HW ? mazo_cuda::kernels_bf16_hw
                                                       : mazo_cuda::kernels_bf16;
  const void* kfn = nullptr;
  // The masked and dense-only kernels run update_ only with one update seed, which with a prior is the restored one
  // (the ZO step's update): their update is that seed's alone, straight-line (fast_oct's ONE_SEED). Other update_
  // calls (several seeds) run the specialisations' seed loop. With seeds in device memory (seed_dev: a captured
  // mk.GraphedZOStep) the int seeds carry their equality pattern (the op's contract, docs/API.md), so the same test
  // holds, for the dense-only kernels too: a captured lookahead step's op 3 is then one fused launch.
  const bool one_seed_update = P.nupd == 1 && (!prior_nz || seeds[1] == seeds[0]);
  const bool one_seed_ok = op != OP_UPDATE || one_seed_update;  // (no masked kernel runs OP_UPDATE_PERTURB)
  const bool is_update = op == OP_UPDATE || op == OP_UPDATE_PERTURB;
  const bool one_seed_ok_dense = !is_update || one_seed_update;
  // Calls with a threshold, packed-bit or row-index mask: the masked specialisation (default storage kernels; fp32
  // without the exchange), whose fast path handles masked units; MAZO_CUDA_MASKED_FAST=0 (read per call) keeps the
  // dense kernel, where masked tensors run element units (same bits). nullptr where a family has none.
  const char* mfast_env = std::getenv("MAZO_CUDA_MASKED_FAST");
  if (spec >= 0 && any_masked_fast && one_seed_ok && !(mfast_env && std::atoi(mfast_env) == 0))
    kfn = (f32_xor ? mazo_cuda::kernels_f32 : family)(spec | MASKED_SPEC, 0);
  // Calls the caller promised dense_aligned (every tensor unmasked at an 8-aligned global offset; the kernel traps if
  // a block finds otherwise) whose tensors are also 16-byte aligned and a multiple of 8 long: the dense-only
  // specialisation (16-bit default storage kernels), without the masked, tail and unaligned paths and their
  // registers. MAZO_CUDA_DENSE=0 (read per call) keeps the kernels that carry them (same bits).
  const char* dense_env = std::getenv("MAZO_CUDA_DENSE");
  if (kfn == nullptr && spec >= 0 && dense_aligned && !any_masked_fast && all_fast && all_whole_units &&
      one_seed_ok_dense && !(dense_env && std::atoi(dense_env) == 0))
    kfn = family(spec | DENSE_SPEC, 0);  // nullptr where the family has none
  if (kfn == nullptr && op == OP_UPDATE_PERTURB) {
    // Fused only by the dense-only kernels (16-bit storage, gaussian_fast and Rademacher noise, one update seed):
    // elsewhere the two ops it is defined as, each with its own kernel choice. seed_dev's layout (the seeds, then
    // sr_seed) is cut into each op's by device copies (capturable).
    const int64_t n = (int64_t)seeds.size();
    const std::vector<int64_t> upd(seeds.begin(), seeds.end() - 1), next(1, seeds[n - 1]);
    c10::optional<at::Tensor> sd_upd, sd_next;
    if (has_seed_dev) {
      sd_upd = at::cat({seed_dev->narrow(0, 0, n - 1), seed_dev->narrow(0, n, 1)});
      sd_next = seed_dev->narrow(0, n - 1, 2);
    }
    zo_apply_cuda(params, outs, masks, meta, fvals, upd, gs, OP_UPDATE, dist, rounding, sr_seed, threshold_mode,
                  0.0, prior, lr, sd_upd, dense_aligned);
    zo_apply_cuda(params, outs, masks, meta, fvals, next, gs, OP_PERTURB, dist, ROUND_NEAREST, 0, THRESH_LATCH_WRITE,
                  scale, 0.0, 0.0, sd_next, dense_aligned);
    return;
  }
  if (kfn == nullptr && spec >= 0) kfn = family(spec, 0);
  if (kfn == nullptr) kfn = family(-1, minb3 ? 3 : 2);  // no specialisation for this call: the generic kernel
  TORCH_CHECK(kfn != nullptr, "zo_apply_ (CUDA): no kernel for this storage type");
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
