// The fused CPU passes: one sweep over a bucket's active segments per step,
// with the per-element math of ../mada_math.h (the same code the CUDA kernels
// run). build_support.py compiles this file once per (instruction set,
// parameter dtype), e.g. -DMADA_PARAM_CODE=kBF16 -DMADA_TABLE=kernels_avx2_bf16
// -mavx2 ...; binding.cpp picks the object at run time, so one wheel is
// portable and still uses AVX2 where the CPU has it.
//
// Determinism: when there are hyper-gradient sums, the element space (active
// segments, concatenated) is cut into fixed 64K-element chunks whatever the
// thread count; each chunk sums its terms into 16 sequential lanes and writes
// one slot; slots are added in chunk order. Same inputs, same bits, for any OMP
// thread count, and (with -ffp-contract=off) for either instruction set.
// Without sums each element's result depends on that element alone, and the
// space is split evenly over the threads.
#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_calls.h"

#if !defined(MADA_PARAM_CODE) || !defined(MADA_TABLE)
#error "build_support.py defines MADA_PARAM_CODE and MADA_TABLE for each kernel object"
#endif

namespace mada_cpu {
// Internal linkage for everything compiled with this object's ISA flags,
// including the header's inline functions: the linker must never merge an AVX2
// copy with the baseline one (an ODR "duplicate" that would crash old CPUs).
// <cmath>/<cstdint>/<cstring> are already included above, so the includes of
// the headers below expand to nothing inside this namespace.
namespace {
#include "../mada_math.h"

using mada::AdamodScalars;
using mada::MadaConst;
using mada::MadaScalars;
using mada::MadaState;
static_assert(mada::kNumCoef == kNumCoef, "abi.h's learn_mask has one bit per coefficient of mada_math.h");
// The hash's buffer numbers are the state slots of abi.h.
static_assert(int(mada::kBufS) == int(kS) && int(mada::kBufVb) == int(kVb) && int(mada::kBufL) == int(kL) &&
                  int(mada::kBufGPrev) == int(kGPrev) && int(mada::kBufAgPrev) == int(kAgPrev) &&
                  int(mada::kBufAs) == int(kAs) && mada::kNumMadaBufs == kNumMadaSlots,
              "mada_math.h's buffer order is abi.h's slot order");

constexpr int64_t kChunk = int64_t(1) << 16;  // fixed, never derived from the thread count
constexpr int kBlock = 64;                    // block scratch stays in L1 (measured best)
constexpr int kLanes = 16;                    // sequential partial sums per chunk and row
constexpr int64_t kMinSplit = 8192;           // fewest elements a thread is woken for

#include "param_types.inc"

// Per-chunk scratch: hyper-gradient lanes plus the scalars of the last
// (group, step) seen, so many small tensors do not each pay for pow().
template <class S>
struct Chunk {
  double lanes[6][kLanes] = {};
  int64_t group = -1;
  double t = -1.0;
  S k{};

