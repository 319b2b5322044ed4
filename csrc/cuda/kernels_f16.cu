// Kernel instantiations for __half parameters: every MADA variant, the dot pass, AdaMod/DiffMod.
#include "cuda/kernel_table.cuh"

MADA_CUDA_DEFINE_TABLE(f16, __half, false)
