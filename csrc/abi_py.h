// The pybind11 side of abi.h, shared by both extensions' modules: reading a
// packed Call, and ext.abi(), what abi.h says as the compiler laid it out.
// tests/test_abi.py compares the latter with the Python mirror
// (mada_fused/backends/abi.py), so a change on one side fails there instead of
// as a wild memory access.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstring>
#include <string>
#include <utility>

#include "abi.h"
#include "abi_check.h"

namespace mada_abi {

// The checked Call in `packed` (the bytes of backends/abi.py's pack_call);
// ValueError when it is malformed or fails check_call.
inline Call unpack(const pybind11::bytes& packed, const char* who) {
  char* data = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(packed.ptr(), &data, &size) != 0) throw pybind11::error_already_set();
  if (size != Py_ssize_t(sizeof(Call)))
    throw pybind11::value_error(std::string(who) + ": a call is " + std::to_string(sizeof(Call)) +
                                " bytes, got " + std::to_string(size));
  Call c;
  std::memcpy(&c, data, sizeof c);
  const std::string why = check_call(c);
  if (!why.empty()) throw pybind11::value_error(std::string(who) + ": " + why);
  return c;
}

// name -> (offset, size) of a struct's fields.
#define MADA_ABI_FIELD(S, f) std::make_pair(#f, std::make_pair(offsetof(S, f), sizeof(S::f)))

template <class... F>
pybind11::dict layout(size_t size, F... fields) {
  pybind11::dict f;
  ((f[fields.first] = pybind11::make_tuple(fields.second.first, fields.second.second)), ...);
  pybind11::dict d;
  d["size"] = size;
  d["fields"] = f;
  return d;
}

template <class... P>
pybind11::dict codes(P... pairs) {
  pybind11::dict d;
  ((d[pairs.first] = int64_t(pairs.second)), ...);
  return d;
}

inline pybind11::dict report() {
  using std::make_pair;
  pybind11::dict d;
  d["version"] = kVersion;
  d["dtypes"] = codes(make_pair("float32", kF32), make_pair("float64", kF64), make_pair("bfloat16", kBF16),
                      make_pair("float16", kF16));
  d["param_rounds"] = codes(make_pair("nearest", kRoundNearest), make_pair("stochastic", kRoundStochastic),
                            make_pair("kahan", kRoundKahan));
  d["ops"] = codes(make_pair("mada_step", kMadaStep), make_pair("mada_dot", kMadaDot),
                   make_pair("adamod_step", kAdamodStep));
  d["mada_bits"] = codes(make_pair("beta3", kHasBeta3), make_pair("vbar", kHasVbar), make_pair("lion", kHasLion),
                         make_pair("mod", kHasMod), make_pair("tangents", kTangents));
  d["adamod_bits"] = codes(make_pair("diff", kDiff));
  d["mada_slots"] = codes(make_pair("m", kM), make_pair("v", kV), make_pair("n", kN), make_pair("g_prev", kGPrev),
                          make_pair("l", kL), make_pair("vb", kVb), make_pair("s", kS));
  d["adamod_slots"] = codes(make_pair("m", kAm), make_pair("v", kAv), make_pair("s", kAs),
                            make_pair("g_prev", kAgPrev));
  d["mada_consts"] = codes(make_pair("eps", kEps), make_pair("mod_beta", kModBeta),
                           make_pair("lion_beta1", kLionBeta1), make_pair("lion_beta2", kLionBeta2));
  d["adamod_consts"] = codes(make_pair("beta1", kAdamodBeta1), make_pair("beta2", kAdamodBeta2), make_pair("beta3", kAdamodBeta3),
                             make_pair("eps", kAdamodEps));
  d["num_coef"] = kNumCoef;
  d["state_8bit"] = kQ8;
  d["seg_row"] = layout(sizeof(SegRow), MADA_ABI_FIELD(SegRow, param), MADA_ABI_FIELD(SegRow, grad),
                        MADA_ABI_FIELD(SegRow, offset), MADA_ABI_FIELD(SegRow, numel),
                        MADA_ABI_FIELD(SegRow, group), MADA_ABI_FIELD(SegRow, pindex));
  d["call"] = layout(
      sizeof(Call), MADA_ABI_FIELD(Call, op), MADA_ABI_FIELD(Call, variant), MADA_ABI_FIELD(Call, dtype),
      MADA_ABI_FIELD(Call, learn_mask), MADA_ABI_FIELD(Call, maximize), MADA_ABI_FIELD(Call, vbar_detach),
      MADA_ABI_FIELD(Call, state_dtype), MADA_ABI_FIELD(Call, sr_seed),
      MADA_ABI_FIELD(Call, param_round), MADA_ABI_FIELD(Call, tangent_dtype),
      MADA_ABI_FIELD(Call, device), MADA_ABI_FIELD(Call, state_numel), MADA_ABI_FIELD(Call, num_groups),
      MADA_ABI_FIELD(Call, num_params), MADA_ABI_FIELD(Call, lr), MADA_ABI_FIELD(Call, wd),
      MADA_ABI_FIELD(Call, steps), MADA_ABI_FIELD(Call, state), MADA_ABI_FIELD(Call, comp),
      MADA_ABI_FIELD(Call, scales),
      MADA_ABI_FIELD(Call, tangents),
      MADA_ABI_FIELD(Call, tan_stride), MADA_ABI_FIELD(Call, tan_scales), MADA_ABI_FIELD(Call, tan_scale_stride),
      MADA_ABI_FIELD(Call, consts), MADA_ABI_FIELD(Call, rows),
      MADA_ABI_FIELD(Call, n_rows), MADA_ABI_FIELD(Call, coef), MADA_ABI_FIELD(Call, grad_scale),
      MADA_ABI_FIELD(Call, found_inf), MADA_ABI_FIELD(Call, dot_out), MADA_ABI_FIELD(Call, stream),
      MADA_ABI_FIELD(Call, num_threads));
  return d;
}

#undef MADA_ABI_FIELD

}  // namespace mada_abi
