// The one call interface of the native extensions (_C_cpu and _C_cuda).
//
// Python packs one Call (mada_fused/backends/abi.py mirrors this file field by
// field) and hands its bytes to the extension's run(); the segment table it
// points to is an array of SegRow. Everything is plain data: addresses from
// tensor.data_ptr(), counts and codes. No torch, no CUDA, no pybind11 here, so
// g++, nvcc and the host compiler of the CUDA binding all read the same file.
// Each extension reports these constants, sizes and offsets (abi_py.h),
// and tests/test_abi.py checks that the Python mirror agrees.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mada_abi {

// Bumped whenever a layout or a code below changes meaning.
// 2: maximize applies to kAdamodStep too; 3: Call::state_dtype, Call::sr_seed;
// 4 (purebf16): Call::param_round, Call::comp; 5: Call::tangent_dtype (bf16
// tangent rows), in the place of 4's reserved field; 6: kQ8 state, Call::scales;
// 7: kQ8 tangent rows, Call::tan_scales, Call::tan_scale_stride.
constexpr int kVersion = 7;

// Parameter (and gradient) dtypes, and (Call::state_dtype, Call::tangent_dtype)
// how the state buffers and the tangent rows are stored. Arithmetic is float64
// for kF64 parameters, whose state and tangents are kF64 too, and float32 for
// the others, whose state and tangents are each kF32 or kBF16 (stored with
// stochastic rounding, docs/spec.md sections 5.1 and 5.3).
enum Dtype : int32_t { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3, kNumDtypes = 4 };
// Call::state_dtype and Call::tangent_dtype only: 8-bit codes (uint8) with one fp32
// scale per 256 elements, in Call::scales (state, docs/spec.md section 5.4) and
// Call::tan_scales (tangent rows, signed codes, section 5.5); every segment offset
// a multiple of 256. kQ8 tangent rows go with kQ8 state only (they share its blocks).
constexpr int32_t kQ8 = 4;
constexpr int64_t kQ8BlockElems = 256;

// How a step stores a bf16 parameter's new value (Call::param_round, docs/spec.md
// section 5.2): round to nearest even (every other parameter dtype, always);
// stochastically (bf16_stochastic_round=True); or with Kahan summation
// (kahan_sum=True), whose bf16 compensation buffer is Call::comp.
enum ParamRound : int32_t { kRoundNearest = 0, kRoundStochastic = 1, kRoundKahan = 2, kNumParamRounds = 3 };

// Passes. kMadaDot is hyper_order="exact"'s reduction-only pass: it adds
// sum(g * tangent row) into dot_out and changes nothing else.
enum Op : int32_t { kMadaStep = 0, kMadaDot = 1, kAdamodStep = 2, kNumOps = 3 };

// Variant bits of kMadaStep: which optional state the configuration carries,
// and whether the pass writes tangent rows (set exactly when learn_mask is).
enum MadaBits : uint32_t { kHasBeta3 = 1, kHasVbar = 2, kHasLion = 4, kHasMod = 8, kTangents = 16 };
constexpr uint32_t kMadaVariants = 32;
// Variant bits of kAdamodStep: kDiff adds DiffMod's friction term (state g_prev).
enum AdamodBits : uint32_t { kDiff = 1 };
constexpr uint32_t kAdamodVariants = 2;

// The state dtypes a parameter dtype allows: its compute dtype, or bf16 for the
// float32 ones.
constexpr bool state_dtype_ok(int32_t dtype, int32_t state_dtype) {
  return dtype == kF64 ? state_dtype == kF64 : (state_dtype == kF32 || state_dtype == kBF16 || state_dtype == kQ8);
}
// Tangent rows follow the same rule, and 8-bit rows need 8-bit state.
constexpr bool tangent_dtype_ok(int32_t dtype, int32_t state_dtype, int32_t tangent_dtype) {
  return state_dtype_ok(dtype, tangent_dtype) && (tangent_dtype != kQ8 || state_dtype == kQ8);
}

// State slots of Call::state, in this order.
enum MadaSlot : int { kM = 0, kV, kN, kGPrev, kL, kVb, kS, kNumMadaSlots };
enum AdamodSlot : int { kAm = 0, kAv, kAs, kAgPrev, kNumAdamodSlots };
constexpr int kMaxSlots = kNumMadaSlots;

// The slots a pass reads and writes, as bits of Call::state (bit i: slot i).
// The kernels never touch the others; the check nulls them.
constexpr uint32_t mada_slots(uint32_t variant) {
  return 3u | ((variant & kHasBeta3) ? 12u : 0u) | ((variant & kHasLion) ? 16u : 0u) |
         ((variant & kHasVbar) ? 32u : 0u) | ((variant & kHasMod) ? 64u : 0u);
}
constexpr uint32_t adamod_slots(uint32_t variant) { return (variant & kDiff) ? 15u : 7u; }
constexpr uint32_t used_slots(int32_t op, uint32_t variant) {
  return op == kMadaStep ? mada_slots(variant) : op == kAdamodStep ? adamod_slots(variant) : 0u;
}

