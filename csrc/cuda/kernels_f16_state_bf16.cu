// Kernel instantiations for fp16 (__half) parameters with bf16 state (docs/spec.md section 5.1):
// every MADA variant and AdaMod/DiffMod (the dot pass reads no state).
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kF16, kStoreBf16, kStoreCompute)
