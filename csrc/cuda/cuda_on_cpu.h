// CUDA on the CPU: what the csrc/cuda sources use of the CUDA language and
// runtime, for a plain C++ compiler, so the same kernels run in host memory
// (tests/native drives them, also under ASan/UBSan and TSan). Included through
// cuda_api.h only; never part of a GPU build.
//
// Execution model. A launch runs its grid block after block; each block's
// threads are real, concurrent std::threads, so a missing __syncthreads() is a
// real data race and ThreadSanitizer reports it. __syncthreads() is a barrier
// of the block's threads, __syncwarp one of a warp's lanes, __shfl_down_sync and
// __shfl_xor_sync exchanges among them, and __shared__ variables (MADA_SHARED)
// are allocated per block, one heap object each, so AddressSanitizer sees an
// overrun. A thread that returns
// stops counting at barriers (as on sm_70+), so a kernel's early exit does not
// hang the others. Launches are synchronous; the stream is ignored. Memory is
// host memory: a "device pointer" is any host address.
#pragma once

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define CUDART_VERSION 0  // no CUDA runtime in this build

// ---- Vector types and thread coordinates ----

struct uint3 { unsigned x, y, z; };
struct alignas(8) uint2 { unsigned x, y; };  // 8-byte loads stay 8-byte typed accesses
struct alignas(16) uint4 { unsigned x, y, z, w; };  // 16-byte loads stay 16-byte typed accesses
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local uint3 threadIdx{}, blockIdx{};
inline thread_local dim3 blockDim{}, gridDim{};

// ---- bfloat16 and half: storage types and the host conversions the kernels use ----
// Round to nearest even, bit for bit as torch's CPU conversions (c10::BFloat16,
// c10::Half), so CPU tensors stepped here match torch's own casts.

struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };

namespace cuda_on_cpu {
inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
}  // namespace cuda_on_cpu

