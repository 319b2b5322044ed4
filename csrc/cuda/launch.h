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

namespace mada_cuda {

// Parameter dtypes, as the Python side encodes them.
enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };
// Passes. kMadaDot is hyper_order="exact"'s reduction-only pass.
enum Op : int { kMadaStep = 0, kMadaDot = 1, kAdamodStep = 2 };
// MADA variant bits: which optional state exists, and whether tangents are written.
enum MadaBits : int { kHasBeta3 = 1, kHasVbar = 2, kHasLion = 4, kHasMod = 8, kTangents = 16 };
constexpr int kMadaVariants = 32;

// State buffers a pass reads and writes, as bits of Common::buf (MADA: m v n
// g_prev l vb s; AdaMod: m v s g_prev). The kernels compile the rest out; the
// host refuses a call that leaves one of these null.
constexpr unsigned mada_buffers(int variant) {
  return 3u | ((variant & kHasBeta3) ? 12u : 0u) | ((variant & kHasLion) ? 16u : 0u) |
         ((variant & kHasVbar) ? 32u : 0u) | ((variant & kHasMod) ? 64u : 0u);
}
constexpr unsigned adamod_buffers(bool diff) { return diff ? 15u : 7u; }

constexpr int kThreads = 128;   // threads per block of the step kernel
constexpr int kBufs = 7;        // MADA: m v n g_prev l vb s; AdaMod: m v s g_prev
constexpr int kNumCoef = 6;
// Segments per launch: 48 B each, so the whole parameter block stays under 32 KB.
constexpr int kMaxSeg = 600;
constexpr int64_t kPad = 8;     // segments start at multiples of 8 in the launch's index space

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
  void* buf[kBufs];         // flat state buffers (state dtype); null when absent
  void* tan;                // (n_learn, tan_stride) tangent rows
  int64_t tan_stride;
  double* slots;            // (n_learn, slot_stride) per-block partial dot products
  int64_t slot_stride;      // total blocks of this call (all launches)
  int64_t block_base;       // first slot of this launch
  int64_t chunk;            // elements per block, a multiple of kPad
  double k[5];              // op constants (see binding.cpp: MADA or AdaMod)
  uint32_t learn_mask;      // bit j set: coefficient j is learned (tangent row = its rank)
  int maximize;
  int dot;                  // accumulate sum(g * T) into slots
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

// One active segment as mada_fused/_segments.py packs it (host memory, read
// during the call only: the launch copies what it needs into kernel parameters).
struct SegRow {
  int64_t param, grad;  // addresses of contiguous data of the bucket's dtype
  int64_t offset;       // element offset into the flat state
  int64_t numel;
  int64_t group;        // index into lr / weight_decay
  int64_t pindex;       // index into steps
};

// One call from Python, checked by make_request.
struct Request {
  int op = kMadaStep;
  int variant = 0;  // MadaBits for kMadaStep; 1 = DiffMod for kAdamodStep
  int dtype = kF32;
  int device = 0;
  uintptr_t stream = 0;
  const SegRow* rows = nullptr;
  int64_t n_rows = 0;
  Common c{};
  int n_learn = 0;
  double* dot_out = nullptr;  // (n_learn,) float64; the pass ADDS into it
};

using Addrs = std::vector<int64_t>;
// Checks a call from Python (plan.cpp documents the arguments); throws
// std::invalid_argument for anything that would make a kernel read or write
// out of bounds.
Request make_request(const std::vector<int64_t>& call, const Addrs& table, const Addrs& scalars,
                     const Addrs& bufs, int64_t tan, int64_t tan_stride, uint32_t learn_mask,
                     const std::vector<double>& consts, bool maximize, int64_t dot_out);

// The launches of one call. Pure host arithmetic: no CUDA call, testable anywhere.
struct Plan {
  std::vector<Args> launches;
  std::vector<int64_t> blocks;  // grid size of each launch
  int64_t total_blocks = 0;
};

Plan make_plan(const Request& r);
// Launch the plan (and the slot reduction when r.dot_out) on r.stream; `slots`
// holds total_blocks * n_learn doubles when a dot is taken. Throws on CUDA errors.
void execute(const Request& r, Plan& plan, double* slots);

// Launcher of one kernel instantiation; `stream` is a cudaStream_t.
using LaunchFn = void (*)(const Args&, int64_t blocks, void* stream);
struct KernelTable {
  LaunchFn mada[kMadaVariants];
  LaunchFn dot;
  LaunchFn adamod[2];  // [diff]
};
const KernelTable& table_f32();
const KernelTable& table_f64();
const KernelTable& table_bf16();
const KernelTable& table_f16();

std::vector<int> built_archs();
// Whether this build has machine code (or PTX) the device can run; the reason when not.
bool device_ok(int device, std::string* why);
int runtime_version();

}  // namespace mada_cuda