// Learned coefficients: bit j of learn_mask is coefficient j in the canonical
// order of mada_math.h (Coef: beta1 beta2 beta3 rho c gamma). Tangent row r and
// dot_out[r] belong to the learned coefficient of rank r among the set bits.
constexpr int kNumCoef = 6;
constexpr int num_learned(uint32_t learn_mask) {
  int n = 0;
  for (int j = 0; j < kNumCoef; ++j) n += (learn_mask >> j) & 1u;
  return n;
}
// The variant bits a learned coefficient needs: its tangent is computed from its state.
constexpr uint32_t coef_needs(int j) { return j == 2 ? kHasBeta3 : j == 3 ? kHasVbar : j == 5 ? kHasLion : 0u; }

// Call::consts, by op.
enum MadaConst : int { kEps = 0, kModBeta, kLionBeta1, kLionBeta2 };
enum AdamodConst : int { kAdamodBeta1 = 0, kAdamodBeta2, kAdamodBeta3, kAdamodEps };
constexpr int kNumConsts = 4;

// One active segment (a parameter whose grad is set).
struct SegRow {
  int64_t param;   // address of the contiguous parameter data
  int64_t grad;    // address of the contiguous gradient (same dtype)
  int64_t offset;  // element offset into the bucket's flat state
  int64_t numel;
  int64_t group;   // index into lr and wd
  int64_t pindex;  // index into steps
};

// One pass over one bucket. Addresses are of the bucket's device; 0 = none.
// Fields up to `rows` are fixed for a (bucket, configuration, pass), so a
// backend packs them once; the rest change from step to step.
struct Call {
  int32_t op;             // Op
  uint32_t variant;       // MadaBits for kMadaStep, AdamodBits for kAdamodStep, 0 for kMadaDot
  int32_t dtype;          // Dtype
  uint32_t learn_mask;    // learned coefficients (MADA passes), 0 otherwise
  int32_t maximize;       // 1: the processed gradient is -grad (every pass)
  int32_t vbar_detach;    // 1: d N / d v = rho, as in the authors' code (MADA)
  int32_t state_dtype;    // Dtype of the state buffers (see Dtype)
  uint32_t sr_seed;       // seed of the stochastic rounding of bf16 state, tangent rows and kRoundStochastic parameters
  int32_t param_round;    // ParamRound; not kRoundNearest only for kBF16 parameters
  int32_t tangent_dtype;  // Dtype of the tangent rows (see Dtype)
  int64_t device;         // CUDA device index; the CPU ignores it
  int64_t state_numel;    // elements of each flat state buffer: every segment lies inside
  int64_t num_groups;     // entries of lr and wd
  int64_t num_params;     // entries of steps
  const double* lr;       // (num_groups,) float64
  const double* wd;       // (num_groups,) float64
  const double* steps;    // (num_params,) float64, already incremented for this step
  void* state[kMaxSlots];  // MadaSlot or AdamodSlot order, of state_dtype
  void* comp;             // (state_numel,) bf16 Kahan compensation (kRoundKahan), else 0
  void* scales[kMaxSlots];  // kQ8 state: each slot's fp32 block scales (state_numel / 256); else 0
  void* tangents;         // (num_learned, tan_stride) rows of tangent_dtype
  int64_t tan_stride;     // elements from one tangent row to the next, >= state_numel
  void* tan_scales;       // kQ8 rows: (num_learned, tan_scale_stride) fp32 block scales; else 0
  int64_t tan_scale_stride;  // scales from one row's to the next, >= state_numel / 256
  double consts[kNumConsts];  // MadaConst or AdamodConst
  // -- per step
  const SegRow* rows;     // host memory, read during the call only
  int64_t n_rows;
  const double* coef;     // (6,) float64, canonical order (MADA passes)
  const float* grad_scale;  // 1 float32: AMP's scale, the gradient is divided by it
  const float* found_inf;   // 1 float32: non-zero means change nothing
  double* dot_out;        // (num_learned,) float64: the pass ADDS sum(g * row) into it
  uint64_t stream;        // cudaStream_t; the CPU ignores it
  int64_t num_threads;    // CPU threads (< 1: one); CUDA ignores it
};

static_assert(sizeof(void*) == 8, "the call packs addresses as 64-bit integers");
static_assert(sizeof(SegRow) == 48, "mada_fused/backends/abi.py packs six int64 per row");

}  // namespace mada_abi