  template <class Make>
  const S& scalars(const Call& c, const SegRow& r, Make make) {
    const double tr = c.steps[r.pindex];
    if (r.group != group || tr != t) {
      group = r.group;
      t = tr;
      k = make(c.lr[r.group], c.wd[r.group], tr);
    }
    return k;
  }
};

// Runs piece(row, lo, hi, chunk) over every part of every segment, chunk by
// chunk, in parallel; total[j] gets row j's sum over all chunks, in order.
// With align > 1 (8-bit state: its 256-element blocks) every segment counts as
// its size rounded up to a multiple of align, so every part starts on one.
template <class S, class Piece>
void run_chunks(const Pass& c, int rows, double* total, Piece piece, int64_t align = 1) {
  std::vector<int64_t> start(c.c.n_rows + 1, 0);
  for (int64_t s = 0; s < c.c.n_rows; ++s) start[s + 1] = start[s] + (c.c.rows[s].numel + align - 1) / align * align;
  const int64_t n = start[c.c.n_rows];
  // Without sums to reduce, the chunking cannot change a bit: split evenly
  // over the threads instead (fixed 64K chunks left 1,000,000 elements 8:7.3
  // on two threads, and ran anything below 128K on one).
  const int64_t unit = std::max<int64_t>(64, align);
  const int64_t per = rows ? kChunk : std::max(kMinSplit, (n / c.num_threads + unit - 1) / unit * unit);
  const int64_t nchunks = (n + per - 1) / per;
  std::vector<double> slots(size_t(nchunks) * rows);
#pragma omp parallel for schedule(static) num_threads(c.num_threads) if (nchunks > 1)
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    Chunk<S> chunk;
    int64_t lo = ch * per;
    const int64_t hi = std::min(n, lo + per);
    // Last segment starting at or before lo: skips zero-size segments.
    int64_t s = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
    for (; lo < hi; ++s) {
      const int64_t end = std::min(hi, start[s + 1]);
      const int64_t top = std::min(end - start[s], c.c.rows[s].numel);
      if (top > lo - start[s]) piece(c.c.rows[s], lo - start[s], top, chunk);
      lo = std::max(lo, end);
    }
    for (int j = 0; j < rows; ++j) {
      double sum = 0.0;
      for (int l = 0; l < kLanes; ++l) sum += chunk.lanes[j][l];
      slots[size_t(ch) * rows + j] = sum;
    }
  }
  for (int j = 0; j < rows; ++j) {
    double sum = 0.0;
    for (int64_t ch = 0; ch < nchunks; ++ch) sum += slots[size_t(ch) * rows + j];
    total[j] = sum;
  }
}

template <class T>
T* slot_ptr(void* const* state, int i, int64_t offset) {
  return state[i] ? static_cast<T*>(state[i]) + offset : nullptr;
}

#include "block_parts.inc"

// 8-bit state (docs/spec.md 5.4) is a storage policy around the fp32 passes,
// not a copy of them: each 256-element block of a segment part is decoded into
// fp32 scratch, stepped by the fp32 piece as if the scratch were the state, and
// every buffer is encoded back with its block's new scale. The piece sees the
// block as a segment of its own at the block's flat offset (a Kahan
// compensation and the hash index stay where they are); the state pointers it
// gets are the scratch's address moved back by that offset, so state[offset +
// j] is scratch[j]. 8-bit tangent rows (5.5) go the same way: the block of
// each row is decoded into fp32 rows of scratch, kQ apart, that the piece
// reads (the hyper-gradient sum) and overwrites (the new du/dk) as fp32 rows,
// and a step encodes them back; the dot pass only reads. Parts start on block
// boundaries (run_chunks' align); `unsigned_slots`: the slots of the
// non-negative map.
constexpr uint32_t kMadaUnsigned = (1u << kV) | (1u << kVb) | (1u << kS);
constexpr uint32_t kAdamodUnsigned = (1u << kAv) | (1u << kAs);
constexpr int kQ = mada::kQ8Block;
static_assert(kQ == kQ8BlockElems, "abi.h and mada_math.h agree on the block size");

void q8_load(const uint8_t* __restrict__ code, float scale, int nb, bool sgn, float* __restrict__ out) {
  for (int j = 0; j < nb; ++j) out[j] = mada::q8_decode(code[j], scale, sgn);
}

// Encodes x[0, nb) under its block's new scale (the largest magnitude's binade,
// NaN when the block holds an inf or a NaN); returns that scale.
float q8_store(const float* __restrict__ x, int nb, bool sgn, uint8_t* __restrict__ code) {
  float amax = 0.0f;
  int finite = 1;
  for (int j = 0; j < nb; ++j) {
    const float a = std::fabs(x[j]);
    amax = a > amax ? a : amax;
    finite &= a <= FLT_MAX;  // false for inf and NaN
  }
  const float scale = mada::q8_scale(amax, finite != 0);
  for (int j = 0; j < nb; ++j) code[j] = uint8_t(mada::q8_encode(x[j], scale, sgn));
  return scale;
}

template <class P, class Piece>
void q8_blocks(const Pass& c, const SegRow& r, int64_t lo, int64_t hi, uint32_t unsigned_slots, Piece piece) {
  alignas(64) float buf[kMaxSlots][kQ];
  alignas(64) float rows[kNumCoef][kQ];
  Pass q = c;
  const bool q8_rows = c.c.tangents && c.c.tangent_dtype == kQ8;
  float* tscale = static_cast<float*>(c.c.tan_scales);
  if (q8_rows) {
    q.c.tangent_dtype = kF32;
    q.c.tan_stride = kQ;
  }
  for (int64_t b0 = lo; b0 < hi; b0 += kQ) {
    const int nb = int(std::min<int64_t>(kQ, hi - b0));
    const int64_t at = r.offset + b0;
    for (int b = 0; b < kMaxSlots; ++b) {
      if (!c.c.state[b]) continue;
      q8_load(static_cast<const uint8_t*>(c.c.state[b]) + at, static_cast<const float*>(c.c.scales[b])[at / kQ],
              nb, !((unsigned_slots >> b) & 1u), buf[b]);
      q.c.state[b] = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(buf[b]) - uintptr_t(at) * sizeof(float));
    }
    if (q8_rows) {
      if (c.c.dot_out)  // last step's rows, for the sum; a step without it overwrites them unread
        for (int j = 0; j < c.num_learn; ++j)
          q8_load(static_cast<const uint8_t*>(c.c.tangents) + j * c.c.tan_stride + at,
                  tscale[j * c.c.tan_scale_stride + at / kQ], nb, true, rows[j]);
      q.c.tangents = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(rows) - uintptr_t(at) * sizeof(float));
    }
    SegRow part = r;
    part.param = r.param + b0 * int64_t(sizeof(P));
    part.grad = r.grad + b0 * int64_t(sizeof(P));
    part.offset = at;
    part.numel = nb;
    piece(q, part, nb);
    for (int b = 0; b < kMaxSlots; ++b) {
      if (!c.c.state[b]) continue;
      static_cast<float*>(c.c.scales[b])[at / kQ] =
          q8_store(buf[b], nb, !((unsigned_slots >> b) & 1u), static_cast<uint8_t*>(c.c.state[b]) + at);
    }
    if (q8_rows && c.c.op == kMadaStep)
      for (int j = 0; j < c.num_learn; ++j)
        tscale[j * c.c.tan_scale_stride + at / kQ] =
            q8_store(rows[j], nb, true, static_cast<uint8_t*>(c.c.tangents) + j * c.c.tan_stride + at);
  }
}

