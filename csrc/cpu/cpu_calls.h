// The plain-data interface between the pybind11 module (binding.cpp) and the
// ISA-specific kernel objects (kernels.cpp, compiled once per instruction set
// and parameter dtype). Nothing here depends on torch or Python: the module
// receives raw pointers from tensor.data_ptr() and fills these structs.
#pragma once

#include <cstdint>

namespace mada_cpu {

// Parameter dtype codes, shared with mada_fused/_segments.py.
enum Dtype : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3, kNumDtypes = 4 };

// One active segment, as packed by mada_fused/_segments.py: six int64 per row.
struct SegRow {
  int64_t param;   // address of the contiguous parameter data
  int64_t grad;    // address of the contiguous gradient (same dtype)
  int64_t offset;  // element offset into the bucket's flat state
  int64_t numel;
  int64_t group;   // index into lr / weight_decay
  int64_t pindex;  // index into the bucket's step counters
};

// Everything every pass reads. Pointers to state are of the state dtype
// (double for f64 params, float otherwise).
struct Common {
  const SegRow* seg;
  int64_t nseg;
  int64_t state_numel;  // bucket size: every segment must lie inside it
  const double* lr;
  const double* wd;
  const double* steps;      // already incremented for this step
  const float* grad_scale;  // nullptr: no AMP unscale
  const float* found_inf;   // nullptr or points to 0: step; non-zero: change nothing
  int num_threads;
};

// MADA state slots, in the order of mada_fused/_segments.py.MADA_STATE.
enum MadaSlot : int { kM = 0, kV, kN, kGPrev, kL, kVb, kS, kNumMadaSlots };

struct MadaCall {
  Common c;
  void* state[kNumMadaSlots];  // nullptr where the configuration has no such state
  void* tangents;              // (num_learn, tan_stride) rows, state dtype
  int64_t tan_stride;
  int num_learn;
  int learn[6];         // canonical coefficient index of each tangent row
  void* dot_out;        // nullptr: no hyper-gradient partial sums
  int dot_is_f64;       // dot_out dtype: float64 (1) or float32 (0)
  bool step;            // false: only the partial sums (hyper_order="exact")
  const double* coef;   // 6 coefficients, canonical order
  double eps, mod_beta, lion_beta1, lion_beta2;
  bool vbar_detach, maximize;
};

enum AdamodSlot : int { kAm = 0, kAv, kAs, kAgPrev, kNumAdamodSlots };

struct AdamodCall {
  Common c;
  void* state[kNumAdamodSlots];  // g_prev only for DiffMod
  double beta1, beta2, beta3, eps;
};

// The entry points one kernel object exports for one parameter dtype.
struct KernelTable {
  void (*mada)(const MadaCall&);
  void (*adamod)(const AdamodCall&);
  // Element conversions, exported so tests can check them exhaustively.
  void (*to_state)(const void* src, void* dst, int64_t n);
  void (*from_state)(const void* src, void* dst, int64_t n);
};

}  // namespace mada_cpu
