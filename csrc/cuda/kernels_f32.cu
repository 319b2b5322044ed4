// Kernel instantiations for float parameters:
// every MADA variant, the dot pass, AdaMod/DiffMod.
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kF32, kStoreCompute, kStoreCompute)
