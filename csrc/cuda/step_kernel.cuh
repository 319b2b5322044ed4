// The fused step kernel: one template serves MADA (32 state/tangent variants), its
// dot-only pass and AdaMod/DiffMod, with fp32/fp64 or bf16 state and tangent rows. The
// per-element math is mada_math.h; this file only moves memory: chunked schedule,
// 16-byte vector loads, deterministic partial sums. Included by kernel_table.cuh (the per-dtype kernel files) and launch.cu.
#pragma once

#include <cstring>

#include "cuda/cuda_api.h"
#include "cuda/launch.h"
#include "mada_math.h"

namespace mada_cuda {

// State and arithmetic dtype: fp32, except fp64 for fp64 params (abi.h: Dtype).
template <typename P> struct StateOf { using type = float; };
template <> struct StateOf<double> { using type = double; };

__device__ __forceinline__ float to_state(float x) { return x; }
__device__ __forceinline__ double to_state(double x) { return x; }
__device__ __forceinline__ float to_state(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_state(__half x) { return __half2float(x); }

// Round once, to nearest even, as torch's .to(dtype) does.
template <typename P> __device__ __forceinline__ P from_state(typename StateOf<P>::type x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_state<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_state<__half>(float x) { return __float2half_rn(x); }

// How state (Call::state_dtype) and tangent rows (Call::tangent_dtype) are
// stored: as the compute type S, or, for fp32 compute with bf16 storage (SB), as
// bf16 bit patterns (docs/spec.md sections 5.1 and 5.3).
// A bf16 value reaches put() already rounded to a bf16 value by the math's
// storage policy (mada::StoreBf16Sr, which round() makes for an element), so
// put() truncates exactly and load() widens exactly. Raw uint16_t bits rather
// than __nv_bfloat16: they are moved, never converted, so a NaN keeps the bits
// sr_bf16 gave it, as the CPU backend stores them.
template <typename S, bool SB>
struct Stored {
  using type = S;
  __device__ static S load(S x) { return x; }
  __device__ static S put(S x) { return x; }
  __device__ static mada::StoreExact round(const uint32_t*, int64_t) { return {}; }
};
template <>
struct Stored<float, true> {
  using type = uint16_t;
  __device__ static float load(uint16_t x) {
    const uint32_t u = uint32_t(x) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
  }
  __device__ static uint16_t put(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return uint16_t(u >> 16);
  }
  // key: the segment's sr_key per buffer number; index: the element's flat state index.
  __device__ static mada::StoreBf16Sr round(const uint32_t* key, int64_t index) {
    return mada::StoreBf16Sr{key, uint64_t(index)};
  }
};

// N consecutive elements; VEC: as 16-byte accesses (caller checked alignment).
template <bool VEC, int N, typename T>
__device__ __forceinline__ void load(const T* p, T (&out)[N]) {
  if constexpr (VEC) {
    constexpr int per = 16 / sizeof(T);
    static_assert(N % per == 0, "vector unit must fill whole 16-byte words");
#pragma unroll
    for (int w = 0; w < N / per; ++w) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[w];
      memcpy(&out[w * per], &raw, 16);  // register bit-cast, no memory traffic
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = p[j];
  }
}

template <bool VEC, int N, typename T>
__device__ __forceinline__ void store(T* p, const T (&in)[N]) {
  if constexpr (VEC) {
    constexpr int per = 16 / sizeof(T);
#pragma unroll
    for (int w = 0; w < N / per; ++w) {
      uint4 raw;
      memcpy(&raw, &in[w * per], 16);
      reinterpret_cast<uint4*>(p)[w] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = in[j];
  }
}

// How a unit reads and writes its N parameters (Call::param_round, docs/spec.md
// section 5.2): a policy at the load and store sites, as the CPU kernels' ParamIo,
// so the kernel is written once. kRoundNearest (from_state) serves every dtype;
// the other two exist for bf16 parameters only. begin/end move what the policy
// keeps beside the parameters (Kahan's compensation) at the unit's flat state
// index e; key: the segment's sr_key of buffer kBufParam; index: the element's
// flat state index.
template <typename P, int PR, int N>
struct ParamIo {
  template <bool VEC> __device__ void begin(const Common&, int64_t) {}
  __device__ typename StateOf<P>::type load(P x, int) const { return to_state(x); }
  __device__ P store(typename StateOf<P>::type x, int, uint32_t, int64_t) { return from_state<P>(x); }
  template <bool VEC> __device__ void end(const Common&, int64_t) const {}
};
__device__ __forceinline__ __nv_bfloat16 bf16_of(float rounded) {  // rounded: a bf16 value, moved exactly
  const uint16_t u = Stored<float, true>::put(rounded);
  __nv_bfloat16 b;
  memcpy(&b, &u, sizeof b);
  return b;
}
template <int N>
struct ParamIo<__nv_bfloat16, kRoundStochastic, N> {  // bf16_stochastic_round
  template <bool VEC> __device__ void begin(const Common&, int64_t) {}
  __device__ float load(__nv_bfloat16 x, int) const { return to_state(x); }
  __device__ __nv_bfloat16 store(float x, int, uint32_t key, int64_t index) {
    return bf16_of(mada::sr_bf16(x, mada::sr_bits(key, uint64_t(index))));
  }
  template <bool VEC> __device__ void end(const Common&, int64_t) const {}
};
template <int N>
struct ParamIo<__nv_bfloat16, kRoundKahan, N> {  // kahan_sum: the step reads and writes theta + comp
  uint16_t comp[N];  // bf16 bit patterns, moved and never converted (as Stored)
  template <bool VEC> __device__ void begin(const Common& c, int64_t e) {
    mada_cuda::load<VEC>(static_cast<const uint16_t*>(c.comp) + e, comp);
  }
  __device__ float load(__nv_bfloat16 x, int q) const {
    return mada::kahan_weight(to_state(x), Stored<float, true>::load(comp[q]));
  }
  __device__ __nv_bfloat16 store(float x, int q, uint32_t, int64_t) {
    const float stored = mada::rne_bf16(x);
    comp[q] = Stored<float, true>::put(mada::kahan_comp(x, stored));
    return bf16_of(stored);
  }
  template <bool VEC> __device__ void end(const Common& c, int64_t e) const {
    mada_cuda::store<VEC>(static_cast<uint16_t*>(c.comp) + e, comp);
  }
};

// ---- Ops: which buffers a pass touches, its per-segment scalars, its element ----

struct NoScalars {};

template <typename S, int V>
struct MadaOp {
  static constexpr bool kBeta3 = V & kHasBeta3, kVbar = V & kHasVbar, kLion = V & kHasLion,
                        kMod = V & kHasMod, kTan = V & kTangents;
  static constexpr bool kUpdate = true;
  static constexpr bool kMayDot = kTan;  // a dot needs last step's tangents
  static constexpr unsigned kBufMask = mada_slots(V);
  using Scalars = mada::MadaScalars<S>;

  __device__ static Scalars make(const Common& c, double lr, double wd, double t) {
    const mada::MadaConst k{c.k[kEps], c.k[kModBeta], c.k[kLionBeta1], c.k[kLionBeta2], c.vbar_detach != 0};
    return mada::make_mada_scalars<S>(c.coef, lr, wd, t, k);
  }
  template <class R>
  __device__ static S element(const Scalars& k, S g, S theta, S (&st)[kMaxSlots], S (&tan)[kNumCoef],
                              const R& round) {
    mada::MadaState<S> s{st[kM], st[kV], st[kN], st[kGPrev], st[kL], st[kVb], st[kS]};
    const S out = mada::mada_element<S, kBeta3, kVbar, kLion, kMod, kTan>(k, g, theta, s, tan, round);
    st[kM] = s.m; st[kV] = s.v; st[kN] = s.n; st[kGPrev] = s.g_prev; st[kL] = s.l; st[kVb] = s.vb; st[kS] = s.s;
    return out;
  }
};

// hyper_order="exact": reads grads and tangents only (no scalars, no element math).
template <typename S>
struct DotOp {
  static constexpr bool kUpdate = false, kMayDot = true, kTan = false;
  static constexpr unsigned kBufMask = 0;
  using Scalars = NoScalars;
};

template <typename S, bool DIFF>
struct AdamodOp {
  static constexpr bool kUpdate = true, kMayDot = false, kTan = false;
  static constexpr unsigned kBufMask = adamod_slots(DIFF ? kDiff : 0u);
  using Scalars = mada::AdamodScalars<S>;
  __device__ static Scalars make(const Common& c, double lr, double wd, double t) {
    return mada::make_adamod_scalars<S>(c.k[kAdamodBeta1], c.k[kAdamodBeta2], c.k[kAdamodBeta3],
                                        c.k[kAdamodEps], lr, wd, t);
  }
  template <class R>
  __device__ static S element(const Scalars& k, S g, S theta, S (&st)[kMaxSlots], S (&)[kNumCoef],
                              const R& round) {
    return mada::adamod_element<S, DIFF>(k, g, theta, st[kAm], st[kAv], st[kAs], st[kAgPrev], round);
  }
};

// Per-segment constants in shared memory: the op's scalars and, for bf16 state
// or tangent rows, the stochastic-rounding key of each buffer number (sr_key of
// the seed, the parameter's step and the number: state slots, then kBufTan0 + j
// for coefficient j's row) and, for bf16_stochastic_round, that of kBufParam
// (pkey), formed once per segment.
template <class Op>
struct SegConsts {
  typename Op::Scalars k;
  uint32_t key[mada::kBufTan0 + kNumCoef];
  uint32_t pkey;
};

// ---- One unit: N consecutive elements of one segment, starting at element i ----
// Params and grads move as 16-byte words (N fills at least one word of params,
// of stored state and of stored tangents); state and tangent rows in sub-units
// of M (one 16-byte word of the narrower stored type), tangent rows in words of
// TW within those. So a bf16-param unit holds half its fp32 state in registers
// at a time, and bf16 state or tangents are read as words of 8 elements.
// TB: the tangent rows are stored in bf16; PR: Call::param_round (ParamIo).

template <typename P, bool SB, bool TB, int PR, class Op, bool VEC, int N>
__device__ __forceinline__ void run_unit(const Common& c, const SegConsts<Op>& k, P* param,
                                         const P* grad, int64_t soff, int64_t i, bool dot,
                                         typename StateOf<P>::type scale, double (&acc)[kNumCoef]) {
  using S = typename StateOf<P>::type;
  using St = Stored<S, SB>;
  using W = typename St::type;
  using Tt = Stored<S, TB>;
  using R = typename Tt::type;
  constexpr std::size_t narrow = sizeof(W) < sizeof(R) ? sizeof(W) : sizeof(R);
  constexpr int M = (VEC && N * narrow > 16) ? int(16 / narrow) : N;
  constexpr int TW = (VEC && M * sizeof(R) > 16) ? int(16 / sizeof(R)) : M;
  P graw[N], praw[N];
  load<VEC>(grad + i, graw);
  ParamIo<P, PR, N> pio;
  if constexpr (Op::kUpdate) {
    load<VEC>(param + i, praw);
    pio.template begin<VEC>(c, soff + i);
  }
  S g[N];
#pragma unroll
  for (int q = 0; q < N; ++q) {
    g[q] = to_state(graw[q]);
    if (c.grad_scale) g[q] = g[q] / scale;
    if (c.maximize) g[q] = -g[q];
  }
#pragma unroll
  for (int h = 0; h < N; h += M) {
    const int64_t e = soff + i + h;  // flat state index
    // Tangent row of coefficient j is its rank among the learned ones (abi.h).
    R* trow[kNumCoef] = {};
    if constexpr (Op::kMayDot || Op::kTan) {
#pragma unroll
      for (int j = 0, r = 0; j < kNumCoef; ++j) {
        trow[j] = static_cast<R*>(c.tan) + r * c.tan_stride + e;
        r += (c.learn_mask >> j) & 1u;
      }
    }
    if (Op::kMayDot && dot) {  // last step's tangents, before this step overwrites them
#pragma unroll
      for (int j = 0; j < kNumCoef; ++j) {
        if (!((c.learn_mask >> j) & 1u)) continue;
#pragma unroll
        for (int w = 0; w < M; w += TW) {
          R t[TW];
          load<VEC>(trow[j] + w, t);
#pragma unroll
          for (int q = 0; q < TW; ++q) acc[j] = fma(double(g[h + w + q]), double(Tt::load(t[q])), acc[j]);
        }
      }
    }
    if constexpr (Op::kUpdate) {
      W st[kMaxSlots][M] = {};
#pragma unroll
      for (int b = 0; b < kMaxSlots; ++b)
        if ((Op::kBufMask >> b) & 1u) load<VEC>(static_cast<const W*>(c.buf[b]) + e, st[b]);
#pragma unroll
      for (int w = 0; w < M; w += TW) {
        R tan[kNumCoef][TW];
#pragma unroll
        for (int q = 0; q < TW; ++q) {
          const int x = w + q;
          S sq[kMaxSlots], tq[kNumCoef] = {};
#pragma unroll
          for (int b = 0; b < kMaxSlots; ++b) sq[b] = St::load(st[b][x]);
          praw[h + x] = pio.store(
              Op::element(k.k, g[h + x], pio.load(praw[h + x], h + x), sq, tq, St::round(k.key, e + x)), h + x,
              k.pkey, e + x);
#pragma unroll
          for (int b = 0; b < kMaxSlots; ++b) st[b][x] = St::put(sq[b]);
          const auto trnd = Tt::round(k.key, e + x);  // a tangent is rounded where it is stored
#pragma unroll
          for (int j = 0; j < kNumCoef; ++j) tan[j][q] = Tt::put(trnd(mada::kBufTan0 + j, tq[j]));
        }
        if constexpr (Op::kTan) {
#pragma unroll
          for (int j = 0; j < kNumCoef; ++j)
            if ((c.learn_mask >> j) & 1u) store<VEC>(trow[j] + w, tan[j]);
        }
      }
#pragma unroll
      for (int b = 0; b < kMaxSlots; ++b)
        if ((Op::kBufMask >> b) & 1u) store<VEC>(static_cast<W*>(c.buf[b]) + e, st[b]);
    }
  }
  if constexpr (Op::kUpdate) {
    store<VEC>(param + i, praw);
    pio.template end<VEC>(c, soff + i);
  }
}

// Warp shuffles, then warps in index order: a fixed tree, so bitwise deterministic.
__device__ __forceinline__ double block_sum(double v, double* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // sh may still be read from the previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) s += sh[w];
  return s;  // valid in thread 0 only
}

// Block b owns launch indices [b * chunk, (b + 1) * chunk); a chunk can span
// several segments, each stepped with its own scalars. Every block writes its
// partial-sum slot (zero when it had nothing to add) so the reduction reads no
// uninitialised memory.
// Register cap: 3 blocks of 128 threads per SM (<= 168 registers) keeps the
// heaviest fp32/bf16 variants (all six tangents) at 12 warps per SM with no
// spills; fp64 (the test oracle) needs more registers and gets 2 blocks. With
// bf16 state or rows a unit holds 8 elements' state and tangents at once: ptxas
// (sm_90) reports spills in 1-4 variants per table, at most 164 bytes, not yet
// timed on a GPU against 2 blocks per SM.
template <typename P>
constexpr int kMinBlocks = sizeof(typename StateOf<P>::type) == 8 ? 2 : 3;

// SB, TB: the state, the tangent rows are stored in bf16 (fp32 compute only);
// PR: how the parameters are rounded (ParamIo).
template <typename P, bool SB, bool TB, int PR, class Op>
__global__ void __launch_bounds__(kThreads, kMinBlocks<P>) step_kernel(const __grid_constant__ Args a) {
  using S = typename StateOf<P>::type;
  using W = typename Stored<S, SB>::type;
  using R = typename Stored<S, TB>::type;
  const Common& c = a.c;
  const SegTable& t = a.s;
  if (c.found_inf && *c.found_inf != 0.0f) return;  // GradScaler skip: change nothing
  const S scale = c.grad_scale ? S(*c.grad_scale) : S(1);
  const bool dot = Op::kMayDot && c.dot;
  double acc[kNumCoef] = {};
  MADA_SHARED(SegConsts<Op>, sk);

  const int64_t c0 = int64_t(blockIdx.x) * c.chunk, c1 = c0 + c.chunk;
  int lo = 0, hi = t.n - 1;  // last segment with vstart <= c0 (uniform over the block)
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (t.vstart[mid] <= c0) lo = mid; else hi = mid - 1;
  }
  for (int s = lo; s < t.n && t.vstart[s] < c1; ++s) {
    const int64_t vs = t.vstart[s];
    const int64_t a0 = (c0 > vs ? c0 : vs) - vs;  // a multiple of kPad
    const int64_t end = vs + t.numel[s];
    const int64_t a1 = (c1 < end ? c1 : end) - vs;
    if (a0 >= a1) continue;
    if constexpr (Op::kUpdate) {
      __syncthreads();  // everyone is done with the previous segment's scalars
      if (threadIdx.x == 0) {
        const double step = c.steps[t.pidx[s]];
        sk.k = Op::make(c, c.lr[t.group[s]], c.wd[t.group[s]], step);
        const uint32_t t32 = uint32_t(uint64_t(step));
        if constexpr (SB)
          for (int b = 0; b < kMaxSlots; ++b) sk.key[b] = mada::sr_key(c.sr_seed, t32, uint32_t(b));
        if constexpr (TB && Op::kTan)
          for (int b = mada::kBufTan0; b < mada::kBufTan0 + kNumCoef; ++b)
            sk.key[b] = mada::sr_key(c.sr_seed, t32, uint32_t(b));
        if constexpr (PR == kRoundStochastic) sk.pkey = mada::sr_key(c.sr_seed, t32, uint32_t(mada::kBufParam));
      }
      __syncthreads();
    }
    const SegConsts<Op>& k = sk;  // read from shared memory at each use
    P* param = static_cast<P*>(t.param[s]);
    const P* grad = static_cast<const P*>(t.grad[s]);
    const int64_t off = t.off[s];
    int64_t tail = a0;
    if ((t.aligned[s >> 5] >> (s & 31)) & 1u) {
      // At least one 16-byte word of params, of stored state and of stored tangents per unit.
      constexpr std::size_t narrow = sizeof(P) < sizeof(W) ? (sizeof(P) < sizeof(R) ? sizeof(P) : sizeof(R))
                                                           : (sizeof(W) < sizeof(R) ? sizeof(W) : sizeof(R));
      constexpr int U = int(16 / narrow);
      static_assert(kPad % U == 0, "a0 must start a unit");
      const int64_t u1 = a1 / U;
      for (int64_t u = a0 / U + threadIdx.x; u < u1; u += kThreads)
        run_unit<P, SB, TB, PR, Op, true, U>(c, k, param, grad, off, u * U, dot, scale, acc);
      tail = u1 * U;
    }
    for (int64_t i = tail + threadIdx.x; i < a1; i += kThreads)
      run_unit<P, SB, TB, PR, Op, false, 1>(c, k, param, grad, off, i, dot, scale, acc);
  }

  if (dot) {
    MADA_SHARED(double[kThreads / 32], sh);
#pragma unroll
    for (int j = 0, r = 0; j < kNumCoef; ++j) {
      if (!((c.learn_mask >> j) & 1u)) continue;
      const double v = block_sum(acc[j], sh);
      if (threadIdx.x == 0) c.slots[r * c.slot_stride + c.block_base + blockIdx.x] = v;
      ++r;
    }
  }
}

}  // namespace mada_cuda
