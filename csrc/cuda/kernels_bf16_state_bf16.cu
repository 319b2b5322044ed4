// Kernel instantiations for __nv_bfloat16 parameters with bf16 state (docs/spec.md section 5.1):
// every MADA variant and AdaMod/DiffMod (the dot pass reads no state: kernels_bf16.cu has it).
#include "cuda/kernel_table.cuh"

MADA_CUDA_DEFINE_TABLE(bf16_state_bf16, __nv_bfloat16, true)
