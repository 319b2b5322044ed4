// Kernel instantiations for bf16 (__nv_bfloat16) parameters with bf16 state and tangent rows:
// the MADA variants that write tangents.
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kBF16, kStoreBf16, kStoreBf16)
