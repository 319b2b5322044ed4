// Per-element math of every mada-fused optimizer, written once for the CUDA
// kernels (nvcc) and the fused CPU loop (g++). docs/spec.md is the contract; the
// comments here only say where the code departs from a literal transcription.
//
// Everything is a pure function of registers: loading, storing, vectorising and
// reducing belong to the callers, so one header serves every memory schedule.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MADA_HD __host__ __device__ __forceinline__
#else
#define MADA_HD inline
#endif

namespace mada {

// Canonical coefficient order. Tangent rows and hyper-gradient slots follow it,
// restricted to the learned names.
enum Coef : int { kBeta1 = 0, kBeta2, kBeta3, kRho, kC, kGamma, kNumCoef };

// Element math stays in the element type. On the host the unqualified C
// functions take double only: an fp32 sqrt(v) + eps there was a double, which
// turned AdaMod's whole step size into double arithmetic (4-wide vdivpd) and
// made the fused CPU AdaMod 2.3x slower than Adam's corner on the same data.
MADA_HD float sqrt_t(float x) { return sqrtf(x); }
MADA_HD double sqrt_t(double x) { return sqrt(x); }
MADA_HD double exp_t(double x) { return exp(x); }

// exp for float. On the host, libm's expf is a call the compiler cannot
// vectorise, which made DiffMod's loop scalar (10x slower than AdaMod's); this
// is Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial,
// relative error < 2e-7): plain arithmetic that g++ vectorises, with the same
// bits in the base and AVX2 objects. GPUs have a fast expf of their own.
MADA_HD float exp_t(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // Beyond +-88.376 the scale 2^n would leave the normal floats: clamp (DiffMod
  // only passes x <= 0, where exp(x) < 2^-126 is as good as 0 here).
  x = x < -88.3762626647949f ? -88.3762626647949f : (x > 88.3762626647949f ? 88.3762626647949f : x);
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  x = x - n * 0.693359375f - n * -2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (int32_t(1) << 23);  // 2^n
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return y * scale;
#endif
}
MADA_HD float abs_t(float x) { return fabsf(x); }
MADA_HD double abs_t(double x) { return fabs(x); }

template <typename T>
MADA_HD T sign_of(T x) {
  // sign(0) = 0, as torch.sign: Adam's corner must not see a spurious +1.
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

// Yogi's sign(gh^2 - v0), except that the undefined inf - inf (a gradient whose
// square overflowed, against a v that already had) counts as +1: Yogi's term
// v0 + sg * gh^2 is then inf, as every other branch of it is there, instead of
// inf + 0 * inf = NaN. Same comparisons as sign_of, so it costs nothing.
template <typename T>
MADA_HD T yogi_sign(T x) {
  return static_cast<T>(!(x <= T(0)) - (x < T(0)));
}

// a * x + (1 - a) * y for a weight a in [0, 1], where a weight at an end of its
// range contributes exactly nothing, even against an x or y that overflowed to
// inf (0 * inf would be NaN). For finite x, y the bits are those of the plain
// form (x, y >= 0 at every call, so a dropped term was +0). `a` is uniform over
// a call: the selects cost no per-element branch.
template <typename T>
MADA_HD T blend(T a, T x, T y) {
  const T one(1);
  return (a == T(0) ? T(0) : a * x) + (a == one ? T(0) : (one - a) * y);
}

// -- bf16 state storage (docs/spec.md section 5.1) ------------------------------
// With state_dtype=bfloat16 every new state value is rounded to a bf16 value
// stochastically as it is formed, and every later term reads the rounded value
// (the state "is" bf16). The random bits are a counter-based hash of
// (seed, step, buffer, element index), so any backend, thread count or launch
// layout draws the same bits. All arithmetic is modulo 2^32.

// murmur3's 32-bit finalizer: a bijection of uint32 whose every output bit
// depends on every input bit.
MADA_HD uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// One key per (seed, step, buffer): formed once per segment, not per element.
MADA_HD uint32_t sr_key(uint32_t seed, uint32_t step, uint32_t buffer) {
  return mix32(mix32(mix32(seed) ^ step) ^ buffer);
}

// The 32 random bits of element `index` (its flat index in the bucket's state).
// One mix per element: a second one made the fused CPU AdaMod step 1.3x slower,
// and the rounding needs only the low 16 bits, which one mix already spreads.
// The high half of the index (0 below 2^32 elements) shifts the key.
MADA_HD uint32_t sr_bits(uint32_t key, uint64_t index) {
  return mix32((key + uint32_t(index >> 32)) ^ uint32_t(index));
}

// x rounded to a bf16 value (returned as a float, so storing it is a plain
// truncation): the low 16 bits of `bits` are added to x's bit pattern below
// bf16's last place and the sum is truncated, which rounds up with probability
// (dropped part) / ulp: unbiased. inf keeps its empty mantissa; a NaN is
// truncated with its quiet bit set, so it cannot become inf.
MADA_HD float sr_bf16(float x, uint32_t bits) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  u = x != x ? (u | 0x00400000u) & 0xFFFF0000u : (u + (bits & 0xFFFFu)) & 0xFFFF0000u;
  float r;
  memcpy(&r, &u, sizeof r);
  return r;
}

// Storage policies: how a new state value becomes the stored one. The math
// below calls round(buffer, x) on each state value it forms; `buffer` is the
// value's position in the state order (MadaBuf, AdamodBuf), a hash input.
struct StoreExact {  // fp32 or fp64 state: stored as computed
  template <typename T>
  MADA_HD T operator()(int, T x) const { return x; }
};
struct StoreBf16Sr {  // bf16 state: stochastic rounding
  const uint32_t* key;  // sr_key of each buffer, indexed by its position
  uint64_t index;       // the element's flat index in the bucket's state
  MADA_HD float operator()(int buffer, float x) const { return sr_bf16(x, sr_bits(key[buffer], index)); }
};
enum MadaBuf : int { kBufM = 0, kBufV, kBufN, kBufGPrev, kBufL, kBufVb, kBufS, kNumMadaBufs };
// bf16 tangent rows (tangent_dtype=bfloat16, docs/spec.md section 5.3) draw
// their bits as a buffer after the state: coefficient j's row (Coef order, not
// its row rank) is buffer kBufTan0 + j. A tangent is never read in the step
// that forms it, so it is rounded only where it is stored.
constexpr int kBufTan0 = kNumMadaBufs;
enum AdamodBuf : int { kBufAm = 0, kBufAv, kBufAs, kBufAgPrev, kNumAdamodBufs };
// 8-bit blockwise state (docs/spec.md 5.4; mada_fused/quant8.py mirrors these):
// one uint8 code per element and one power-of-two fp32 scale per kQ8Block
// elements. Signed buffers take a sign bit + E4M3 (bias 15), non-negative ones
// (v, vb, s) E5M3 (bias 31); both with subnormals, top code 1.875 scales.
// Integer arithmetic on the fp32 bit pattern: no table, so every backend forms
// the same code from the same value.
constexpr int kQ8Block = 256;
constexpr int kQ8Mantissa = 3;
MADA_HD int q8_bias(bool sgn) { return sgn ? 15 : 31; }

// A block's scale from its largest magnitude: 2^floor(log2(amax)), at least
// 2^-126; NaN (0x7FC00000) when the block holds an inf or a NaN (!finite).
MADA_HD float q8_scale(float amax, bool finite) {
  uint32_t u;
  memcpy(&u, &amax, sizeof u);
  u = finite ? (u < 0x00800000u ? 0x00800000u : u) & 0x7F800000u : 0x7FC00000u;
  float s;
  memcpy(&s, &u, sizeof s);
  return s;
}

// x's code under its block's scale: round to nearest, ties to the even code,
// saturating; 0 for zero, fp32 subnormals, a negative x under the unsigned map
// and every element of a lost (NaN-scale) block.
MADA_HD uint32_t q8_encode(float x, float scale, bool sgn) {
  uint32_t u, su;
  memcpy(&u, &x, sizeof u);
  memcpy(&su, &scale, sizeof su);
  const uint32_t ex = (u >> 23) & 0xFFu, mant = u & 0x7FFFFFu;
  const int ef = int(ex) - int((su >> 23) & 0xFFu) + q8_bias(sgn);  // the code's exponent field
  const bool normal = ef >= 1;
  const uint32_t n = normal ? (uint32_t(ef) << 23) | mant : (1u << 23) | mant;
  const int sh = normal ? 23 - kQ8Mantissa : (24 - kQ8Mantissa - ef > 31 ? 31 : 24 - kQ8Mantissa - ef);
  uint32_t mag = (n + (1u << (sh - 1)) - 1u + ((n >> sh) & 1u)) >> sh;
  const uint32_t top = sgn ? 0x7Fu : 0xFFu;
  mag = ex == 0 || scale != scale ? 0u : mag > top ? top : mag;
  if (sgn) return mag ? mag | ((u >> 31) << 7) : 0u;
  return (u >> 31) ? 0u : mag;
}

// A code's value under its block's scale: two exact products (a subnormal fp32
// result rounds as IEEE gradual underflow does).
MADA_HD float q8_decode(uint32_t code, float scale, bool sgn) {
  const uint32_t mag = code & (sgn ? 0x7Fu : 0xFFu);
  const int e = int(mag >> kQ8Mantissa);
  const uint32_t f = mag & ((1u << kQ8Mantissa) - 1u);
  const float whole = float(e == 0 ? f : f + (1u << kQ8Mantissa));
  const uint32_t ub = uint32_t((e < 1 ? 1 : e) - q8_bias(sgn) - kQ8Mantissa + 127) << 23;
  float unit;
  memcpy(&unit, &ub, sizeof unit);
  const float v = whole * unit * scale;
  return sgn && (code >> 7) ? -v : v;
}

// -- bf16 parameters without fp32 master weights (docs/spec.md section 5.2) ------
// The hash's buffer number of a bf16 parameter's own stochastic rounding
// (bf16_stochastic_round): after the state (0-6) and the tangent rows (7-12).
enum : int { kBufParam = 13 };

// x rounded to the nearest bf16 value, ties to even (returned as a float, so
// storing it is a plain truncation); every NaN becomes the quiet NaN 0x7FC0.
MADA_HD float rne_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  u = x != x ? 0x7FC00000u : (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  float r;
  memcpy(&r, &u, sizeof r);
  return r;
}

// Kahan summation (kahan_sum): a step updates the compensated weight
// theta + comp (one fp32 sum of the two stored bf16 values); of its new value x
// the parameter keeps rne_bf16(x) and the compensation the rounding error
// x - rne_bf16(x) (exact in fp32), itself rounded to nearest bf16. Where the
// stored parameter is not finite the compensation is 0: inf - inf would make
// the next compensated weight NaN.
MADA_HD float kahan_weight(float theta, float comp) { return theta + comp; }
MADA_HD float kahan_comp(float x, float stored) {
  return stored - stored == 0.0f ? rne_bf16(x - stored) : 0.0f;
}

// Host-fixed MADA constants (they never change after construction).
struct MadaConst {
  double eps;
  double mod_beta;  // 0 = AdaMod clip off
  double lion_beta1;
  double lion_beta2;
  bool vbar_detach;  // w = rho (authors' code) instead of rho + (1 - rho) / t
};

// Everything one (parameter, step) needs, in compute type T. Built from the
// device-resident coefficients, lr, weight decay and step count.
template <typename T>
struct MadaScalars {
  T beta1, beta2, beta3, rho, c, gamma;
  T lr;
  T decay;     // 1 - lr * weight_decay
  T t;         // this parameter's step count, >= 1
  T bc1, bc2;  // 1 - beta^t
  // Reciprocals of the per-parameter divisors (taken in double, rounded once):
  // the element math multiplies by them, which can differ from dividing by up
  // to an ulp. A divide costs 4-10x a multiply on CPUs and GPUs alike, and 10
  // of MADA's 12 per-element divisions were by these uniform scalars, which
  // made the fused CPU pass compute-bound.
  T rbc1, rbc2;      // 1 / bc
  T rbc1sq, rbc2sq;  // 1 / bc^2
  T rt;              // 1 / t
  T dbc1, dbc2;  // t * beta^(t-1) = d(beta^t)/d(beta)
  T w;         // d N / d v
  T eps, mod_beta, lion_beta1, lion_beta2;
};

// Powers are taken in double: beta2^t for beta2 near 1 and large t loses most
// of its digits in float, and every backend must agree on it.
template <typename T>
MADA_HD MadaScalars<T> make_mada_scalars(const double* coef, double lr, double wd,
                                         double t, const MadaConst& k) {
  MadaScalars<T> s;
  const double b1 = coef[kBeta1], b2 = coef[kBeta2], rho = coef[kRho];
  s.beta1 = T(b1);
  s.beta2 = T(b2);
  s.beta3 = T(coef[kBeta3]);
  s.rho = T(rho);
  s.c = T(coef[kC]);
  s.gamma = T(coef[kGamma]);
  s.lr = T(lr);
  s.decay = T(1.0 - lr * wd);
  s.t = T(t);
  const double bc1 = 1.0 - pow(b1, t), bc2 = 1.0 - pow(b2, t);
  s.bc1 = T(bc1);
  s.bc2 = T(bc2);
  s.rbc1 = T(1.0 / bc1);
  s.rbc2 = T(1.0 / bc2);
  s.rbc1sq = T(1.0 / (bc1 * bc1));
  s.rbc2sq = T(1.0 / (bc2 * bc2));
  s.rt = T(1.0 / t);
  s.dbc1 = T(t * pow(b1, t - 1.0));
  s.dbc2 = T(t * pow(b2, t - 1.0));
  s.w = T(k.vbar_detach ? rho : rho + (1.0 - rho) / t);
  s.eps = T(k.eps);
  s.mod_beta = T(k.mod_beta);
  s.lion_beta1 = T(k.lion_beta1);
  s.lion_beta2 = T(k.lion_beta2);
  return s;
}

// MADA state of one element. Members a configuration does not allocate are
// never read or written (the template flags below compile them out).
template <typename T>
struct MadaState {
  T m, v, n, g_prev, l, vb, s;
};

// Which optional state a configuration carries. Each flag is implied by its
// coefficient being learnable or off its Adam-corner value, so compiling a term
// out gives bit-identical results to computing it with the corner value.
struct MadaFlags {
  bool beta3;  // n, g_prev
  bool vbar;   // vb
  bool lion;   // l
  bool mod;    // s
};

// What the second half of a step needs from the first (see mada_moments).
template <typename T>
struct MadaMid {
  T g, d, gh, gh2, sg, G, m0, v0, n0, uL, N, vh, A;
};

// The gradient terms of a step, from x.g, x.d and x.v0: gh, gh2, sg, G.
// YOGI = false compiles the Yogi term out, for a configuration with c fixed at
// 1 (not learned): then G = gh^2, exactly what blend gives at c = 1 for any
// input, and sg is left 0: du/dc, which reads it, is never used (c is not
// learned), and du/dbeta3's c + (1 - c) * sg is c either way.
template <typename T, bool BETA3, bool YOGI>
MADA_HD void mada_grad_terms(const MadaScalars<T>& k, MadaMid<T>& x) {
  x.gh = BETA3 ? x.g + k.beta3 * x.d : x.g;
  x.gh2 = x.gh * x.gh;
  x.sg = YOGI ? yogi_sign(x.gh2 - x.v0) : T(0);
  x.G = YOGI ? blend(k.c, x.gh2, x.v0 + x.sg * x.gh2) : x.gh2;
}

// The terms that follow from the updated state st (m, n, v, vb): N, vh, A.
template <typename T, bool BETA3, bool VBAR>
MADA_HD void mada_state_terms(const MadaScalars<T>& k, MadaMid<T>& x, const MadaState<T>& st) {
  x.N = VBAR ? blend(k.rho, st.v, st.vb) : st.v;
  x.vh = x.N * k.rbc2;
  x.A = BETA3 ? st.m * k.rbc1 + k.beta3 * st.n : st.m * k.rbc1;
}

// First half of one MADA step: every moment update, up to vh and A. Updates m,
// v, n, g_prev, l, vb in `st`.
//
// The split exists for the CPU: running the halves as two loops over a small
// block keeps each dependency chain short enough for out-of-order execution to
// overlap elements; one long chain (moments -> sqrt -> divide -> update) is
// latency-bound. mada_element below composes them into the same operations.
// Both term helpers are pure functions of what they read, so the CPU's second
// loop can recompute them from a few stashed values and the reloaded state
// rather than carry all of MadaMid across (same operations, same bits).
template <typename T, bool BETA3, bool VBAR, bool LION, bool MOD, bool TANGENTS,
          bool YOGI = true, class R = StoreExact>
MADA_HD MadaMid<T> mada_moments(const MadaScalars<T>& k, T g, MadaState<T>& st,
                                const R& round = R()) {
  const T one(1);
  MadaMid<T> x;
  x.g = g;
  x.d = BETA3 ? (k.t > one ? g - st.g_prev : T(0)) : T(0);
  x.v0 = st.v;
  x.m0 = st.m;
  mada_grad_terms<T, BETA3, YOGI>(k, x);
  st.m = round(kBufM, k.beta1 * x.m0 + (one - k.beta1) * g);
  st.v = round(kBufV, k.beta2 * x.v0 + (one - k.beta2) * x.G);

  x.n0 = T(0);
  if (BETA3) {
    x.n0 = st.n;
    st.n = round(kBufN, k.beta3 * x.n0 + (one - k.beta3) * x.d);
    st.g_prev = round(kBufGPrev, g);
  }
  x.uL = T(0);
  if (LION) {
    x.uL = k.lion_beta1 * st.l + (one - k.lion_beta1) * g;
    st.l = round(kBufL, k.lion_beta2 * st.l + (one - k.lion_beta2) * g);
  }
  if (VBAR) st.vb = round(kBufVb, ((k.t - one) * st.vb + st.v) * k.rt);
  mada_state_terms<T, BETA3, VBAR>(k, x, st);
  return x;
}

// Second half: the step size, AdaMod clip (updates st.s), the update and, when
// TANGENTS, du/dk for all six coefficients into `tan` (entries whose state is
// compiled out are left untouched: their coefficients cannot be learned in that
// configuration). Reads st.m, st.n, st.v, st.vb as the first half left them.
// Returns the new parameter value.
template <typename T, bool BETA3, bool VBAR, bool LION, bool MOD, bool TANGENTS,
          class R = StoreExact>
MADA_HD T mada_apply(const MadaScalars<T>& k, T theta, const MadaMid<T>& x,
                     MadaState<T>& st, T* tan, const R& round = R()) {
  const T one(1);
  const T sq = sqrt_t(x.vh);
  const T D = sq + k.eps;
  const T eta = k.lr / D;
  T etah = eta;
  bool clipped = false;
  if (MOD) {
    st.s = round(kBufS, k.mod_beta * st.s + (one - k.mod_beta) * eta);
    clipped = eta > st.s;
    etah = clipped ? st.s : eta;
  }
  T u = k.gamma * etah * x.A;
  if (LION) u += (one - k.gamma) * k.lr * sign_of(x.uL);

  if (TANGENTS) {
    const T om = clipped ? one - k.mod_beta : one;
    // d eta / d vh is unbounded at vh = 0. Such elements have never seen a
    // gradient (A = 0 too); their tangent is defined as 0 rather than NaN so an
    // unused embedding row cannot poison the global hyper-gradient.
    const T deta = sq > T(0) ? -k.lr / (T(2) * sq * D * D) : T(0);
    const T F = k.gamma * om * deta * x.A;
    const T b2w = k.w * (one - k.beta2);
    tan[kBeta1] = k.gamma * etah * ((x.m0 - x.g) * k.rbc1 + k.dbc1 * st.m * k.rbc1sq);
    tan[kBeta2] = F * (k.w * (x.v0 - x.G) * k.rbc2 + k.dbc2 * x.N * k.rbc2sq);
    tan[kC] = F * (b2w * (x.gh2 - x.v0 - x.sg * x.gh2) * k.rbc2);
    if (BETA3) {
      const T dvh = b2w * (k.c + (one - k.c) * x.sg) * T(2) * x.gh * x.d * k.rbc2;
      tan[kBeta3] = F * dvh + k.gamma * etah * (st.n + k.beta3 * (x.n0 - x.d));
    }
    if (VBAR) tan[kRho] = F * ((st.v - st.vb) * k.rbc2);
    if (LION) tan[kGamma] = etah * x.A - k.lr * sign_of(x.uL);
  }
  return theta * k.decay - u;
}

// One MADA step for one element: both halves. `g` is already unscaled and
// negated for maximize. Returns the new parameter value; updates `st`; when
// TANGENTS, fills du/dk into `tan` as mada_apply does; `round` is the storage policy.
template <typename T, bool BETA3, bool VBAR, bool LION, bool MOD, bool TANGENTS,
          class R = StoreExact>
MADA_HD T mada_element(const MadaScalars<T>& k, T g, T theta, MadaState<T>& st,
                       T* tan, const R& round = R()) {
  const MadaMid<T> x = mada_moments<T, BETA3, VBAR, LION, MOD, TANGENTS, true, R>(k, g, st, round);
  return mada_apply<T, BETA3, VBAR, LION, MOD, TANGENTS, R>(k, theta, x, st, tan, round);
}

// AdaMod (docs/spec.md section 3) and DiffMod (section 4).
template <typename T>
struct AdamodScalars {
  T beta1, beta2, beta3;
  T step_size;  // lr * sqrt(1 - beta2^t) / (1 - beta1^t)
  T decay;      // 1 - lr * weight_decay
  T eps;
};

template <typename T>
MADA_HD AdamodScalars<T> make_adamod_scalars(double beta1, double beta2, double beta3,
                                             double eps, double lr, double wd,
                                             double t) {
  AdamodScalars<T> s;
  s.beta1 = T(beta1);
  s.beta2 = T(beta2);
  s.beta3 = T(beta3);
  s.step_size = T(lr * sqrt(1.0 - pow(beta2, t)) / (1.0 - pow(beta1, t)));
  s.decay = T(1.0 - lr * wd);
  s.eps = T(eps);
  return s;
}

// DIFF adds diffGrad's friction xi = sigmoid(|g' - g|) to the applied step
// (not to the stored m); g_prev is 0 before the first step.
template <typename T, bool DIFF, class R = StoreExact>
MADA_HD T adamod_element(const AdamodScalars<T>& k, T g, T theta, T& m, T& v, T& s,
                         T& g_prev, const R& round = R()) {
  const T one(1);
  m = round(kBufAm, k.beta1 * m + (one - k.beta1) * g);
  v = round(kBufAv, k.beta2 * v + (one - k.beta2) * g * g);
  const T eta = k.step_size / (sqrt_t(v) + k.eps);
  s = round(kBufAs, k.beta3 * s + (one - k.beta3) * eta);
  const T etah = eta > s ? s : eta;
  T mh = m;
  if (DIFF) {
    mh = m / (one + exp_t(-abs_t(g_prev - g)));
    g_prev = round(kBufAgPrev, g);
  }
  return theta * k.decay - etah * mh;
}

}  // namespace mada
