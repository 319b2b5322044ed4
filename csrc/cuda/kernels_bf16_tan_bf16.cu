// Kernel instantiations for bf16 (__nv_bfloat16) parameters with bf16 tangent rows (docs/spec.md section 5.3):
// the MADA variants that write tangents and the dot pass (the others read no rows).
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kBF16, kStoreCompute, kStoreBf16)
