// The f16_hw kernel family of mazo_C::zo_apply_ (csrc/zo_cuda_kernel.cuh): one translation unit per family.
#include "zo_cuda_kernel.cuh"

namespace mazo_cuda {
const void* kernels_f16_hw(int spec, int minb) { return kernel_table<mazo::DT_F16_HW, false>(spec, minb); }
}  // namespace mazo_cuda
