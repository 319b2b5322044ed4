// Kernel instantiations for fp16 (__half) parameters:
// every MADA variant, the dot pass, AdaMod/DiffMod.
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kF16, kStoreCompute, kStoreCompute)
