// Kernel instantiations for float64 parameters (fp64 state and tangents):
// every MADA variant, the dot pass, AdaMod/DiffMod.
#include "cuda/kernel_table.cuh"

MADA_CUDA_TABLE(kF64, kStoreCompute, kStoreCompute)