// One segment part [lo, hi) of a configuration whose chain is short (no
// tangents, Adan, Lion or Yogi term: Adam's corner, AVGrad, the clip alone):
// each element start to end in one loop, the gradient read in place. No block
// scratch: the two-loop split below only adds traffic for these (measured 7 %
// slower at Adam's corner).
template <int D, int R, bool SB, bool VB, bool MO, bool SCALED>
void mada_short(const Pass& c, const MadaScalars<typename Param<D>::T>& k, const SegRow& r,
                int64_t lo, int64_t hi, typename Param<D>::T sign, typename Param<D>::T scale) {
  using T = typename Param<D>::T;
  using P = typename Param<D>::P;
  using St = Store<T, SB>;
  using S = typename St::S;
  const P* __restrict__ grad = reinterpret_cast<const P*>(r.grad);
  P* __restrict__ param = reinterpret_cast<P*>(r.param);
  S* __restrict__ m = slot_ptr<S>(c.c.state, kM, r.offset);
  S* __restrict__ v = slot_ptr<S>(c.c.state, kV, r.offset);
  S* __restrict__ vb = slot_ptr<S>(c.c.state, kVb, r.offset);
  S* __restrict__ s = slot_ptr<S>(c.c.state, kS, r.offset);
  const SrKeys<SB> keys(c.c, r);
  const ParamIo<D, R> pio(c.c, r);
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i) {
    MadaState<T> st{};
    st.m = St::load(m[i]), st.v = St::load(v[i]);
    if (VB) st.vb = St::load(vb[i]);
    if (MO) st.s = St::load(s[i]);
    const auto round = keys.at(r.offset + i);
    const auto x = mada::mada_moments<T, false, VB, false, MO, false, false>(
        k, processed_grad<D, SCALED>(grad[i], scale, sign), st, round);
    pio.store(param, i, mada::mada_apply<T, false, VB, false, MO, false>(k, pio.load(param, i), x, st, nullptr, round));
    m[i] = St::put(st.m), v[i] = St::put(st.v);
    if (VB) vb[i] = St::put(st.vb);
    if (MO) s[i] = St::put(st.s);
  }
}

