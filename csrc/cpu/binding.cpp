// mada_fused._C_cpu: the pybind11 face of the fused CPU passes.
//
// It takes one packed call of raw addresses (tensor.data_ptr()), element
// counts and codes (../abi.h), never a torch object, so the module links
// neither libtorch nor libc10 and one build serves every torch version.
// mada_fused/backends/native.py owns the tensor-side checks; ../abi_check.h
// checks what a bad call could turn into an out-of-bounds write; then this
// file releases the GIL and runs the kernel object for the CPU's instruction
// set.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../abi_py.h"
#include "cpu_calls.h"

// Written by build_support.py next to the objects; absent in a hand-made build.
#if __has_include("cpu_build_config.h")
#include "cpu_build_config.h"
#else
#define MADA_CPU_FLAGS "unknown (not built by build_support.py)"
#define MADA_CUDA_STATUS "unknown (not built by build_support.py)"
#endif

namespace py = pybind11;

namespace mada_cpu {
// One table per (instruction set, dtype); build_support.py builds the same list.
extern const KernelTable kernels_base_f32, kernels_base_f64, kernels_base_bf16, kernels_base_f16;
#if defined(MADA_HAVE_AVX2)
extern const KernelTable kernels_avx2_f32, kernels_avx2_bf16, kernels_avx2_f16;
#endif
}  // namespace mada_cpu

namespace {
using namespace mada_cpu;

bool cpu_has_avx2() {
#if defined(MADA_HAVE_AVX2)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// "avx2" or "base"; MADA_CPU_ISA=base forces the portable object (for tests
// and for bisecting a suspected vectorisation problem).
std::string g_isa = [] {
  const char* env = std::getenv("MADA_CPU_ISA");
  if (env && std::strcmp(env, "base") == 0) return std::string("base");
  return std::string(cpu_has_avx2() ? "avx2" : "base");
}();

const KernelTable& table_for(int dtype) {
  if (dtype < 0 || dtype >= kNumDtypes) throw py::value_error("unknown dtype code " + std::to_string(dtype));
#if defined(MADA_HAVE_AVX2)
  // float64 is the test oracle's dtype: the portable object is fast enough.
  if (g_isa == "avx2" && dtype != kF64) {
    const KernelTable* t[] = {&kernels_avx2_f32, nullptr, &kernels_avx2_bf16, &kernels_avx2_f16};
    return *t[dtype];
  }
#endif
  const KernelTable* t[] = {&kernels_base_f32, &kernels_base_f64, &kernels_base_bf16, &kernels_base_f16};
  return *t[dtype];
}

void set_isa(const std::string& isa) {
  if (isa != "base" && isa != "avx2") throw py::value_error("isa must be 'base' or 'avx2'");
  if (isa == "avx2" && !cpu_has_avx2()) throw py::value_error("this CPU (or build) has no AVX2 kernels");
  g_isa = isa;
}

template <class T>
const T* as_ptr(int64_t addr) {
  return reinterpret_cast<const T*>(static_cast<uintptr_t>(addr));
}

// One pass (../abi.h: Call). `alloc` is the CUDA extension's scratch
// allocator: the same signature for both, unused here.
void run(const py::bytes& packed, const py::object& /*alloc*/) {
  Pass p{};
  p.c = unpack(packed, "_C_cpu.run");
  p.num_threads = p.c.num_threads > 0 ? int(p.c.num_threads) : 1;
  for (int j = 0; j < kNumCoef; ++j)
    if ((p.c.learn_mask >> j) & 1u) p.learn[p.num_learn++] = j;
  const KernelTable& t = table_for(p.c.dtype);
  py::gil_scoped_release nogil;
  (p.c.op == kAdamodStep ? t.adamod : t.mada)(p);
}

void convert(int dtype, bool to_state, int64_t src, int64_t dst, int64_t n) {
  if (n < 0 || (n && (!src || !dst))) throw py::value_error("convert: bad buffers");
  const KernelTable& t = table_for(dtype);
  (to_state ? t.to_state : t.from_state)(as_ptr<void>(src), const_cast<void*>(as_ptr<void>(dst)), n);
}

py::dict build_config() {
  py::dict d;
  d["compiler"] = __VERSION__;
#ifdef _OPENMP
  d["openmp"] = _OPENMP;
  d["max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = 0;
  d["max_threads"] = 1;
#endif
  py::list isas;
  isas.append("base");
#if defined(MADA_HAVE_AVX2)
  isas.append("avx2");
#endif
  d["isas_built"] = isas;
  d["cpu_has_avx2"] = cpu_has_avx2();
  d["flags"] = MADA_CPU_FLAGS;
  d["cuda_status"] = MADA_CUDA_STATUS;  // whether the build made _C_cuda, and why not
  return d;
}
}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "Fused CPU passes of mada-fused (no libtorch: raw addresses in, nothing out).";
  m.def("run", &run, py::arg("call"), py::arg("alloc") = py::none(),
        "One MADA / dot / AdaMod pass over a bucket's active segments (alloc: unused on the CPU)");
  m.def("abi", &report, "The call interface as compiled (csrc/abi.h): codes, sizes, offsets");
  m.def("convert", &convert, py::arg("dtype"), py::arg("to_state"), py::arg("src"),
        py::arg("dst"), py::arg("n"), "Element conversion param <-> state dtype (for tests).");
  m.def("isa", [] { return g_isa; }, "The instruction set whose kernels run: 'avx2' or 'base'.");
  m.def("set_isa", &set_isa, py::arg("isa"));
  m.def("build_config", &build_config);
}
