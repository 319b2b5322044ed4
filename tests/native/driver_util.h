// Small helpers of cuda_on_cpu_driver.cpp: buffers, random fill, dtypes, and the
// per-element math dispatched on a run-time MADA variant. Independent of the
// kernel sources on purpose (the reference must not share their code).
#pragma once

#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "cuda/cuda_api.h"
#include "cuda/launch.h"
#include "mada_math.h"

// Host memory standing in for device memory: 64-byte aligned, so an element
// offset alone decides a segment's alignment.
template <class T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <class U>
  Aligned(const Aligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const Aligned&) const { return true; }
  bool operator!=(const Aligned&) const { return false; }
};
template <class T>
using Buf = std::vector<T, Aligned<T>>;

template <class T>
bool bits_equal(const Buf<T>& a, const Buf<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

template <class T>
int64_t addr(const T* p) { return int64_t(reinterpret_cast<uintptr_t>(p)); }

// xorshift64*: the same data on every machine.
struct Rng {
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
    return s * 0x2545F4914F6CDD1Dull;
  }
  uint64_t below(uint64_t n) { return next() % n; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * double(next() >> 11) * 0x1.0p-53; }
  uint64_t s;
};

// Parameter dtype -> its code, its state dtype and the conversions (round to nearest even).
template <class P> int dtype_code();
template <> inline int dtype_code<float>() { return mada_cuda::kF32; }
template <> inline int dtype_code<double>() { return mada_cuda::kF64; }
template <> inline int dtype_code<__nv_bfloat16>() { return mada_cuda::kBF16; }
template <> inline int dtype_code<__half>() { return mada_cuda::kF16; }

inline float to_state(float x) { return x; }
inline double to_state(double x) { return x; }
inline float to_state(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float to_state(__half x) { return __half2float(x); }
template <class P> P from_state(float x);
template <> inline float from_state<float>(float x) { return x; }
template <> inline __nv_bfloat16 from_state<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> inline __half from_state<__half>(float x) { return __float2half_rn(x); }
template <class P> P from_state(double x) { return x; }
template <class P>
using state_t = decltype(to_state(P{}));  // float, or double for double params

template <class T>
void fill(Buf<T>& b, Rng& rng, double lo, double hi) {
  using S = state_t<T>;
  for (T& x : b) x = from_state<T>(S(rng.uniform(lo, hi)));
}

// mada::mada_element for a variant known at run time (MadaBits).
template <class S, int V = 0>
S mada_element_dyn(int variant, const mada::MadaScalars<S>& k, S g, S theta, mada::MadaState<S>& st, S* tan) {
  if constexpr (V + 1 < int(mada_cuda::kMadaVariants)) {
    if (variant != V) return mada_element_dyn<S, V + 1>(variant, k, g, theta, st, tan);
  }
  using namespace mada_cuda;
  return mada::mada_element<S, bool(V & kHasBeta3), bool(V & kHasVbar), bool(V & kHasLion), bool(V & kHasMod),
                            bool(V & kTangents)>(k, g, theta, st, tan);
}
