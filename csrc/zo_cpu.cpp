// CPU backend of mazo_C::zo_apply_ and the definition of the op's schema.
// Build with -ffp-contract=off (no FMA contraction) and without -ffast-math: bits must match reference.py.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "zo_host_common.h"

namespace {

using namespace mazo;

constexpr int64_t GRAIN_UNITS = 512;  // 4096 elements per parallel task

template <int DT>
void run_cpu(at::TensorList params, at::TensorList outs, at::TensorList masks, const at::Tensor& meta_in,
             const at::Tensor& fvals_in, const OpParams& P) {
  using bits_t = typename Storage<DT>::bits_t;
  const at::Tensor meta = meta_in.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor fvals = fvals_in.to(at::kCPU, at::kFloat).contiguous();
  const int64_t* mp = meta.data_ptr<int64_t>();
  const float* fp = fvals.data_ptr<float>();
  for (size_t t = 0; t < params.size(); ++t) {
    TensorParams T;
    T.tid = (uint32_t)(uint64_t)mp[4 * t + 0];
    T.offset = mp[4 * t + 1];
    T.kind = (int)mp[4 * t + 2];
    T.row_len = mp[4 * t + 3];
    T.scale_mult = fp[5 * t + 0];
    T.lr_mult = fp[5 * t + 1];
    T.wd = fp[5 * t + 2];
    T.g_mult = fp[5 * t + 3];
    T.tau = fp[5 * t + 4];
    const at::Tensor& theta = params[t];
    const at::Tensor& outt = outs.empty() ? theta : outs[t];
    const at::Tensor& mask = masks[t];
    const int64_t n = theta.numel();
    TORCH_CHECK(T.kind >= MASK_NONE && T.kind <= MASK_ROWIDX, cat("zo_apply_: bad mask kind ", T.kind));
    TORCH_CHECK(T.offset >= 0, "zo_apply_: negative global offset");
    if (n == 0) continue;
    const bits_t* in = reinterpret_cast<const bits_t*>(theta.data_ptr());
    bits_t* out = reinterpret_cast<bits_t*>(outt.data_ptr());
    if (T.kind == MASK_ROWIDX) {
      TORCH_CHECK(is_rowidx_mask(mask), cat("zo_apply_: row-index mask ", t, " must be int32 [rows, k]"));
      const int64_t rows = mask.size(0), k = mask.size(1);
      TORCH_CHECK(T.row_len > 0 && rows * T.row_len <= n, cat("zo_apply_: row-index mask ", t,
                  " does not fit the tensor"));
      const int32_t* cols = mask.data_ptr<int32_t>();
      if (P.op == OP_COPY || (rowidx_as_elements(k, T.row_len) && rows * T.row_len == n)) {
        const int64_t units = (n + UNIT - 1) / UNIT;
        at::parallel_for(0, units, GRAIN_UNITS, [&](int64_t b, int64_t e) {
          for (int64_t u = b; u < e; ++u) process_element_unit<DT>(P, T, in, out, nullptr, cols, k, n, u);
        });
      } else {
        const int64_t nent = rows * k;
        if (nent == 0) continue;
        const int64_t units = (nent + UNIT - 1) / UNIT;
        at::parallel_for(0, units, GRAIN_UNITS, [&](int64_t b, int64_t e) {
          for (int64_t u = b; u < e; ++u) process_entry_unit<DT>(P, T, in, out, cols, k, nent, u);
        });
      }
      continue;
    }
    uint8_t* m8 = nullptr;
    if (T.kind == MASK_THRESHOLD || T.kind == MASK_BITMASK) {
      const bool needs = T.kind == MASK_BITMASK || P.threshold_mode != THRESH_EVAL;
      if (needs) {
        TORCH_CHECK(mask.scalar_type() == at::kByte && mask.numel() >= (n + 7) / 8, cat("zo_apply_: mask ", t,
                    " must be uint8 with ceil(numel / 8) bytes"));
        m8 = mask.data_ptr<uint8_t>();
      }
    }
    const int64_t units = (n + UNIT - 1) / UNIT;
    at::parallel_for(0, units, GRAIN_UNITS, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) process_element_unit<DT>(P, T, in, out, m8, nullptr, 0, n, u);
    });
  }
}

