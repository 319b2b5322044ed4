// Kernel instantiations for float parameters with bf16 state (docs/spec.md section 5.1):
// every MADA variant and AdaMod/DiffMod (the dot pass reads no state: kernels_f32.cu has it).
#include "cuda/kernel_table.cuh"

MADA_CUDA_DEFINE_TABLE(f32_state_bf16, float, true)
