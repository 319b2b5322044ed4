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

template <typename P, int SK, int TK, class Op>
void launch(const Args& a, int64_t blocks, void* stream) {
  MADA_LAUNCH(dim3(unsigned(blocks)), kThreads, static_cast<cudaStream_t>(stream), step_kernel<P, SK, TK, Op>)(a);
}

// The launcher of one pass, or null where a storage of what the pass never
// touches (state: SK, tangent rows: TK) would only repeat a plainer table's
// kernel: execute() takes such passes from the table without that storage.
// 8-bit rows go with 8-bit state (abi.h): without it only their dot runs.
template <typename P, int SK, int TK, class Op>
constexpr LaunchFn launcher() {
  if constexpr ((SK != kStoreCompute && !Op::kUpdate) || (TK != kStoreCompute && !Op::kMayDot) ||
                (TK == kStoreQ8 && SK != kStoreQ8 && Op::kUpdate))
    return nullptr;
  else
    return &launch<P, SK, TK, Op>;
}

template <typename P, int SK, int TK, std::size_t... V>
KernelTable make_table(std::index_sequence<V...>) {
  using S = typename StateOf<P>::type;
  return KernelTable{{launcher<P, SK, TK, MadaOp<S, int(V)>>()...},
                     launcher<P, SK, TK, DotOp<S>>(),
                     {launcher<P, SK, TK, AdamodOp<S, false>>(), launcher<P, SK, TK, AdamodOp<S, true>>()}};
}

template <int D, int SK, int TK>
const KernelTable& table() {
  static const KernelTable t = make_table<typename ParamOf<D>::type, SK, TK>(std::make_index_sequence<kMadaVariants>{});
  return t;
}

}  // namespace mada_cuda

// Instantiates table<D, SK, TK>() in this translation unit: one per (param
// dtype, state storage, tangent storage), so they compile in parallel.
#define MADA_CUDA_TABLE(D, SK, TK) \
  namespace mada_cuda {            \
  template const KernelTable& table<D, SK, TK>(); \
  }
