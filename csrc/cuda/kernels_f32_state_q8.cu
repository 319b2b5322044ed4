// Kernel instantiations for float parameters with 8-bit state (docs/spec.md section 5.4),
// with fp32 and with bf16 tangent rows: every MADA variant and AdaMod/DiffMod (the dot
// pass reads no state).
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kF32, kStoreQ8, kStoreCompute)
MADA_CUDA_TABLE(kF32, kStoreQ8, kStoreBf16)