// One segment part [lo, hi) of the other configurations, block by block:
// grads, then the first half of the step for the block, then the second half
// (two short dependency chains that out-of-order execution overlaps, instead
// of one long one: 15-25 % faster with the Yogi or Adan terms), then the
// hyper-gradient partial sums and the new tangent rows.
template <int D, int R, bool SB, bool B3, bool VB, bool LI, bool MO, bool TAN, bool YOGI>
void mada_split(const Pass& c, const MadaScalars<typename Param<D>::T>& k, const SegRow& r,
                int64_t lo, int64_t hi, typename Param<D>::T sign, double (*lanes)[kLanes]) {
  using T = typename Param<D>::T;
  using P = typename Param<D>::P;
  using St = Store<T, SB>;
  using S = typename St::S;
  const P* __restrict__ grad = reinterpret_cast<const P*>(r.grad);
  P* __restrict__ param = reinterpret_cast<P*>(r.param);
  S* __restrict__ m = slot_ptr<S>(c.c.state, kM, r.offset);
  S* __restrict__ v = slot_ptr<S>(c.c.state, kV, r.offset);
  S* __restrict__ n = slot_ptr<S>(c.c.state, kN, r.offset);
  S* __restrict__ gp = slot_ptr<S>(c.c.state, kGPrev, r.offset);
  S* __restrict__ l = slot_ptr<S>(c.c.state, kL, r.offset);
  S* __restrict__ vb = slot_ptr<S>(c.c.state, kVb, r.offset);
  S* __restrict__ s = slot_ptr<S>(c.c.state, kS, r.offset);
  const SrKeys<SB> keys(c.c, r);
  const TanKeys tkeys(c.c, r);
  const ParamIo<D, R> pio(c.c, r);
  alignas(64) T gbuf[kBlock];
  alignas(64) T tbuf[mada::kNumCoef][kBlock];
  Stash<T, B3, VB, LI, TAN, YOGI> mid;
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int nb = int(std::min<int64_t>(kBlock, hi - b0));
    load_grad<D>(grad + b0, nb, c.c.grad_scale, sign, gbuf);
#pragma GCC ivdep
    for (int j = 0; j < nb; ++j) {
      const int64_t i = b0 + j;
      MadaState<T> st{};
      st.m = St::load(m[i]), st.v = St::load(v[i]);
      if (B3) st.n = St::load(n[i]), st.g_prev = St::load(gp[i]);
      if (LI) st.l = St::load(l[i]);
      if (VB) st.vb = St::load(vb[i]);
      mid.put(j, mada::mada_moments<T, B3, VB, LI, MO, TAN, YOGI>(k, gbuf[j], st, keys.at(r.offset + i)));
      m[i] = St::put(st.m), v[i] = St::put(st.v);
      if (B3) n[i] = St::put(st.n), gp[i] = St::put(st.g_prev);
      if (LI) l[i] = St::put(st.l);
      if (VB) vb[i] = St::put(st.vb);
    }
#pragma GCC ivdep
    for (int j = 0; j < nb; ++j) {
      const int64_t i = b0 + j;
      MadaState<T> st{};  // what mada_apply reads: the state the first half wrote
      if (MO) st.s = St::load(s[i]);
      if (TAN) st.m = St::load(m[i]), st.v = St::load(v[i]);
      if (TAN && B3) st.n = St::load(n[i]);
      if (TAN && VB) st.vb = St::load(vb[i]);
      T tan[mada::kNumCoef] = {};
      pio.store(param, i, mada::mada_apply<T, B3, VB, LI, MO, TAN>(
          k, pio.load(param, i), mid.get(j, k, gbuf[j], st), st, tan, keys.at(r.offset + i)));
      if (MO) s[i] = St::put(st.s);
      if (TAN)
        for (int q = 0; q < mada::kNumCoef; ++q) tbuf[q][j] = tan[q];
    }
    const int64_t at = r.offset + b0;
    // The stored rows are still the previous step's tangents: reduce, then overwrite.
    if (c.c.dot_out) dot_rows<T>(c, gbuf, nb, at, lanes);
    if (TAN) store_rows<T>(c, tbuf, nb, at, tkeys);
  }
}

