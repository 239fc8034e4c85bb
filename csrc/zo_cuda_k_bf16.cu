// The bf16 kernel family of mazo_C::zo_apply_ (csrc/zo_cuda_kernel.cuh): one translation unit per family.
#include "zo_cuda_kernel.cuh"

namespace mazo_cuda {
const void* kernels_bf16(int spec, int minb) { return kernel_table<mazo::DT_BF16, false>(spec, minb); }
}  // namespace mazo_cuda
