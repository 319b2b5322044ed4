// The CUDA language and runtime as the kernel sources see them. Under nvcc: the
// toolkit's headers. Under a plain C++ compiler: cuda_on_cpu.h, which runs the
// same kernels on host threads (tests/native: the kernels without a GPU, under
// the sanitizers).
//
// The two constructs a C++ compiler cannot parse go through macros:
//   MADA_LAUNCH(grid, threads, stream, kernel)(args...)   a kernel launch
//   MADA_SHARED(T, name);                                  a __shared__ variable
// The kernel comes last in MADA_LAUNCH because a template kernel's name holds
// commas (step_kernel<P, Op>); T may be an array type (double[4]).
#pragma once

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define MADA_LAUNCH(grid, threads, stream, ...) __VA_ARGS__<<<(grid), (threads), 0, (stream)>>>
#define MADA_SHARED(T, name)  \
  using name##_shared_t = T; \
  __shared__ name##_shared_t name

#else

#include "cuda/cuda_on_cpu.h"

#endif
