// Kernel instantiations for fp16 (__half) parameters with bf16 state and tangent rows:
// the MADA variants that write tangents.
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kF16, kStoreBf16, kStoreBf16)
