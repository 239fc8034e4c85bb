// The f32_xor kernel family of mazo_C::zo_apply_ (csrc/zo_cuda_kernel.cuh): one translation unit per family.
#include "zo_cuda_kernel.cuh"

namespace mazo_cuda {
const void* kernels_f32_xor(int spec, int minb) { return kernel_table<mazo::DT_F32, true>(spec, minb); }
}  // namespace mazo_cuda