// Not inlined: the fp32 pass and q8_blocks call the same body (one copy per variant,
// not two; the 8-bit path added 15 % to an object's compile time, bench/RESULTS.md).
template <int D, int R, bool SB, bool B3, bool VB, bool LI, bool MO, bool TAN, bool YOGI>
__attribute__((noinline)) void mada_piece(const Pass& c, const MadaScalars<typename Param<D>::T>& k, const SegRow& r,
                int64_t lo, int64_t hi, typename Param<D>::T sign, double (*lanes)[kLanes]) {
  if constexpr (!TAN && !B3 && !LI && !YOGI) {
    with_grad_scale<typename Param<D>::T>(c.c.grad_scale, [&](auto scaled, auto scale) {
      mada_short<D, R, SB, VB, MO, decltype(scaled)::value>(c, k, r, lo, hi, sign, scale);
    });
  } else {
    mada_split<D, R, SB, B3, VB, LI, MO, TAN, YOGI>(c, k, r, lo, hi, sign, lanes);
  }
}

template <int D>
void mada_dot_piece(const Pass& c, const SegRow& r, int64_t lo, int64_t hi,
                    typename Param<D>::T sign, double (*lanes)[kLanes]) {
  using T = typename Param<D>::T;
  const auto* __restrict__ grad = reinterpret_cast<const typename Param<D>::P*>(r.grad);
  alignas(64) T gbuf[kBlock];
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int nb = int(std::min<int64_t>(kBlock, hi - b0));
    load_grad<D>(grad + b0, nb, c.c.grad_scale, sign, gbuf);
    dot_rows<T>(c, gbuf, nb, r.offset + b0, lanes);
  }
}

// One MADA pass for one flag combination; STEP = false is the dot-only pass
// (hyper_order="exact"), instantiated once rather than inside every variant.
// R: the ParamRound of the parameter stores; SB: the state is stored in bf16.
template <int D, int R, bool SB, bool B3, bool VB, bool LI, bool MO, bool TAN, bool YOGI, bool STEP = true>
void mada_pass(const Pass& c) {
  using T = typename Param<D>::T;
  const double* k = c.c.consts;
  const MadaConst kc{k[kEps], k[kModBeta], k[kLionBeta1], k[kLionBeta2], c.c.vbar_detach != 0};
  const T sign = grad_sign<T>(c);
  const int rows = c.c.dot_out ? c.num_learn : 0;
  double total[mada::kNumCoef] = {};
  auto make = [&](double lr, double wd, double t) {
    return mada::make_mada_scalars<T>(c.c.coef, lr, wd, t, kc);
  };
  const bool q8 = c.c.state_dtype == kQ8;
  run_chunks<MadaScalars<T>>(c, rows, total, [&](const SegRow& r, int64_t lo, int64_t hi,
                                                   Chunk<MadaScalars<T>>& ch) {
    if constexpr (STEP) {
      const MadaScalars<T>& k = ch.scalars(c.c, r, make);
      if constexpr (!SB && std::is_same_v<T, float>)
        if (q8)
          return q8_blocks<typename Param<D>::P>(c, r, lo, hi, kMadaUnsigned,
                                                 [&](const Pass& q, const SegRow& part, int nb) {
            mada_piece<D, R, false, B3, VB, LI, MO, TAN, YOGI>(q, k, part, 0, nb, sign, ch.lanes);
          });
      mada_piece<D, R, SB, B3, VB, LI, MO, TAN, YOGI>(c, k, r, lo, hi, sign, ch.lanes);
    } else {
      if constexpr (std::is_same_v<T, float>)
        if (c.c.tangent_dtype == kQ8)  // decoded a block at a time, as a step reads them
          return q8_blocks<typename Param<D>::P>(c, r, lo, hi, 0u, [&](const Pass& q, const SegRow& part, int nb) {
            mada_dot_piece<D>(q, part, 0, nb, sign, ch.lanes);
          });
      mada_dot_piece<D>(c, r, lo, hi, sign, ch.lanes);
    }
  }, q8 ? kQ8BlockElems : 1);
  for (int j = 0; j < rows; ++j) c.c.dot_out[j] += total[j];
}

