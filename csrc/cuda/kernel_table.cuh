// The per-dtype tables of kernel launchers (see launch.h: KernelTable, table).
// Kept apart from step_kernel.cuh so the kernel body also compiles as plain C++.
#pragma once

#include <utility>

#include "cuda/step_kernel.cuh"

namespace mada_cuda {

template <int D> struct ParamOf;
template <> struct ParamOf<kF32> { using type = float; };
template <> struct ParamOf<kF64> { using type = double; };
template <> struct ParamOf<kBF16> { using type = __nv_bfloat16; };
template <> struct ParamOf<kF16> { using type = __half; };

template <typename P, bool SB, bool TB, int PR, class Op>
void launch(const Args& a, int64_t blocks, void* stream) {
  MADA_LAUNCH(dim3(unsigned(blocks)), kThreads, static_cast<cudaStream_t>(stream), step_kernel<P, SB, TB, PR, Op>)(a);
}

// The launcher of one pass, or null where bf16 storage of what the pass never
// touches (state: SB, tangent rows: TB) or a parameter rounding (PR) of a pass
// that writes no parameters would only repeat a plainer table's kernel:
// execute() takes such passes from the table without that storage or rounding.
template <typename P, bool SB, bool TB, int PR, class Op>
constexpr LaunchFn launcher() {
  if constexpr ((SB && !Op::kUpdate) || (TB && !Op::kMayDot) || (PR != kRoundNearest && !Op::kUpdate))
    return nullptr;
  else
    return &launch<P, SB, TB, PR, Op>;
}

template <typename P, bool SB, bool TB, int PR, std::size_t... V>
KernelTable make_table(std::index_sequence<V...>) {
  using S = typename StateOf<P>::type;
  return KernelTable{{launcher<P, SB, TB, PR, MadaOp<S, int(V)>>()...},
                     launcher<P, SB, TB, PR, DotOp<S>>(),
                     {launcher<P, SB, TB, PR, AdamodOp<S, false>>(), launcher<P, SB, TB, PR, AdamodOp<S, true>>()}};
}

template <int D, bool SB, bool TB, int PR>
const KernelTable& table() {
  static const KernelTable t =
      make_table<typename ParamOf<D>::type, SB, TB, PR>(std::make_index_sequence<kMadaVariants>{});
  return t;
}

}  // namespace mada_cuda

// Instantiates table<D, SB, TB, kRoundNearest>() in this translation unit: one
// per (param dtype, state storage, tangent storage), so they compile in
// parallel; MADA_CUDA_ROUNDED_TABLES the bf16 parameters' other two roundings.
#define MADA_CUDA_TABLE(D, SB, TB) \
  namespace mada_cuda {            \
  template const KernelTable& table<D, SB, TB, kRoundNearest>(); \
  }
#define MADA_CUDA_ROUNDED_TABLES(SB, TB)                           \
  namespace mada_cuda {                                            \
  template const KernelTable& table<kBF16, SB, TB, kRoundStochastic>(); \
  template const KernelTable& table<kBF16, SB, TB, kRoundKahan>(); \
  }
