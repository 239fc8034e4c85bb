// Host-side helpers shared by the CPU and CUDA registrations: argument checks and the op parameters.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <type_traits>
#include <vector>

#include "zo_apply_common.h"

namespace mazo {

// Error messages are assembled here into one std::string (c10::str passes a single string through) instead of by
// c10::str's ostream: on the GPU machine (torch 2.11, GCC 13.3, Python 3.12) the ostream integer formatting that
// -O3 inlines into the extension crashed the process inside std::ostream::_M_insert<long> (cuda-gdb backtrace;
// bench/check_cpp_errors.py), so every message with a number in it was a segfault instead of an error.
inline void cat_one(std::string& s, const char* x) { s += x; }
inline void cat_one(std::string& s, const std::string& x) { s += x; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void cat_one(std::string& s, T x) { s += std::to_string(x); }
template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  (cat_one(s, a), ...);
  return s;
}

inline int dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return DT_F32;
    case at::kHalf: return DT_F16;
    case at::kBFloat16: return DT_BF16;
    default: TORCH_CHECK(false, cat("mazo_C::zo_apply_: unsupported dtype ", c10::toString(st),
                                     " (float32, float16, bfloat16 only)"));
  }
  return -1;
}

// Checks shared by every backend; returns the common dtype code.
inline int check_args(at::TensorList params, at::TensorList outs, at::TensorList masks, const at::Tensor& meta,
                      const at::Tensor& fvals, at::IntArrayRef seeds, const at::Tensor& gs, int64_t op, int64_t dist,
                      int64_t rounding, int64_t threshold_mode) {
  const int64_t T = (int64_t)params.size();
  TORCH_CHECK(outs.empty() || (int64_t)outs.size() == T, "zo_apply_: outs must be empty or match params");
  TORCH_CHECK((int64_t)masks.size() == T, "zo_apply_: one mask tensor per param expected");
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == T && meta.size(1) == 4, "zo_apply_: meta must be [T, 4]");
  TORCH_CHECK(fvals.dim() == 2 && fvals.size(0) == T && fvals.size(1) == 5, "zo_apply_: fvals must be [T, 5]");
  TORCH_CHECK(!seeds.empty(), "zo_apply_: at least one seed expected");
  TORCH_CHECK(op == OP_PERTURB || op == OP_UPDATE || op == OP_COPY || op == OP_UPDATE_PERTURB,
              cat("zo_apply_: bad op ", op));
  if (op == OP_UPDATE_PERTURB) {
    TORCH_CHECK(seeds.size() >= 3, cat("zo_apply_: op 3 (update then perturb) needs seeds [restore, update..., next]: "
                "at least 3, got ", seeds.size()));
    TORCH_CHECK(outs.empty(), "zo_apply_: op 3 (update then perturb) is in place only (outs must be empty)");
    TORCH_CHECK(gs.numel() >= (int64_t)seeds.size() - 2, "zo_apply_: need one projected gradient per update seed");
  }
  TORCH_CHECK(dist == DIST_GAUSSIAN || dist == DIST_RADEMACHER || dist == DIST_GAUSSIAN_FAST,
              cat("zo_apply_: bad dist ", dist, " (0 gaussian, 1 rademacher, 2 gaussian_fast)"));
  TORCH_CHECK(rounding == ROUND_NEAREST || rounding == ROUND_STOCHASTIC, cat("zo_apply_: bad rounding ", rounding));
  TORCH_CHECK(threshold_mode >= 0 && threshold_mode <= 2, cat("zo_apply_: bad threshold_mode ", threshold_mode));
  if (op == OP_UPDATE)
    TORCH_CHECK(gs.numel() >= (int64_t)seeds.size() - 1, "zo_apply_: need one projected gradient per update seed");
  int dt = -1;
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.is_contiguous(), cat("zo_apply_: param ", t, " is not contiguous"));
    const int d = dtype_code(p.scalar_type());
    TORCH_CHECK(dt < 0 || d == dt, "zo_apply_: params of one call must share a dtype");
    dt = d;
    if (!outs.empty()) {
      const at::Tensor& o = outs[t];
      TORCH_CHECK(o.is_contiguous() && o.scalar_type() == p.scalar_type() && o.numel() == p.numel() &&
                      o.device() == p.device(),
                  cat("zo_apply_: out ", t, " must be a contiguous tensor like its param"));
    }
    const at::Tensor& m = masks[t];
    if (m.numel() > 0) {
      TORCH_CHECK(m.is_contiguous() && m.device() == p.device(), cat("zo_apply_: mask ", t,
                  " must be contiguous and on the param's device"));
      TORCH_CHECK(m.scalar_type() == at::kByte || m.scalar_type() == at::kInt, cat("zo_apply_: mask ", t,
                  " must be uint8 (bits) or int32 (row indices)"));
    }
  }
  return dt;
}

