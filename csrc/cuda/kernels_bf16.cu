// Kernel instantiations for bf16 (__nv_bfloat16) parameters:
// every MADA variant, the dot pass, AdaMod/DiffMod.
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kBF16, kStoreCompute, kStoreCompute)
