// Per-element math of every mada-fused optimizer, written once for the CUDA
// kernels (nvcc) and the fused CPU loop (g++). SPEC.md is the contract; the
// comments here only say where the code departs from a literal transcription.
//
// Everything is a pure function of registers: loading, storing, vectorising and
// reducing belong to the callers, so one header serves every memory schedule.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MADA_HD __host__ __device__ __forceinline__
#else
#define MADA_HD inline
#endif

namespace mada {

// Canonical coefficient order. Tangent rows and hyper-gradient slots follow it,
// restricted to the learned names.
enum Coef : int { kBeta1 = 0, kBeta2, kBeta3, kRho, kC, kGamma, kNumCoef };

template <typename T>
MADA_HD T sign_of(T x) {
  // sign(0) = 0, as torch.sign: Adam's corner must not see a spurious +1.
  return static_cast<T>((x > T(0)) - (x < T(0)));
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
  s.bc1 = T(1.0 - pow(b1, t));
  s.bc2 = T(1.0 - pow(b2, t));
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

// One MADA step for one element. `g` is already unscaled and negated for
// maximize. Returns the new parameter value; updates `st`; when TANGENTS, fills
// du/dk for all six coefficients into `tan` (entries whose state is compiled out
// are left untouched: their coefficients cannot be learned in that
// configuration).
template <typename T, bool BETA3, bool VBAR, bool LION, bool MOD, bool TANGENTS>
MADA_HD T mada_element(const MadaScalars<T>& k, T g, T theta, MadaState<T>& st,
                       T* tan) {
  const T one(1);
  const T d = BETA3 ? (k.t > one ? g - st.g_prev : T(0)) : T(0);
  const T gh = BETA3 ? g + k.beta3 * d : g;
  const T gh2 = gh * gh;
  const T v0 = st.v, m0 = st.m;
  const T sg = sign_of(gh2 - v0);
  const T G = k.c * gh2 + (one - k.c) * (v0 + sg * gh2);
  st.m = k.beta1 * m0 + (one - k.beta1) * g;
  st.v = k.beta2 * v0 + (one - k.beta2) * G;

  T n0(0);
  if (BETA3) {
    n0 = st.n;
    st.n = k.beta3 * n0 + (one - k.beta3) * d;
    st.g_prev = g;
  }
  T uL(0);
  if (LION) {
    uL = k.lion_beta1 * st.l + (one - k.lion_beta1) * g;
    st.l = k.lion_beta2 * st.l + (one - k.lion_beta2) * g;
  }
  T N = st.v;
  if (VBAR) {
    st.vb = ((k.t - one) * st.vb + st.v) / k.t;
    N = k.rho * st.v + (one - k.rho) * st.vb;
  }
  const T vh = N / k.bc2;
  const T A = BETA3 ? st.m / k.bc1 + k.beta3 * st.n : st.m / k.bc1;
  const T sq = sqrt(vh);
  const T D = sq + k.eps;
  const T eta = k.lr / D;
  T etah = eta;
  bool clipped = false;
  if (MOD) {
    st.s = k.mod_beta * st.s + (one - k.mod_beta) * eta;
    clipped = eta > st.s;
    etah = clipped ? st.s : eta;
  }
  T u = k.gamma * etah * A;
  if (LION) u += (one - k.gamma) * k.lr * sign_of(uL);

  if (TANGENTS) {
    const T om = clipped ? one - k.mod_beta : one;
    // d eta / d vh is unbounded at vh = 0. Such elements have never seen a
    // gradient (A = 0 too); their tangent is defined as 0 rather than NaN so an
    // unused embedding row cannot poison the global hyper-gradient.
    const T deta = sq > T(0) ? -k.lr / (T(2) * sq * D * D) : T(0);
    const T F = k.gamma * om * deta * A;
    const T b2w = k.w * (one - k.beta2);
    tan[kBeta1] = k.gamma * etah * ((m0 - g) / k.bc1 + k.dbc1 * st.m / (k.bc1 * k.bc1));
    tan[kBeta2] = F * (k.w * (v0 - G) / k.bc2 + k.dbc2 * N / (k.bc2 * k.bc2));
    tan[kC] = F * (b2w * (gh2 - v0 - sg * gh2) / k.bc2);
    if (BETA3) {
      const T dvh = b2w * (k.c + (one - k.c) * sg) * T(2) * gh * d / k.bc2;
      tan[kBeta3] = F * dvh + k.gamma * etah * (st.n + k.beta3 * (n0 - d));
    }
    if (VBAR) tan[kRho] = F * ((st.v - st.vb) / k.bc2);
    if (LION) tan[kGamma] = etah * A - k.lr * sign_of(uL);
  }
  return theta * k.decay - u;
}

// AdaMod (SPEC 3) and DiffMod (SPEC 4).
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
template <typename T, bool DIFF>
MADA_HD T adamod_element(const AdamodScalars<T>& k, T g, T theta, T& m, T& v, T& s,
                         T& g_prev) {
  const T one(1);
  m = k.beta1 * m + (one - k.beta1) * g;
  v = k.beta2 * v + (one - k.beta2) * g * g;
  const T eta = k.step_size / (sqrt(v) + k.eps);
  s = k.beta3 * s + (one - k.beta3) * eta;
  const T etah = eta > s ? s : eta;
  T mh = m;
  if (DIFF) {
    mh = m / (one + exp(-fabs(g_prev - g)));
    g_prev = g;
  }
  return theta * k.decay - etah * mh;
}

}  // namespace mada