inline OpParams make_op_params(at::IntArrayRef seeds, int64_t op, int64_t dist, int64_t rounding, int64_t sr_seed,
                               int64_t threshold_mode, double scale, double prior, double lr) {
  OpParams P;
  P.op = (int)op;
  P.dist = (int)dist;
  P.rounding = (int)rounding;
  P.threshold_mode = (int)threshold_mode;
  P.scale = (float)scale;
  P.prior = (float)prior;
  P.lr = (float)lr;
  P.prior_nonzero = prior != 0.0;
  P.seed0 = (uint64_t)seeds[0];
  P.sr_seed = (uint64_t)sr_seed;
  P.nupd = op == OP_UPDATE ? (int)seeds.size() - 1 : op == OP_UPDATE_PERTURB ? (int)seeds.size() - 2 : 0;
  P.seed_next = op == OP_UPDATE_PERTURB ? (uint64_t)seeds[seeds.size() - 1] : 0;
  P.useeds = nullptr;
  P.gs = nullptr;
  P.whole_unit_store = false;
  return P;
}

// seed_dev: optional int64 tensor [len(seeds) + 1] = the seeds, then sr_seed, read by the kernels in place of the
// `seeds` / `sr_seed` values (so a captured CUDA graph takes new seeds each replay). `seeds` still gives the count.
inline void check_seed_dev(const c10::optional<at::Tensor>& seed_dev, at::IntArrayRef seeds) {
  if (!seed_dev.has_value() || !seed_dev->defined()) return;
  const at::Tensor& sd = *seed_dev;
  TORCH_CHECK(sd.scalar_type() == at::kLong && sd.dim() == 1 && sd.is_contiguous(),
              cat("zo_apply_: seed_dev must be a contiguous 1-D int64 tensor, got ", c10::toString(sd.scalar_type()),
                  " with ", sd.dim(), " dims"));
  TORCH_CHECK(sd.numel() >= (int64_t)seeds.size() + 1, cat("zo_apply_: seed_dev needs len(seeds) + 1 = ",
              seeds.size() + 1, " entries (the seeds, then sr_seed), got ", sd.numel()));
}

inline bool is_rowidx_mask(const at::Tensor& m) { return m.scalar_type() == at::kInt && m.dim() == 2; }

// dense_aligned is the caller's promise that every tensor is unmasked (mask kind none) at a global offset that is a
// multiple of 8 (the CUDA backend then runs kernels without the masked and unaligned paths). Where the table is on
// the host (CPU backend) a broken promise is an error before any weight is written.
inline void check_dense_aligned(const at::Tensor& meta) {
  const at::Tensor m = meta.to(at::kCPU, at::kLong).contiguous();
  const int64_t* mp = m.data_ptr<int64_t>();
  for (int64_t t = 0; t < m.size(0); ++t) {
    TORCH_CHECK(mp[4 * t + 2] == MASK_NONE, cat("zo_apply_: dense_aligned=True but tensor ", t, " has mask kind ",
                mp[4 * t + 2], " (the promise is: every tensor unmasked, at a global offset that is a multiple of 8)"));
    TORCH_CHECK(mp[4 * t + 1] % 8 == 0, cat("zo_apply_: dense_aligned=True but tensor ", t, " has global offset ",
                mp[4 * t + 1], ", not a multiple of 8"));
  }
}

}  // namespace mazo
