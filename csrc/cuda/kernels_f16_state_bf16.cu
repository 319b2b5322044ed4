// Kernel instantiations for __half (fp16) parameters with bf16 state (docs/spec.md section 5.1):
// every MADA variant and AdaMod/DiffMod (the dot pass reads no state: kernels_f16.cu has it).
#include "cuda/kernel_table.cuh"

MADA_CUDA_DEFINE_TABLE(f16_state_bf16, __half, true)
