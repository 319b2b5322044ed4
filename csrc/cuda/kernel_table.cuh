// The per-dtype table of kernel launchers (see launch.h: KernelTable). Kept
// apart from step_kernel.cuh so the kernel body also compiles as plain C++.
#pragma once

#include <utility>

#include "cuda/step_kernel.cuh"

namespace mada_cuda {

template <typename P, bool SB, class Op>
void launch(const Args& a, int64_t blocks, void* stream) {
  MADA_LAUNCH(dim3(unsigned(blocks)), kThreads, static_cast<cudaStream_t>(stream), step_kernel<P, SB, Op>)(a);
}

// SB: bf16 state. The dot pass reads no state, so only the fp32-state table has
// one (execute() takes it from there).
template <typename P, bool SB, std::size_t... V>
KernelTable make_table(std::index_sequence<V...>) {
  using S = typename StateOf<P>::type;
  return KernelTable{{&launch<P, SB, MadaOp<S, int(V)>>...},
                     SB ? nullptr : &launch<P, false, DotOp<S>>,
                     {&launch<P, SB, AdamodOp<S, false>>, &launch<P, SB, AdamodOp<S, true>>}};
}

}  // namespace mada_cuda

// Defines table_<name>() in one translation unit per (param dtype, state
// storage) (they compile in parallel).
#define MADA_CUDA_DEFINE_TABLE(NAME, P, SB)                                                    \
  namespace mada_cuda {                                                                        \
  const KernelTable& table_##NAME() {                                                          \
    static const KernelTable t = make_table<P, SB>(std::make_index_sequence<kMadaVariants>{}); \
    return t;                                                                                  \
  }                                                                                            \
  }
