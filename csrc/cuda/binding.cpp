// pybind11 module mada_fused._C_cuda. Pointers arrive as Python ints
// (tensor.data_ptr()), so the extension needs no libtorch. Importing it makes no
// CUDA call: the static runtime starts at the first launch or device query, so
// the module imports on machines with no GPU and no driver.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cuda/launch.h"

namespace py = pybind11;
namespace mc = mada_cuda;

namespace {

using mc::Addrs;

// One backend call. `alloc(n)` returns a float64 device tensor of n elements
// (torch's caching allocator on the current stream, so it is graph-capture
// safe); it is only called when a dot product is taken, for the per-block slots.
void run(const std::vector<int64_t>& call, const Addrs& table, const Addrs& scalars,
         const Addrs& bufs, int64_t tan, int64_t tan_stride, uint32_t learn_mask,
         const std::vector<double>& consts, bool maximize, int64_t dot_out, py::object alloc) {
  const mc::Request r =
      mc::make_request(call, table, scalars, bufs, tan, tan_stride, learn_mask, consts, maximize, dot_out);
  mc::Plan plan = mc::make_plan(r);
  py::object scratch;
  double* slots = nullptr;
  if (r.dot_out && plan.total_blocks > 0) {
    scratch = alloc(plan.total_blocks * r.n_learn);
    slots = reinterpret_cast<double*>(scratch.attr("data_ptr")().cast<uintptr_t>());
  }
  mc::execute(r, plan, slots);  // scratch outlives the enqueue; the allocator orders its reuse
}

// The launch layout run() would use (no CUDA call), for tests on machines with no GPU.
py::list plan_info(const std::vector<int64_t>& call, const Addrs& table, const Addrs& scalars,
                   const Addrs& bufs, int64_t tan, int64_t tan_stride, uint32_t learn_mask) {
  const std::vector<double> consts(5, 0.0);
  const mc::Plan plan = mc::make_plan(
      mc::make_request(call, table, scalars, bufs, tan, tan_stride, learn_mask, consts, false, 0));
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

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "mada_fused CUDA kernels (raw device pointers in, no libtorch)";
  m.def("run", &run, "One MADA / dot / AdaMod pass over a bucket's active segments");
  m.def("plan_info", &plan_info, "Launch layout of a call (no CUDA call)");
  m.def("built_archs", &mc::built_archs, "SM versions compiled in, e.g. [800, 900]");
  m.def("runtime_version", &mc::runtime_version, "CUDART_VERSION built against");
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
