// Kernel instantiations for float parameters: every MADA variant, the dot pass, AdaMod/DiffMod.
#include "cuda/kernel_table.cuh"

MADA_CUDA_DEFINE_TABLE(f32, float, false)