void zo_apply_cpu(at::TensorList params, at::TensorList outs, at::TensorList masks, const at::Tensor& meta,
                  const at::Tensor& fvals, at::IntArrayRef seeds, const at::Tensor& gs, int64_t op, int64_t dist,
                  int64_t rounding, int64_t sr_seed, int64_t threshold_mode, double scale, double prior, double lr,
                  const c10::optional<at::Tensor>& seed_dev, bool dense_aligned) {
  if (params.empty()) return;
  const int dt = check_args(params, outs, masks, meta, fvals, seeds, gs, op, dist, rounding, threshold_mode);
  check_seed_dev(seed_dev, seeds);
  if (dense_aligned) check_dense_aligned(meta);
  for (const auto& p : params) TORCH_CHECK(p.device().is_cpu(), "zo_apply_ (CPU): params must be CPU tensors");
  std::vector<int64_t> seed_vals(seeds.begin(), seeds.end());
  if (seed_dev.has_value() && seed_dev->defined()) {  // the values come from the tensor; seeds gives the count
    const at::Tensor sd = seed_dev->to(at::kCPU).contiguous();
    const int64_t* sp = sd.data_ptr<int64_t>();
    for (size_t i = 0; i < seed_vals.size(); ++i) seed_vals[i] = sp[i];
    sr_seed = sp[seed_vals.size()];
  }
  seeds = seed_vals;
  if (op == OP_UPDATE_PERTURB) {  // no fused CPU kernel: the two ops it is defined as (reference.zo_apply_)
    const std::vector<int64_t> upd(seed_vals.begin(), seed_vals.end() - 1), next(1, seed_vals.back());
    zo_apply_cpu(params, outs, masks, meta, fvals, upd, gs, OP_UPDATE, dist, rounding, sr_seed, threshold_mode, 0.0,
                 prior, lr, c10::nullopt, dense_aligned);
    zo_apply_cpu(params, outs, masks, meta, fvals, next, gs, OP_PERTURB, dist, ROUND_NEAREST, 0, THRESH_LATCH_WRITE,
                 scale, 0.0, 0.0, c10::nullopt, dense_aligned);
    return;
  }
  OpParams P = make_op_params(seeds, op, dist, rounding, sr_seed, threshold_mode, scale, prior, lr);
  std::vector<uint64_t> useeds;
  at::Tensor gsc;
  if (P.nupd > 0) {
    for (size_t i = 1; i < seeds.size(); ++i) useeds.push_back((uint64_t)seeds[i]);
    gsc = gs.to(at::kCPU, at::kFloat).contiguous().reshape({-1});
    P.useeds = useeds.data();
    P.gs = gsc.data_ptr<float>();
  }
  switch (dt) {
    case DT_F32: run_cpu<DT_F32>(params, outs, masks, meta, fvals, P); break;
    case DT_F16: run_cpu<DT_F16>(params, outs, masks, meta, fvals, P); break;
    default: run_cpu<DT_BF16>(params, outs, masks, meta, fvals, P); break;
  }
}

}  // namespace

TORCH_LIBRARY(mazo_C, m) {
  m.def(
      "zo_apply_(Tensor(a!)[] params, Tensor(b!)[] outs, Tensor(c!)[] masks, Tensor meta, Tensor fvals, "
      "int[] seeds, Tensor gs, int op, int dist, int rounding, int sr_seed, int threshold_mode, float scale, "
      "float prior, float lr, Tensor? seed_dev=None, bool dense_aligned=False) -> ()");
}

TORCH_LIBRARY_IMPL(mazo_C, CPU, m) { m.impl("zo_apply_", &zo_apply_cpu); }

// An importable (empty) Python module: importing it runs the registrations above.
#define MAZO_CAT_(a, b) a##b
#define MAZO_CAT(a, b) MAZO_CAT_(a, b)
#define MAZO_STR_(a) #a
#define MAZO_STR(a) MAZO_STR_(a)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

static PyModuleDef mazo_module_def = {PyModuleDef_HEAD_INIT, MAZO_STR(TORCH_EXTENSION_NAME),
                                      "mazo_kernels CPU kernels (registers torch.ops.mazo_C)", -1, nullptr};

PyMODINIT_FUNC MAZO_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&mazo_module_def); }