using PassFn = void (*)(const Pass&);

// Flag bits: abi.h's MadaBits (1 beta3, 2 vbar, 4 lion, 8 mod, 16 tangents),
// 32, "c is 1 and not learned" (the Yogi term compiles out), and 64, bf16
// state (float compute types only). Learning configurations keep the Yogi
// term (bit 32 ignored): it is a small part of their work, and 16 more
// variants would cost build time for nothing. F / 128 is the ParamRound (bf16
// parameters only: rounds_for).
template <int D, int F>
void mada_flags(const Pass& c) {
  constexpr bool tan = (F & 16) != 0, yogi = tan || (F & 32) == 0;
  constexpr bool sb = (F & 64) != 0 && D != kF64;
  mada_pass<D, F / 128, sb, (F & 1) != 0, (F & 2) != 0, (F & 4) != 0, (F & 8) != 0, tan, yogi>(c);
}
template <int D, int... F>
constexpr std::array<PassFn, sizeof...(F)> mada_table(std::integer_sequence<int, F...>) {
  return {{&mada_flags<D, F>...}};
}

template <int D>
void mada_entry(const Pass& c) {
  if (c.c.found_inf && *c.c.found_inf != 0.0f) return;  // GradScaler skip: touch nothing
  if (c.c.op == kMadaDot)
    return mada_pass<D, kRoundNearest, false, false, false, false, false, false, true, false>(c);
  static_assert(kMadaVariants == 32, "flag 32 comes after the MadaBits");
  static constexpr auto table = mada_table<D>(std::make_integer_sequence<int, 128 * rounds_for(D)>{});
  const bool c_learned = (c.c.learn_mask >> mada::kC) & 1u;
  const int f = int(c.c.variant) | (!c_learned && c.c.coef[mada::kC] == 1.0) << 5 |
                (c.c.state_dtype == kBF16) << 6 | c.c.param_round * 128;  // abi_check.h: < rounds_for(D)
  table[f](c);
}

// One segment part [lo, hi) of AdaMod or DiffMod: a short chain, so one loop
// with the gradient read in place, as mada_short.
template <int D, int R, bool SB, bool DIFF, bool SCALED>
__attribute__((noinline)) void adamod_piece(const Pass& c, const AdamodScalars<typename Param<D>::T>& k,
                  const SegRow& r, int64_t lo, int64_t hi, typename Param<D>::T scale,
                  typename Param<D>::T sign) {
  using T = typename Param<D>::T;
  using P = typename Param<D>::P;
  using St = Store<T, SB>;
  using S = typename St::S;
  const P* __restrict__ grad = reinterpret_cast<const P*>(r.grad);
  P* __restrict__ param = reinterpret_cast<P*>(r.param);
  S* __restrict__ m = slot_ptr<S>(c.c.state, kAm, r.offset);
  S* __restrict__ v = slot_ptr<S>(c.c.state, kAv, r.offset);
  S* __restrict__ s = slot_ptr<S>(c.c.state, kAs, r.offset);
  S* __restrict__ gp = slot_ptr<S>(c.c.state, kAgPrev, r.offset);
  const SrKeys<SB> keys(c.c, r);
  const ParamIo<D, R> pio(c.c, r);
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i) {
    T mi = St::load(m[i]), vi = St::load(v[i]), si = St::load(s[i]);
    T gprev = DIFF ? St::load(gp[i]) : T(0);
    pio.store(param, i, mada::adamod_element<T, DIFF>(
        k, processed_grad<D, SCALED>(grad[i], scale, sign), pio.load(param, i), mi, vi, si,
        gprev, keys.at(r.offset + i)));
    m[i] = St::put(mi), v[i] = St::put(vi), s[i] = St::put(si);
    if (DIFF) gp[i] = St::put(gprev);
  }
}

