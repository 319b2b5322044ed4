// The fused step kernel: one template serves MADA (32 state/tangent variants), its
// dot-only pass and AdaMod/DiffMod, with fp32/fp64, bf16 or 8-bit state and tangent
// rows. The
// per-element math is mada_math.h; this file only moves memory: chunked schedule,
// 16-byte vector loads, deterministic partial sums. Included by kernel_table.cuh (the per-dtype kernel files) and launch.cu.
#pragma once

#include <cstring>
#include <type_traits>

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

// Which of a unit's N elements exist and how they move: the first `valid`
// (fewer only in an 8-bit block's tail), as 16-byte (8-byte for 8-bit codes)
// words when `vec` (every stream of the segment is aligned: the planner's bit)
// and the unit is whole, else one by one. The 16-byte units and the one-element
// ones of other storage pass constants, so each compiles only its own path (a
// unit with both kept more registers live: spills in most bf16-row variants);
// an 8-bit block's unit decides at run time, so its element math compiles once.
struct Span {
  int valid;
  bool vec;
};

// N consecutive elements; missing ones (past span.valid) read as zero.
template <int N, typename T>
__device__ __forceinline__ void load(const T* p, T (&out)[N], Span sp) {
  constexpr int bytes = N * sizeof(T) < 16 ? int(N * sizeof(T)) : 16;
  using Word = std::conditional_t<bytes == 16, uint4, uint2>;
  constexpr int per = bytes / sizeof(T);
  if constexpr (bytes == 8 || bytes == 16) {  // whole words (a one-element unit never has them)
    if (sp.vec && sp.valid >= N) {
#pragma unroll
      for (int w = 0; w < N / per; ++w) {
        const Word raw = reinterpret_cast<const Word*>(p)[w];
        memcpy(&out[w * per], &raw, bytes);  // register bit-cast, no memory traffic
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = j < sp.valid ? p[j] : T{};
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, const T (&in)[N], Span sp) {
  constexpr int bytes = N * sizeof(T) < 16 ? int(N * sizeof(T)) : 16;
  using Word = std::conditional_t<bytes == 16, uint4, uint2>;
  constexpr int per = bytes / sizeof(T);
  if constexpr (bytes == 8 || bytes == 16) {
    if (sp.vec && sp.valid >= N) {
#pragma unroll
      for (int w = 0; w < N / per; ++w) {
        Word raw;
        memcpy(&raw, &in[w * per], bytes);
        reinterpret_cast<Word*>(p)[w] = raw;
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (j < sp.valid) p[j] = in[j];
}

// The largest of the warp's 32 values, in every lane (a fixed butterfly).
__device__ __forceinline__ uint32_t warp_max(uint32_t x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t y = __shfl_xor_sync(0xffffffffu, x, o);
    x = x > y ? x : y;
  }
  return x;
}

// How state (Call::state_dtype) and tangent rows (Call::tangent_dtype) are
// stored (launch.h: Storage). `elem` is a stored element and `type` what a
// unit holds of one between fetch(), which reads M elements of a buffer from
// its elem i on, and keep(), which writes them back (8-bit codes: with their
// block's scale, scales[si]); load() and put() convert one element to and from
// the compute type S around the element math, and round() is the math's
// storage policy (mada_math.h) for the element at flat index `index`.
template <typename T>
struct Moved {  // stored as `type` itself
  template <int M>
  __device__ static void fetch(const void* base, int64_t i, const float*, int64_t, T (&v)[M], Span sp, bool) {
    load(static_cast<const T*>(base) + i, v, sp);
  }
  template <int M>
  __device__ static void keep(void* base, int64_t i, float*, int64_t, const T (&v)[M], Span sp, bool) {
    store(static_cast<T*>(base) + i, v, sp);
  }
};

template <typename S, int K>
struct Stored;
template <typename S>
struct Stored<S, kStoreCompute> : Moved<S> {
  using elem = S;
  using type = S;
  static constexpr int kBytes = sizeof(elem);
  __device__ static S load(S x) { return x; }
  __device__ static S put(S x) { return x; }
  __device__ static mada::StoreExact round(const uint32_t*, int64_t) { return {}; }
};
// bf16 (docs/spec.md sections 5.1 and 5.3): a value reaches put() already
// rounded to a bf16 value by the math's storage policy (mada::StoreBf16Sr), so
// put() truncates exactly and load() widens exactly. Raw uint16_t bits rather
// than __nv_bfloat16: they are moved, never converted, so a NaN keeps the bits
// sr_bf16 gave it, as the CPU backend stores them.
template <>
struct Stored<float, kStoreBf16> : Moved<uint16_t> {
  using elem = uint16_t;
  using type = uint16_t;
  static constexpr int kBytes = sizeof(elem);
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
// 8-bit codes with one fp32 scale per 256-element block (docs/spec.md sections
// 5.4 and 5.5): a unit holds its elements decoded, and the math computes on
// them as on fp32 state. A block is one warp's unit (8 elements per lane), so
// keep() forms its scale from the new values of all its elements with one warp
// reduction and encodes each value once; elements past the segment's end count
// as 0 and keep their codes. Every lane reads the block's old scale, then the
// warp synchronises, then lane 0 stores the new one. sgn: the buffer takes the
// signed (E4M3) map.
template <>
struct Stored<float, kStoreQ8> {
  using elem = uint8_t;
  using type = float;
  static constexpr int kBytes = sizeof(elem);
  __device__ static float load(float x) { return x; }
  __device__ static float put(float x) { return x; }
  __device__ static mada::StoreExact round(const uint32_t*, int64_t) { return {}; }
  template <int M>
  __device__ static void fetch(const void* base, int64_t i, const float* scales, int64_t si, float (&v)[M], Span sp,
                               bool sgn) {
    uint8_t code[M];
    mada_cuda::load(static_cast<const uint8_t*>(base) + i, code, sp);
    const float scale = scales[si];
#pragma unroll
    for (int q = 0; q < M; ++q) v[q] = mada::q8_decode(code[q], scale, sgn);
  }
  template <int M>
  __device__ static void keep(void* base, int64_t i, float* scales, int64_t si, const float (&v)[M], Span sp,
                              bool sgn) {
    static_assert(M * 32 == kQ8BlockElems, "a warp's unit is one block");
    uint32_t top = 0;  // the largest |value|'s bits, an inf or NaN as inf: integers order them
#pragma unroll
    for (int q = 0; q < M; ++q) {
      uint32_t u;
      memcpy(&u, &v[q], sizeof u);
      u &= 0x7FFFFFFFu;
      u = u < 0x7F800000u ? u : 0x7F800000u;
      if (q < sp.valid) top = u > top ? u : top;
    }
    top = warp_max(top);
    float amax;
    memcpy(&amax, &top, sizeof amax);
    const float scale = mada::q8_scale(amax, top < 0x7F800000u);
    uint8_t code[M];
#pragma unroll
    for (int q = 0; q < M; ++q) code[q] = uint8_t(mada::q8_encode(v[q], scale, sgn));
    mada_cuda::store(static_cast<uint8_t*>(base) + i, code, sp);
    __syncwarp();  // every lane's read of the old scale (a tangent row's feeds no shuffle) comes first
    if ((threadIdx.x & 31) == 0) scales[si] = scale;
  }
};

// How a unit reads and writes its N parameters (Call::param_round, docs/spec.md
// section 5.2): a policy at the load and store sites, as the CPU kernels' ParamIo,
// so the kernel is written once. Round to nearest (from_state) serves every dtype;
// bf16 parameters choose at run time between it, stochastic rounding and Kahan
// summation (a uniform branch costs less than a table of kernels per rounding).
// begin/end move what the policy keeps beside the parameters (Kahan's
// compensation) at the unit's flat state index e; key: the segment's sr_key of
// buffer kBufParam; index: the element's flat state index.
template <typename P, int N>
struct ParamIo {
  __device__ void begin(const Common&, int64_t, Span) {}
  __device__ typename StateOf<P>::type load(P x, int) const { return to_state(x); }
  __device__ P store(typename StateOf<P>::type x, int, uint32_t, int64_t) { return from_state<P>(x); }
  __device__ void end(const Common&, int64_t, Span) const {}
};
__device__ __forceinline__ __nv_bfloat16 bf16_of(float rounded) {  // rounded: a bf16 value, moved exactly
  const uint16_t u = Stored<float, kStoreBf16>::put(rounded);
  __nv_bfloat16 b;
  memcpy(&b, &u, sizeof b);
  return b;
}
template <int N>
struct ParamIo<__nv_bfloat16, N> {
  int mode;          // Call::param_round
  uint16_t comp[N];  // kahan_sum's compensation: bf16 bit patterns, moved and never converted (as Stored)
  __device__ void begin(const Common& c, int64_t e, Span sp) {
    mode = c.param_round;
    if (mode == kRoundKahan) mada_cuda::load(static_cast<const uint16_t*>(c.comp) + e, comp, sp);
  }
  __device__ float load(__nv_bfloat16 x, int q) const {  // kahan_sum: the step reads and writes theta + comp
    return mode == kRoundKahan ? mada::kahan_weight(to_state(x), Stored<float, kStoreBf16>::load(comp[q]))
                               : to_state(x);
  }
  __device__ __nv_bfloat16 store(float x, int q, uint32_t key, int64_t index) {
    if (mode == kRoundKahan) {
      const float stored = mada::rne_bf16(x);
      comp[q] = Stored<float, kStoreBf16>::put(mada::kahan_comp(x, stored));
      return bf16_of(stored);
    }
    if (mode == kRoundStochastic) return bf16_of(mada::sr_bf16(x, mada::sr_bits(key, uint64_t(index))));
    return from_state<__nv_bfloat16>(x);
  }
  __device__ void end(const Common& c, int64_t e, Span sp) const {
    if (mode == kRoundKahan) mada_cuda::store(static_cast<uint16_t*>(c.comp) + e, comp, sp);
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
  static constexpr unsigned kUnsigned = (1u << kV) | (1u << kVb) | (1u << kS);  // 8-bit state's E5M3 buffers
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
  static constexpr unsigned kBufMask = 0, kUnsigned = 0;
  using Scalars = NoScalars;
};

template <typename S, bool DIFF>
struct AdamodOp {
  static constexpr bool kUpdate = true, kMayDot = false, kTan = false;
  static constexpr unsigned kBufMask = adamod_slots(DIFF ? kDiff : 0u);
  static constexpr unsigned kUnsigned = (1u << kAv) | (1u << kAs);
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
// at a time, and bf16 state or tangents are read as words of 8 elements. An
// 8-bit buffer's unit is whole (M = N, a warp's share of one block): keep()
// needs every new value of the block. SK, TK: how the state and the tangent
// rows are stored (Storage).

template <typename P, int SK, int TK, class Op, int N>
__device__ __forceinline__ void run_unit(const Common& c, const SegConsts<Op>& k, P* param,
                                         const P* grad, int64_t soff, int64_t i, bool dot,
                                         typename StateOf<P>::type scale, double (&acc)[kNumCoef], Span sp) {
  using S = typename StateOf<P>::type;
  using St = Stored<S, SK>;
  using W = typename St::type;
  using Tt = Stored<S, TK>;
  using R = typename Tt::type;
  constexpr int narrow = St::kBytes < Tt::kBytes ? St::kBytes : Tt::kBytes;
  constexpr int M = N * narrow > 16 ? 16 / narrow : N;
  constexpr int TW = M * Tt::kBytes > 16 ? 16 / Tt::kBytes : M;
  P graw[N], praw[N];
  load(grad + i, graw, sp);
  ParamIo<P, N> pio;
  if constexpr (Op::kUpdate) {
    load(param + i, praw, sp);
    pio.begin(c, soff + i, sp);
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
    const Span sub{sp.valid - h, sp.vec};
    // Tangent row of coefficient j is its rank among the learned ones (abi.h);
    // tsi[j]: the index of its block's scale (8-bit rows).
    typename Tt::elem* trow[kNumCoef] = {};
    int64_t tsi[kNumCoef] = {};
    if constexpr (Op::kMayDot || Op::kTan) {
#pragma unroll
      for (int j = 0, r = 0; j < kNumCoef; ++j) {
        trow[j] = static_cast<typename Tt::elem*>(c.tan) + r * c.tan_stride + e;
        if constexpr (TK == kStoreQ8) tsi[j] = r * c.tan_scale_stride + e / kQ8BlockElems;
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
          Tt::fetch(trow[j] + w, 0, c.tan_scales, tsi[j], t, Span{sub.valid - w, sp.vec}, true);
#pragma unroll
          for (int q = 0; q < TW; ++q)
            if (w + q < sub.valid) acc[j] = fma(double(g[h + w + q]), double(Tt::load(t[q])), acc[j]);
        }
      }
    }
    if constexpr (Op::kUpdate) {
      W st[kMaxSlots][M] = {};
#pragma unroll
      for (int b = 0; b < kMaxSlots; ++b)
        if ((Op::kBufMask >> b) & 1u)
          St::fetch(c.buf[b], e, c.scales[b], e / kQ8BlockElems, st[b], sub, !((Op::kUnsigned >> b) & 1u));
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
            if ((c.learn_mask >> j) & 1u)
              Tt::keep(trow[j] + w, 0, c.tan_scales, tsi[j], tan[j], Span{sub.valid - w, sp.vec}, true);
        }
      }
#pragma unroll
      for (int b = 0; b < kMaxSlots; ++b)
        if ((Op::kBufMask >> b) & 1u)
          St::keep(c.buf[b], e, c.scales[b], e / kQ8BlockElems, st[b], sub, !((Op::kUnsigned >> b) & 1u));
    }
  }
  if constexpr (Op::kUpdate) {
    store(param + i, praw, sp);
    pio.end(c, soff + i, sp);
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
// timed on a GPU against 2 blocks per SM. An 8-bit unit holds 8 elements of
// every buffer decoded until its block's scales are known: at 3 blocks per SM
// ptxas (sm_80) spilled in 35 of a table's 67 kernels (up to 288 bytes), at 2
// (<= 240 registers) in none; not yet timed on a GPU either.
template <typename P, int SK, int TK>
constexpr int kMinBlocks = sizeof(typename StateOf<P>::type) == 8 || SK == kStoreQ8 || TK == kStoreQ8 ? 2 : 3;

// SK, TK: how the state and the tangent rows are stored (Storage; not
// kStoreCompute for fp32 compute only). With 8-bit codes on either, the
// planner starts every segment on a 256-element block (kQ8BlockElems) of the
// launch's index space, and a warp steps a block at a time.
template <typename P, int SK, int TK, class Op>
__global__ void __launch_bounds__(kThreads, kMinBlocks<P, SK, TK>) step_kernel(const __grid_constant__ Args a) {
  using S = typename StateOf<P>::type;
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
    const int64_t a0 = (c0 > vs ? c0 : vs) - vs;  // a multiple of kPad (of a block, for 8-bit plans)
    const int64_t end = vs + t.numel[s];
    const int64_t a1 = (c1 < end ? c1 : end) - vs;
    if (a0 >= a1) continue;
    if constexpr (Op::kUpdate) {
      __syncthreads();  // everyone is done with the previous segment's scalars
      if (threadIdx.x == 0) {
        const double step = c.steps[t.pidx[s]];
        sk.k = Op::make(c, c.lr[t.group[s]], c.wd[t.group[s]], step);
        const uint32_t t32 = uint32_t(uint64_t(step));
        if constexpr (SK == kStoreBf16)
          for (int b = 0; b < kMaxSlots; ++b) sk.key[b] = mada::sr_key(c.sr_seed, t32, uint32_t(b));
        if constexpr (TK == kStoreBf16 && Op::kTan)
          for (int b = mada::kBufTan0; b < mada::kBufTan0 + kNumCoef; ++b)
            sk.key[b] = mada::sr_key(c.sr_seed, t32, uint32_t(b));
        if (c.param_round == kRoundStochastic) sk.pkey = mada::sr_key(c.sr_seed, t32, uint32_t(mada::kBufParam));
      }
      __syncthreads();
    }
    const SegConsts<Op>& k = sk;  // read from shared memory at each use
    P* param = static_cast<P*>(t.param[s]);
    const P* grad = static_cast<const P*>(t.grad[s]);
    const int64_t off = t.off[s];
    const bool vec = (t.aligned[s >> 5] >> (s & 31)) & 1u;
    if constexpr (SK == kStoreQ8 || TK == kStoreQ8) {
      constexpr int L = int(kQ8BlockElems / 32);  // elements per lane
      const int64_t lane = threadIdx.x & 31;
      for (int64_t b0 = a0 + (threadIdx.x >> 5) * kQ8BlockElems; b0 < a1; b0 += kThreads / 32 * kQ8BlockElems) {
        const int64_t i = b0 + lane * L, left = a1 - i;  // the warp's block stays whole: every lane takes part
        run_unit<P, SK, TK, Op, L>(c, k, param, grad, off, i, dot, scale, acc,
                                   Span{left < 0 ? 0 : left < L ? int(left) : L, vec});
      }
    } else {
      int64_t tail = a0;
      if (vec) {
        // At least one 16-byte word of params, of stored state and of stored tangents per unit.
        constexpr int narrow = sizeof(P) < Stored<S, SK>::kBytes ? sizeof(P) : Stored<S, SK>::kBytes;
        constexpr int U = 16 / (narrow < Stored<S, TK>::kBytes ? narrow : Stored<S, TK>::kBytes);
        static_assert(kPad % U == 0, "a0 must start a unit");
        const int64_t u1 = a1 / U;
        for (int64_t u = a0 / U + threadIdx.x; u < u1; u += kThreads)
          run_unit<P, SK, TK, Op, U>(c, k, param, grad, off, u * U, dot, scale, acc, Span{U, true});
        tail = u1 * U;
      }
      for (int64_t i = tail + threadIdx.x; i < a1; i += kThreads)
        run_unit<P, SK, TK, Op, 1>(c, k, param, grad, off, i, dot, scale, acc, Span{1, false});
    }
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
