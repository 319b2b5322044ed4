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

template <typename P, bool SB, bool TB, class Op>
void launch(const Args& a, int64_t blocks, void* stream) {
  MADA_LAUNCH(dim3(unsigned(blocks)), kThreads, static_cast<cudaStream_t>(stream), step_kernel<P, SB, TB, Op>)(a);
}

// The launcher of one pass, or null where bf16 storage of what the pass never
// touches (state: SB, tangent rows: TB) would only repeat a plainer table's
// kernel: execute() takes such passes from the table without that storage.
template <typename P, bool SB, bool TB, class Op>
constexpr LaunchFn launcher() {
  if constexpr ((SB && !Op::kUpdate) || (TB && !Op::kMayDot))
    return nullptr;
  else
    return &launch<P, SB, TB, Op>;
}

template <typename P, bool SB, bool TB, std::size_t... V>
KernelTable make_table(std::index_sequence<V...>) {
  using S = typename StateOf<P>::type;
  return KernelTable{{launcher<P, SB, TB, MadaOp<S, int(V)>>()...},
                     launcher<P, SB, TB, DotOp<S>>(),
                     {launcher<P, SB, TB, AdamodOp<S, false>>(), launcher<P, SB, TB, AdamodOp<S, true>>()}};
}

template <int D, bool SB, bool TB>
const KernelTable& table() {
  static const KernelTable t =
      make_table<typename ParamOf<D>::type, SB, TB>(std::make_index_sequence<kMadaVariants>{});
  return t;
}

}  // namespace mada_cuda

// Instantiates table<D, SB, TB>() in this translation unit: one per (param
// dtype, state storage, tangent storage), so they compile in parallel.
#define MADA_CUDA_TABLE(D, SB, TB) \
  namespace mada_cuda {            \
  template const KernelTable& table<D, SB, TB>(); \
  }