inline float __bfloat162float(__nv_bfloat16 x) { return cuda_on_cpu::float_of(uint32_t(x.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  if (f != f) return {0x7FC0};
  const uint32_t u = cuda_on_cpu::bits_of(f);
  return {uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

inline float __half2float(__half x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16, exp = (x.bits >> 10) & 0x1Fu, mant = x.bits & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = float(mant) * cuda_on_cpu::float_of(0x33800000u);
    return sign ? -v : v;
  }
  return cuda_on_cpu::float_of(sign | (exp == 0x1F ? 0x7F800000u : (exp + 112u) << 23) | (mant << 13));
}
// fp16_ieee_from_fp32_value of the FP16 library, which c10::Half uses: two
// float multiplications do the rounding (to nearest even, overflow to inf).
inline __half __float2half_rn(float f) {
  using cuda_on_cpu::bits_of;
  using cuda_on_cpu::float_of;
  float base = (std::fabs(f) * float_of(0x77800000u)) * float_of(0x08800000u);  // * 2^112 * 2^-110
  const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return {uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

// ---- Runtime API: errors and an emulated current device ----

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorNotSupported = 801,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
struct cudaFuncAttributes { int maxThreadsPerBlock; };

namespace cuda_on_cpu {
// Devices this build pretends to have (tests raise it to check device handling).
inline int device_count = 1;
// Per host thread, as the runtime's current device is.
inline thread_local int current_device = 0;
inline thread_local cudaError_t last_error = cudaSuccess;
// Planted bug for .ci/cuda_on_cpu_sanitize.sh: __syncthreads() does nothing, and
// ThreadSanitizer must report the races that follow. Set only by the test driver.
inline bool plant_no_sync = false;
inline cudaError_t record(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}
}  // namespace cuda_on_cpu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_on_cpu::last_error;
  cuda_on_cpu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unrecognized error code";
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = cuda_on_cpu::device_count;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = cuda_on_cpu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= cuda_on_cpu::device_count) return cuda_on_cpu::record(cudaErrorInvalidDevice);
  cuda_on_cpu::current_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;  // no driver, as CUDART_VERSION says no runtime
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F*) {
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

// ---- Blocks: barriers, warp exchange, shared memory ----

namespace cuda_on_cpu {

// A reusable barrier whose party can shrink (a thread that left the kernel).
// Lock-free: arrivals count in one atomic word (parties << 32 | arrived) and
// waiters sleep on the phase word (a futex). With a mutex, a block's 128
// threads waking at once queued on it and each barrier cost milliseconds.
class Barrier {
 public:
  void reset(int parties) { word_.store(uint64_t(parties) << 32, std::memory_order_relaxed); }  // nobody waits
  // `last` runs in the thread that completes the phase, before anyone leaves it.
  template <class F = void (*)()>
  void arrive_and_wait(F last = [] {}) {
    const int phase = phase_.load(std::memory_order_relaxed);  // cannot move on before we arrive
    const uint64_t w = word_.fetch_add(1, std::memory_order_acq_rel) + 1;
    if (uint32_t(w) == uint32_t(w >> 32)) {
      complete(w, last);
      return;
    }
    while (phase_.load(std::memory_order_acquire) == phase) phase_.wait(phase, std::memory_order_acquire);
  }
  void drop() {
    const uint64_t w = word_.fetch_sub(uint64_t(1) << 32, std::memory_order_acq_rel) - (uint64_t(1) << 32);
    if (uint32_t(w) > 0 && uint32_t(w) == uint32_t(w >> 32)) complete(w, [] {});
  }

 private:
  // Every live party has arrived: nobody else touches word_ until the phase moves.
  template <class F>
  void complete(uint64_t w, F last) {
    word_.store(w >> 32 << 32, std::memory_order_relaxed);
    last();
    phase_.fetch_add(1, std::memory_order_release);
    phase_.notify_all();
  }
  std::atomic<uint64_t> word_{0};
  std::atomic<int> phase_{0};
};

// The state one block's threads share.
class Block {
 public:
  explicit Block(int threads) : threads_(threads), warps_((threads + 31) / 32) { reset(); }
  ~Block() { free_shared(); }

  void syncthreads() {
    if (!plant_no_sync) sync_.arrive_and_wait();
  }

  // Every live lane of the warp calls them (the kernels pass the full mask).
  template <class T>
  T shfl_down(T v, unsigned delta) { return exchange(v, (threadIdx.x & 31u) + delta); }
  template <class T>
  T shfl_xor(T v, unsigned mask) { return exchange(v, (threadIdx.x & 31u) ^ mask); }

  void syncwarp() { warps_[threadIdx.x >> 5].sync.arrive_and_wait(); }

  // Storage of the __shared__ variable declared at `site`, the same object for
  // every thread of this block; fresh (uninitialised) for the next block.
  void* shared(const void* site, std::size_t size, std::size_t align) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Var& v : vars_)
      if (v.site == site) return v.ptr;
    void* p = ::operator new(size, std::align_val_t(align));
    vars_.push_back({site, p, align});
    return p;
  }

  // A thread is done with the current block; returns once all of them are, with
  // the block reset for the next one.
  void leave() {
    sync_.drop();
    warps_[threadIdx.x >> 5].sync.drop();
    done_.arrive_and_wait([this] { reset(); });
  }

 private:
  // Lane src's v, or v itself when src is no lane of the warp.
  template <class T>
  T exchange(T v, unsigned src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a register value");
    const unsigned lane = threadIdx.x & 31u;
    Warp& w = warps_[threadIdx.x >> 5];
    std::memcpy(&w.value[lane], &v, sizeof v);
    w.sync.arrive_and_wait();  // every lane has published
    T out = v;
    if (src < 32u && (threadIdx.x >> 5) * 32u + src < unsigned(threads_)) std::memcpy(&out, &w.value[src], sizeof out);
    w.sync.arrive_and_wait();  // every lane has read before the next exchange writes
    return out;
  }
  struct Warp {
    Barrier sync;
    uint64_t value[32];
  };
  struct Var {
    const void* site;
    void* ptr;
    std::size_t align;
  };
  void reset() {
    free_shared();
    sync_.reset(threads_);
    done_.reset(threads_);
    for (std::size_t w = 0; w < warps_.size(); ++w)
      warps_[w].sync.reset(threads_ - 32 * int(w) < 32 ? threads_ - 32 * int(w) : 32);
  }
  void free_shared() {
    for (const Var& v : vars_) ::operator delete(v.ptr, std::align_val_t(v.align));
    vars_.clear();
  }
  const int threads_;
  Barrier sync_, done_;
  std::vector<Warp> warps_;
  std::mutex mu_;
  std::vector<Var> vars_;
};

inline thread_local Block* this_block = nullptr;

template <class T>
T& shared_variable(const void* site) {
  static_assert(std::is_trivially_default_constructible<T>::value && std::is_trivially_destructible<T>::value,
                "__shared__ variables have no constructor or destructor");
  return *static_cast<T*>(this_block->shared(site, sizeof(T), alignof(T)));
}

// One kernel launch: converts the arguments to the kernel's parameter types
// once (the parameter buffer), then runs the grid.
template <class... P>
class Launch {
 public:
  Launch(void (*kernel)(P...), dim3 grid, dim3 block) : kernel_(kernel), grid_(grid), block_(block) {}

  template <class... A>
  void operator()(A&&... args) const {
    if (grid_.x == 0 || block_.x == 0 || block_.x > 1024) {
      record(cudaErrorInvalidConfiguration);
      return;
    }
    if (grid_.y * grid_.z != 1 || block_.y * block_.z != 1) {  // the kernels here are 1-D
      record(cudaErrorNotSupported);
      return;
    }
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const int n = int(block_.x);
    Block block(n);
    Gate gate;
    std::vector<std::thread> threads;
    try {
      for (int t = 0; t < n; ++t)
        threads.emplace_back([&, t] {
          if (!gate.wait()) return;
          threadIdx = {unsigned(t), 0, 0};
          blockDim = block_;
          gridDim = grid_;
          this_block = &block;
          for (unsigned b = 0; b < grid_.x; ++b) {
            blockIdx = {b, 0, 0};
            std::apply(kernel_, params);
            block.leave();
          }
          this_block = nullptr;
        });
    } catch (const std::system_error&) {  // out of threads: nobody has started
      record(cudaErrorLaunchOutOfResources);
    }
    gate.open(threads.size() == std::size_t(n));
    for (std::thread& t : threads) t.join();
  }

 private:
  // Holds the threads until all exist, so a failed start cancels them all.
  class Gate {
   public:
    bool wait() {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return state_ != 0; });
      return state_ == 1;
    }
    void open(bool run) {
      std::lock_guard<std::mutex> lock(mu_);
      state_ = run ? 1 : 2;
      cv_.notify_all();
    }

   private:
    std::mutex mu_;
    std::condition_variable cv_;
    int state_ = 0;  // 0 closed, 1 run, 2 cancelled
  };
  void (*kernel_)(P...);
  dim3 grid_, block_;
};

template <class... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block) {
  return Launch<P...>(kernel, grid, block);
}

}  // namespace cuda_on_cpu

inline void __syncthreads() { cuda_on_cpu::this_block->syncthreads(); }
template <class T>
T __shfl_down_sync(unsigned /*mask*/, T v, unsigned delta) {
  return cuda_on_cpu::this_block->shfl_down(v, delta);
}
inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) { cuda_on_cpu::this_block->syncwarp(); }
template <class T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int mask) {
  return cuda_on_cpu::this_block->shfl_xor(v, unsigned(mask));
}

#define MADA_LAUNCH(grid, threads, stream, ...) \
  ((void)(stream), ::cuda_on_cpu::launch(__VA_ARGS__, dim3(grid), dim3(threads)))
#define MADA_SHARED(T, name)                        \
  using name##_shared_t = T;                        \
  static const char name##_shared_site = 0;         \
  name##_shared_t& name = ::cuda_on_cpu::shared_variable<name##_shared_t>(&name##_shared_site)
