// mada_fused._C_cpu: the pybind11 face of the fused CPU passes.
//
// It takes raw addresses (tensor.data_ptr()), element counts and dtype codes,
// never a torch object, so the module links neither libtorch nor libc10 and one
// build serves every torch version. mada_fused/backends/cpu.py owns the
// tensor-side checks; this file checks what a bad address table could turn
// into an out-of-bounds write, then releases the GIL and runs the kernel
// object for the CPU's instruction set.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_calls.h"

// Written by setup.py next to the objects; absent in a hand-made build.
#if __has_include("cpu_build_config.h")
#include "cpu_build_config.h"
#else
#define MADA_CPU_FLAGS "unknown (not built by setup.py)"
#define MADA_CUDA_STATUS "unknown (not built by setup.py)"
#endif

namespace py = pybind11;

namespace mada_cpu {
// One table per (instruction set, dtype); setup.py builds the same list.
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

// common = (table, nseg, dtype, state_numel, num_groups, num_steps,
//           lr, weight_decay, steps, grad_scale, found_inf, num_threads),
// as built by mada_fused/_segments.py.
Common make_common(const std::vector<int64_t>& a, int* dtype) {
  if (a.size() != 12) throw py::value_error("common must hold 12 integers");
  Common c{};
  c.seg = as_ptr<SegRow>(a[0]);
  c.nseg = a[1];
  *dtype = int(a[2]);
  c.state_numel = a[3];
  const int64_t groups = a[4], steps = a[5];
  c.lr = as_ptr<double>(a[6]);
  c.wd = as_ptr<double>(a[7]);
  c.steps = as_ptr<double>(a[8]);
  c.grad_scale = as_ptr<float>(a[9]);
  c.found_inf = as_ptr<float>(a[10]);
  c.num_threads = int(a[11]) > 0 ? int(a[11]) : 1;
  if (c.nseg < 0 || (c.nseg > 0 && !c.seg)) throw py::value_error("bad segment table");
  if (!c.lr || !c.wd || !c.steps) throw py::value_error("lr, weight_decay and steps are required");
  for (int64_t i = 0; i < c.nseg; ++i) {
    const SegRow& r = c.seg[i];
    if (r.numel < 0 || r.offset < 0 || r.offset > c.state_numel - r.numel)
      throw py::value_error("segment " + std::to_string(i) + " lies outside the flat state");
    if (r.group < 0 || r.group >= groups || r.pindex < 0 || r.pindex >= steps)
      throw py::value_error("segment " + std::to_string(i) + " has a bad group or parameter index");
    if (r.numel > 0 && (!r.param || !r.grad))
      throw py::value_error("segment " + std::to_string(i) + " has a null address");
  }
  return c;
}

template <size_t N>
void fill_state(void* (&dst)[N], const std::vector<int64_t>& src, const char* what) {
  if (src.size() != N) throw py::value_error(std::string(what) + ": wrong number of state addresses");
  for (size_t i = 0; i < N; ++i) dst[i] = reinterpret_cast<void*>(static_cast<uintptr_t>(src[i]));
}

void mada(const std::vector<int64_t>& common, const std::vector<int64_t>& state,
          int64_t tangents, int64_t tan_stride, const std::vector<int>& learn, int64_t dot_out,
          bool dot_is_f64, bool step, int64_t coef, const std::vector<double>& consts,
          bool vbar_detach, bool maximize) {
  MadaCall c{};
  int dtype = 0;
  c.c = make_common(common, &dtype);
  fill_state(c.state, state, "mada");
  if (!c.state[kM] || !c.state[kV]) throw py::value_error("mada: m and v are required");
  if (!c.state[kN] != !c.state[kGPrev]) throw py::value_error("mada: n and g_prev come together");
  if (learn.size() > 6) throw py::value_error("mada: at most 6 learned coefficients");
  // A learned coefficient needs its state: its tangent is computed from it.
  const void* needs[6] = {c.state[kM], c.state[kM], c.state[kN], c.state[kVb], c.state[kM], c.state[kL]};
  for (size_t j = 0; j < learn.size(); ++j) {
    if (learn[j] < 0 || learn[j] > 5 || (j && learn[j] <= learn[j - 1]))
      throw py::value_error("mada: learn must be increasing coefficient indices");
    if (!needs[learn[j]]) throw py::value_error("mada: a learned coefficient lacks its state");
    c.learn[j] = learn[j];
  }
  c.num_learn = int(learn.size());
  c.tangents = reinterpret_cast<void*>(static_cast<uintptr_t>(tangents));
  c.tan_stride = tan_stride;
  if (c.num_learn && (!c.tangents || tan_stride < c.c.state_numel))
    throw py::value_error("mada: learned coefficients need the tangent rows");
  c.dot_out = reinterpret_cast<void*>(static_cast<uintptr_t>(dot_out));
  c.dot_is_f64 = dot_is_f64;
  if (c.dot_out && !c.num_learn) throw py::value_error("mada: partial sums need learned coefficients");
  c.step = step;
  if (!step && !c.dot_out) throw py::value_error("mada: a dot-only pass needs dot_out");
  c.coef = as_ptr<double>(coef);
  if (!c.coef) throw py::value_error("mada: coef is required");
  if (consts.size() != 4) throw py::value_error("mada: consts = (eps, mod_beta, lion_beta1, lion_beta2)");
  c.eps = consts[0];
  c.mod_beta = consts[1];
  c.lion_beta1 = consts[2];
  c.lion_beta2 = consts[3];
  c.vbar_detach = vbar_detach;
  c.maximize = maximize;
  const KernelTable& t = table_for(dtype);
  py::gil_scoped_release nogil;
  t.mada(c);
}

void adamod(const std::vector<int64_t>& common, const std::vector<int64_t>& state,
            const std::vector<double>& consts) {
  AdamodCall c{};
  int dtype = 0;
  c.c = make_common(common, &dtype);
  fill_state(c.state, state, "adamod");
  if (!c.state[kAm] || !c.state[kAv] || !c.state[kAs]) throw py::value_error("adamod: m, v and s are required");
  if (consts.size() != 4) throw py::value_error("adamod: consts = (beta1, beta2, beta3, eps)");
  c.beta1 = consts[0];
  c.beta2 = consts[1];
  c.beta3 = consts[2];
  c.eps = consts[3];
  const KernelTable& t = table_for(dtype);
  py::gil_scoped_release nogil;
  t.adamod(c);
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
  d["cuda_status"] = MADA_CUDA_STATUS;  // whether setup.py built _C_cuda, and why not
  return d;
}
}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "Fused CPU passes of mada-fused (no libtorch: raw addresses in, nothing out).";
  m.def("mada", &mada, py::arg("common"), py::arg("state"), py::arg("tangents"),
        py::arg("tan_stride"), py::arg("learn"), py::arg("dot_out"), py::arg("dot_is_f64"),
        py::arg("step"), py::arg("coef"), py::arg("consts"), py::arg("vbar_detach"),
        py::arg("maximize"));
  m.def("adamod", &adamod, py::arg("common"), py::arg("state"), py::arg("consts"));
  m.def("convert", &convert, py::arg("dtype"), py::arg("to_state"), py::arg("src"),
        py::arg("dst"), py::arg("n"), "Element conversion param <-> state dtype (for tests).");
  m.def("isa", [] { return g_isa; }, "The instruction set whose kernels run: 'avx2' or 'base'.");
  m.def("set_isa", &set_isa, py::arg("isa"));
  m.def("build_config", &build_config);
}
