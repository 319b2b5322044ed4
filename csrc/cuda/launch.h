// Host-side interface of the CUDA backend, shared by the kernel files (nvcc), the
// launcher (nvcc) and the pybind11 binding (host compiler). No CUDA headers here:
// binding.cpp must build with a plain C++ compiler.
//
// Launch structure: one kernel launch steps every active segment of a bucket (up
// to kMaxSeg segments per launch; more segments only add launches). The segment
// table travels BY VALUE in the kernel parameters (__grid_constant__, CUDA 12.1+
// allows 32 KB on sm_70+), so a step does no host-to-device copy, never syncs,
// and a captured CUDA graph carries its own copy of the table.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "abi.h"

namespace mada_cuda {

// Codes, variant bits, slot order, Call and SegRow: the interface both
// extensions share.
using namespace mada_abi;

constexpr int kThreads = 128;   // threads per block of the step kernel
// Segments per launch: 48 B each, so the whole parameter block stays under 32 KB.
constexpr int kMaxSeg = 600;
constexpr int64_t kPad = 8;     // segments start at multiples of 8 in the launch's index space
                                // (of kQ8BlockElems when state or tangent rows are 8-bit codes)

// How the kernels store state and tangent rows: as the compute type, as bf16
// bit patterns (docs/spec.md sections 5.1, 5.3) or as 8-bit codes with block
// scales (sections 5.4, 5.5); the last two for fp32 compute only.
enum Storage : int { kStoreCompute = 0, kStoreBf16 = 1, kStoreQ8 = 2 };
constexpr int storage_of(int32_t dtype) {
  return dtype == kBF16 ? kStoreBf16 : dtype == kQ8 ? kStoreQ8 : kStoreCompute;
}

// Everything but the segment table. Pointers are device addresses; the per-step
// scalars (lr, coefficients, step counts, AMP scale and flag) are only ever read
// on the device, so the host never needs their values.
struct Common {
  const double* coef;       // (6,) canonical order
  const double* lr;         // (groups,)
  const double* wd;         // (groups,)
  const double* steps;      // (bucket params,) already incremented
  const float* grad_scale;  // null: no AMP scaling
  const float* found_inf;   // null: never skip
  void* buf[kMaxSlots];     // flat state buffers in abi.h's slot order (Call::state_dtype); null when unused
  float* scales[kMaxSlots]; // Call::scales: 8-bit state's block scales, else null
  void* tan;                // (n_learn, tan_stride) tangent rows (Call::tangent_dtype)
  float* tan_scales;        // (n_learn, tan_scale_stride) 8-bit tangent rows' block scales, else null
  int64_t tan_scale_stride;
  int64_t tan_stride;
  double* slots;            // (n_learn, slot_stride) per-block partial dot products
  int64_t slot_stride;      // total blocks of this call (all launches)
  int64_t block_base;       // first slot of this launch
  int64_t chunk;            // elements per block, a multiple of kPad
  double k[kNumConsts];     // Call::consts: abi.h's MadaConst or AdamodConst
  uint32_t learn_mask;      // Call::learn_mask (tangent row = rank of the coefficient's bit)
  int maximize;
  int vbar_detach;
  int dot;                  // accumulate sum(g * T) into slots
  uint32_t sr_seed;         // Call::sr_seed: bf16 state's, tangents' and parameters' stochastic rounding
  int param_round;          // Call::param_round (bf16 parameters: ParamIo chooses at run time)
  void* comp;               // Call::comp: bf16 Kahan compensation (flat state offsets), else null
};

// Segment i covers launch indices [vstart[i], vstart[i] + numel[i]); the gap up to
// vstart[i + 1] is padding that no thread touches.
struct SegTable {
  int n;
  int64_t vstart[kMaxSeg + 1];
  int64_t numel[kMaxSeg];
  int64_t off[kMaxSeg];       // element offset into the flat state
  void* param[kMaxSeg];
  const void* grad[kMaxSeg];
  int32_t group[kMaxSeg];
  int32_t pidx[kMaxSeg];      // index into steps
  uint32_t aligned[(kMaxSeg + 31) / 32];  // bit i: every stream of segment i is 16 B aligned
};

struct Args {
  Common c;
  SegTable s;
};
static_assert(sizeof(Args) <= 32764, "kernel parameters exceed the 32 KB limit");

// One pass: the call (checked by abi_check.h: the segment rows it points to
// are host memory, read during the call only; the launches copy what they
// need into kernel parameters) and the parameters every launch starts from.
struct Request {
  Call call;
  Common c;
  int n_learn;
};

Request make_request(const Call& checked);

// The launches of one call. Pure host arithmetic: no CUDA call, testable anywhere.
struct Plan {
  std::vector<Args> launches;
  std::vector<int64_t> blocks;  // grid size of each launch
  int64_t total_blocks = 0;
};

Plan make_plan(const Request& r);
// Launch the plan (and the slot reduction when a dot is taken) on the call's stream; `slots`
// holds total_blocks * n_learn doubles when a dot is taken. Throws on CUDA errors.
void execute(const Request& r, Plan& plan, double* slots);

// Launcher of one kernel instantiation; `stream` is a cudaStream_t.
using LaunchFn = void (*)(const Args&, int64_t blocks, void* stream);
struct KernelTable {
  LaunchFn mada[kMadaVariants];
  LaunchFn dot;
  LaunchFn adamod[kAdamodVariants];
};
// The launchers of parameter dtype D (abi.h Dtype) with state stored as SK and
// tangent rows as TK (Storage); instantiated once each, in kernels_*.cu. A
// table whose SK or TK is not kStoreCompute holds only the passes that touch
// that storage (null elsewhere).
template <int D, int SK, int TK>
const KernelTable& table();

std::vector<int> built_archs();
// Whether this build has machine code (or PTX) the device can run; the reason when not.
bool device_ok(int device, std::string* why);
int runtime_version();
// The CUDA version the installed driver supports (cudaDriverGetVersion, e.g. 13000); 0: no driver.
int driver_version();

}  // namespace mada_cuda
