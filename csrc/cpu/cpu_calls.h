// The plain-data interface between the pybind11 module (binding.cpp) and the
// ISA-specific kernel objects (kernels.cpp, compiled once per instruction set
// and parameter dtype). Nothing here depends on torch or Python: the module
// unpacks and checks the Call of ../abi.h and hands it on in a Pass.
#pragma once

#include <cstdint>

#include "../abi.h"

namespace mada_cpu {

using namespace mada_abi;

// A checked Call (../abi_check.h) and what the binding derives from it once.
struct Pass {
  Call c;
  int num_threads;       // >= 1
  int num_learn;         // tangent rows: the set bits of c.learn_mask
  int learn[kNumCoef];   // canonical coefficient index of tangent row r
};

// The entry points one kernel object exports for one parameter dtype.
struct KernelTable {
  void (*mada)(const Pass&);    // kMadaStep and kMadaDot
  void (*adamod)(const Pass&);  // kAdamodStep
  // Element conversions, exported so tests can check them exhaustively.
  void (*to_state)(const void* src, void* dst, int64_t n);
  void (*from_state)(const void* src, void* dst, int64_t n);
};

}  // namespace mada_cpu
