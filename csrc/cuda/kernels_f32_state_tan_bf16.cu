// Kernel instantiations for float parameters with bf16 state and tangent rows:
// the MADA variants that write tangents.
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kF32, kStoreBf16, kStoreBf16)
