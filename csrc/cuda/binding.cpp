// pybind11 module mada_fused._C_cuda. Pointers arrive in a packed call of
// ../abi.h (tensor.data_ptr() values), so the extension needs no libtorch.
// Importing it makes no CUDA call: the static runtime starts at the first
// launch or device query, so the module imports on machines with no GPU and no
// driver.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "abi_py.h"
#include "cuda/launch.h"

namespace py = pybind11;
namespace mc = mada_cuda;

namespace {

// One pass (../abi.h: Call), the same signature as _C_cpu.run. `alloc(n)`
// returns a float64 device tensor of n elements (torch's caching allocator on
// the current stream, so it is graph-capture safe); it is only called when a
// dot product is taken, for the per-block slots.
void run(const py::bytes& packed, const py::object& alloc) {
  const mc::Request r = mc::make_request(mada_abi::unpack(packed, "_C_cuda.run"));
  mc::Plan plan = mc::make_plan(r);
  py::object scratch;
  double* slots = nullptr;
  if (r.call.dot_out && plan.total_blocks > 0) {
    if (alloc.is_none()) throw py::value_error("_C_cuda.run: a dot product needs the scratch allocator");
    scratch = alloc(plan.total_blocks * r.n_learn);
    slots = reinterpret_cast<double*>(scratch.attr("data_ptr")().cast<uintptr_t>());
  }
  mc::execute(r, plan, slots);  // scratch outlives the enqueue; the allocator orders its reuse
}

// The launch layout run() would use (no CUDA call), for tests on machines with no GPU.
py::list plan_info(const py::bytes& packed) {
  const mc::Plan plan = mc::make_plan(mc::make_request(mada_abi::unpack(packed, "_C_cuda.plan_info")));
  py::list launches;
  for (size_t i = 0; i < plan.launches.size(); ++i) {
    const mc::Args& a = plan.launches[i];
    py::list vstart, aligned;
    for (int k = 0; k <= a.s.n; ++k) vstart.append(a.s.vstart[k]);
    for (int k = 0; k < a.s.n; ++k) aligned.append(bool((a.s.aligned[k / 32] >> (k % 32)) & 1u));
    py::dict d;
    d["blocks"] = plan.blocks[i];
    d["block_base"] = a.c.block_base;
    d["chunk"] = a.c.chunk;
    d["vstart"] = vstart;
    d["aligned"] = aligned;
    launches.append(d);
  }
  return launches;
}

}  // namespace

// The same binding serves the CPU build of these sources (cuda_on_cpu.h), under its own name.
#ifndef MADA_CUDA_MODULE
#define MADA_CUDA_MODULE _C_cuda
#endif

PYBIND11_MODULE(MADA_CUDA_MODULE, m) {
  m.doc() = "mada_fused CUDA kernels (raw device pointers in, no libtorch)";
  m.def("run", &run, py::arg("call"), py::arg("alloc") = py::none(),
        "One MADA / dot / AdaMod pass over a bucket's active segments");
  m.def("plan_info", &plan_info, py::arg("call"), "Launch layout of a call (no CUDA call)");
  m.def("abi", &mada_abi::report, "The call interface as compiled (csrc/abi.h): codes, sizes, offsets");
  m.def("built_archs", &mc::built_archs, "SM versions compiled in, e.g. [800, 900]");
  m.def("runtime_version", &mc::runtime_version, "CUDART_VERSION built against");
  m.def("driver_version", &mc::driver_version,
        "CUDA version the NVIDIA driver supports (cudaDriverGetVersion), 0 without a driver; no context made");
  m.def(
      "device_ok",
      [](int device) {
        std::string why;
        const bool ok = mc::device_ok(device, &why);
        return py::make_tuple(ok, why);
      },
      "(whether this build runs on the device, reason when not); makes CUDA calls");
  m.attr("MAX_SEGMENTS_PER_LAUNCH") = mc::kMaxSeg;
  m.attr("THREADS") = mc::kThreads;
}
