// Planning and launching one backend call: split the active segments into
// launches, lay them out in chunks, launch the step kernel(s) and, for a
// hyper-gradient, the fixed-order reduction of the per-block partial sums.
#include <stdexcept>
#include <string>

#include "cuda/launch.h"
#include "cuda/step_kernel.cuh"

namespace mada_cuda {
namespace {

// Second pass of the dot product: block r sums slot row r in a fixed order
// (strided per thread, then the fixed block tree) and ADDS it to out[r], so
// buckets of one optimizer accumulate into one vector, in bucket order. No
// float atomics anywhere: the result is bitwise reproducible.
__global__ void __launch_bounds__(kThreads)
    reduce_slots(const double* slots, int64_t n, double* out, const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return;
  const double* row = slots + int64_t(blockIdx.x) * n;
  double v = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) v += row[j];
  MADA_SHARED(double[kThreads / 32], sh);
  const double s = block_sum(v, sh);
  if (threadIdx.x == 0) out[blockIdx.x] += s;
}

// The table of parameter dtype D for state stored as sk and tangent rows as tk
// (Storage; 8-bit rows only over 8-bit state, abi.h, whose dot pass, which
// reads no state, takes the table of compute-type state).
template <int D>
const KernelTable& table_for(int sk, int tk) {
  if (tk == kStoreQ8) return sk == kStoreQ8 ? table<D, kStoreQ8, kStoreQ8>() : table<D, kStoreCompute, kStoreQ8>();
  if (sk == kStoreQ8) return tk == kStoreBf16 ? table<D, kStoreQ8, kStoreBf16>() : table<D, kStoreQ8, kStoreCompute>();
  if (sk == kStoreBf16)
    return tk == kStoreBf16 ? table<D, kStoreBf16, kStoreBf16>() : table<D, kStoreBf16, kStoreCompute>();
  return tk == kStoreBf16 ? table<D, kStoreCompute, kStoreBf16>() : table<D, kStoreCompute, kStoreCompute>();
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("mada_fused CUDA backend: ") + what + ": " +
                             cudaGetErrorString(e));
  }
}

// Makes the call's device current and puts the caller's back afterwards: the
// runtime's current device is the thread's current context, which torch
// shares, so leaving ours current would move torch's too.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (device == prev_) return;
    check(cudaSetDevice(device), "cudaSetDevice");
    changed_ = true;
  }
  ~DeviceGuard() {
    if (changed_ && cudaSetDevice(prev_) != cudaSuccess) cudaGetLastError();  // no one to tell in a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

}  // namespace

void execute(const Request& r, Plan& plan, double* slots) {
  if (plan.launches.empty()) return;
  const Call& call = r.call;
  // A storage matters only to a pass that touches it: the dot reads no state,
  // AdaMod and tangent-free MADA variants no rows.
  const bool rows = call.op == kMadaDot || (call.op == kMadaStep && (call.variant & kTangents));
  const int sk = call.op == kMadaDot ? kStoreCompute : storage_of(call.state_dtype);
  const int tk = rows ? storage_of(call.tangent_dtype) : kStoreCompute;
  const KernelTable& t = call.dtype == kF32 ? table_for<kF32>(sk, tk)
                       : call.dtype == kF64 ? table<kF64, kStoreCompute, kStoreCompute>()
                       : call.dtype == kF16 ? table_for<kF16>(sk, tk) : table_for<kBF16>(sk, tk);
  const LaunchFn fn = call.op == kMadaStep ? t.mada[call.variant] : call.op == kMadaDot ? t.dot
                    : t.adamod[call.variant];
  const DeviceGuard device(int(call.device));
  void* stream = reinterpret_cast<void*>(static_cast<uintptr_t>(call.stream));
  for (size_t i = 0; i < plan.launches.size(); ++i) {
    Args& a = plan.launches[i];
    a.c.slots = slots;
    a.c.slot_stride = plan.total_blocks;
    fn(a, plan.blocks[i], stream);
    check(cudaGetLastError(), "step kernel launch");
  }
  if (call.dot_out && r.n_learn > 0) {
    MADA_LAUNCH(r.n_learn, kThreads, static_cast<cudaStream_t>(stream), reduce_slots)(
        slots, plan.total_blocks, call.dot_out, r.c.found_inf);
    check(cudaGetLastError(), "reduction launch");
  }
}

std::vector<int> built_archs() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};  // e.g. 800, 900: the archs nvcc compiled this file for
#else
  return {};
#endif
}

bool device_ok(int device, std::string* why) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaSuccess && device >= count) {
    *why = "device " + std::to_string(device) + " does not exist";
    return false;
  }
  int prev = 0;
  if (e == cudaSuccess) e = cudaGetDevice(&prev);
  if (e == cudaSuccess) {
    e = cudaSetDevice(device);
    // Fails with cudaErrorNoKernelImageForDevice when no built arch (or PTX) fits.
    cudaFuncAttributes attr;
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, reduce_slots);
    if (device != prev && cudaSetDevice(prev) != cudaSuccess) cudaGetLastError();  // as execute() does
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    *why = cudaGetErrorString(e);
    return false;
  }
  return true;
}

int runtime_version() { return CUDART_VERSION; }

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

}  // namespace mada_cuda
