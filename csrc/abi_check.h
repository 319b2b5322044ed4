// The checks both extensions run on a Call before any kernel sees it: every
// fact whose violation would let a kernel read or write out of bounds, or read
// a buffer the pass needs but was not given. Host code only (the CPU binding
// and csrc/cuda/plan.cpp); the tensor-side facts (dtype, device, size of each
// buffer) are checked in Python, where the tensors are (backends/native.py).
#pragma once

#include <string>

#include "abi.h"

namespace mada_abi {

// "" when `c` is good; otherwise why not. Clears what the pass does not use
// (state slots of other variants, tangents of a pass without them), so a
// kernel never sees a stale address it could follow.
inline std::string check_call(Call& c) {
  const auto seg = [](int64_t i) { return "segment " + std::to_string(i); };
  if (c.op < 0 || c.op >= kNumOps) return "unknown op " + std::to_string(c.op);
  if (c.dtype < 0 || c.dtype >= kNumDtypes) return "unknown dtype code " + std::to_string(c.dtype);
  if (!state_dtype_ok(c.dtype, c.state_dtype))
    return "state dtype code " + std::to_string(c.state_dtype) + " does not go with parameter dtype code " +
           std::to_string(c.dtype);
  if (!tangent_dtype_ok(c.dtype, c.state_dtype, c.tangent_dtype))
    return "tangent dtype code " + std::to_string(c.tangent_dtype) + " does not go with parameter dtype code " +
           std::to_string(c.dtype) + " and state dtype code " + std::to_string(c.state_dtype) +
           " (8-bit tangent rows need 8-bit state)";
  if (c.param_round < 0 || c.param_round >= kNumParamRounds)
    return "unknown parameter rounding code " + std::to_string(c.param_round);
  if (c.param_round != kRoundNearest && c.dtype != kBF16)
    return "stochastic rounding and Kahan summation of parameters are for bf16 parameters only";
  const bool mada = c.op != kAdamodStep;
  const uint32_t variants = c.op == kMadaStep ? kMadaVariants : c.op == kAdamodStep ? kAdamodVariants : 1u;
  if (c.variant >= variants) return "bad variant bits for this op";
  if (c.learn_mask >> kNumCoef) return "bad learn mask";
  const int n_learn = num_learned(c.learn_mask);
  if (!mada && n_learn) return "AdaMod learns no coefficient";
  if (c.op == kMadaStep && !(c.variant & kTangents) != !n_learn)
    return "the tangents bit must be set exactly when coefficients are learned";
  if (c.op == kMadaDot && !n_learn) return "the dot pass needs learned coefficients";
  for (int j = 0; j < kNumCoef; ++j)
    if (c.op == kMadaStep && ((c.learn_mask >> j) & 1u) && (c.variant & coef_needs(j)) != coef_needs(j))
      return "a learned coefficient lacks its state";

  if (c.state_numel < 0 || c.n_rows < 0 || (c.n_rows > 0 && !c.rows)) return "bad segment table";
  if (c.op != kMadaDot && (!c.lr || !c.wd || !c.steps))
    return "lr, weight_decay and steps are required";
  if (c.op == kMadaStep && !c.coef) return "the coefficients are required";
  for (int64_t i = 0; i < c.n_rows; ++i) {
    const SegRow& r = c.rows[i];
    if (r.numel < 0 || r.offset < 0 || r.offset > c.state_numel - r.numel)
      return seg(i) + " lies outside the flat state";
    if (c.op != kMadaDot &&
        (r.group < 0 || r.group >= c.num_groups || r.pindex < 0 || r.pindex >= c.num_params))
      return seg(i) + " has a bad group or parameter index";
    if (r.numel > 0 && (!r.grad || (c.op != kMadaDot && !r.param))) return seg(i) + " has a null address";
  }

  const uint32_t need = used_slots(c.op, c.variant);
  const bool q8 = c.state_dtype == kQ8;
  for (int b = 0; b < kMaxSlots; ++b) {
    if (!((need >> b) & 1u) || !q8) c.scales[b] = nullptr;
    if (!((need >> b) & 1u))
      c.state[b] = nullptr;
    else if (!c.state[b] || (q8 && !c.scales[b]))
      return "a state buffer this pass needs is missing";
  }
  if (q8) {
    if (c.state_numel % kQ8BlockElems) return "8-bit state needs a whole number of 256-element blocks";
    for (int64_t i = 0; i < c.n_rows; ++i)
      if (c.rows[i].offset % kQ8BlockElems) return seg(i) + " does not start on a 256-element block";
  }
  const bool tangents = c.op == kMadaDot || (c.op == kMadaStep && (c.variant & kTangents));
  if (!tangents) {
    c.tangents = nullptr;
  } else if (!c.tangents || c.tan_stride < c.state_numel) {
    return "this pass needs the tangent rows of the learned coefficients";
  }
  if (!tangents || c.tangent_dtype != kQ8) {
    c.tan_scales = nullptr;
  } else if (!c.tan_scales || c.tan_scale_stride < c.state_numel / kQ8BlockElems) {
    return "8-bit tangent rows need their block scales";
  } else if (c.tan_stride % kQ8BlockElems) {
    return "8-bit tangent rows need a row stride of whole 256-element blocks";
  }
  if (c.op == kMadaDot || c.param_round != kRoundKahan) {
    c.comp = nullptr;  // the dot pass writes no parameter
  } else if (!c.comp) {
    return "Kahan summation needs the compensation buffer";
  }
  if (c.op == kMadaDot && !c.dot_out) return "the dot pass needs dot_out";
  if (c.dot_out && !tangents) return "dot_out needs tangent rows";
  return "";
}

}  // namespace mada_abi