template <int D, int R, bool SB, bool DIFF>
void adamod_pass(const Pass& c) {
  using T = typename Param<D>::T;
  const T sign = grad_sign<T>(c);
  auto make = [&](double lr, double wd, double t) {
    const double* k = c.c.consts;
    return mada::make_adamod_scalars<T>(k[kAdamodBeta1], k[kAdamodBeta2], k[kAdamodBeta3], k[kAdamodEps],
                                        lr, wd, t);
  };
  const bool q8 = c.c.state_dtype == kQ8;
  run_chunks<AdamodScalars<T>>(c, 0, nullptr, [&](const SegRow& r, int64_t lo, int64_t hi,
                                                    Chunk<AdamodScalars<T>>& ch) {
    const AdamodScalars<T>& k = ch.scalars(c.c, r, make);
    with_grad_scale<T>(c.c.grad_scale, [&](auto scaled, T scale) {
      if constexpr (!SB && std::is_same_v<T, float>)
        if (q8)
          return q8_blocks<typename Param<D>::P>(c, r, lo, hi, kAdamodUnsigned,
                                                 [&](const Pass& q, const SegRow& part, int nb) {
            adamod_piece<D, R, false, DIFF, decltype(scaled)::value>(q, k, part, 0, nb, scale, sign);
          });
      adamod_piece<D, R, SB, DIFF, decltype(scaled)::value>(c, k, r, lo, hi, scale, sign);
    });
  }, q8 ? kQ8BlockElems : 1);
}

// AdaMod's passes by (ParamRound, bf16 state, DiffMod): F = 4 * round + 2 * sb + diff.
template <int D, int F>
void adamod_flags(const Pass& c) {
  adamod_pass<D, F / 4, (F & 2) != 0 && D != kF64, (F & 1) != 0>(c);
}
template <int D, int... F>
constexpr std::array<PassFn, sizeof...(F)> adamod_table(std::integer_sequence<int, F...>) {
  return {{&adamod_flags<D, F>...}};
}

template <int D>
void adamod_entry(const Pass& c) {
  if (c.c.found_inf && *c.c.found_inf != 0.0f) return;
  static constexpr auto table = adamod_table<D>(std::make_integer_sequence<int, 4 * rounds_for(D)>{});
  // abi_check.h: fp64 parameters keep fp64 state; param_round < rounds_for(D)
  table[c.c.param_round * 4 + (c.c.state_dtype == kBF16) * 2 + int(c.c.variant & kDiff)](c);
}

template <int D>
void to_state(const void* src, void* dst, int64_t n) {
  const auto* s = static_cast<const typename Param<D>::P*>(src);
  auto* d = static_cast<typename Param<D>::T*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = Param<D>::load(s[i]);
}
template <int D>
void from_state(const void* src, void* dst, int64_t n) {
  const auto* s = static_cast<const typename Param<D>::T*>(src);
  auto* d = static_cast<typename Param<D>::P*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = Param<D>::store(s[i]);
}

}  // namespace

extern const KernelTable MADA_TABLE;
const KernelTable MADA_TABLE = {&mada_entry<MADA_PARAM_CODE>, &adamod_entry<MADA_PARAM_CODE>,
                                &to_state<MADA_PARAM_CODE>, &from_state<MADA_PARAM_CODE>};

}  // namespace mada_cpu
