// Kernel instantiations for bf16 (__nv_bfloat16) parameters with 8-bit state (docs/spec.md section 5.4),
// with fp32, bf16 and 8-bit tangent rows (section 5.5): every MADA variant and AdaMod/DiffMod;
// the dot pass reads no state, so 8-bit rows' has a table of its own.
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kBF16, kStoreQ8, kStoreCompute)
MADA_CUDA_TABLE(kBF16, kStoreQ8, kStoreBf16)
MADA_CUDA_TABLE(kBF16, kStoreQ8, kStoreQ8)
MADA_CUDA_TABLE(kBF16, kStoreCompute, kStoreQ8)
