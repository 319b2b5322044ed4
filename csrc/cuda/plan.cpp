// Host half of a backend call, in plain C++ (no CUDA): from a checked call
// (../abi_check.h), lay the active segments out in launches and chunks. Pure
// arithmetic, so the layout is testable on machines with no GPU (binding.cpp:
// plan_info).
#include <stdexcept>

#include "cuda/launch.h"

namespace mada_cuda {
namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Workload-only chunk size (never the SM count), so the block partition and
// with it the summation order are the same on every GPU: aim at <= 4096 blocks
// of 2K to 64K elements.
int64_t chunk_for(int64_t total) {
  int64_t chunk = 2048;
  while (chunk < 65536 && (total + chunk - 1) / chunk > 4096) chunk *= 2;
  return chunk;
}

}  // namespace

Request make_request(const Call& checked) {
  if (checked.tangent_dtype == kQ8)
    throw std::invalid_argument("the CUDA kernels do not store 8-bit tangent rows; "
                                "tangent_dtype='8bit' runs on the cpu, triton and reference backends");
  if (checked.state_dtype == kQ8)
    throw std::invalid_argument("the CUDA kernels do not store 8-bit state; "
                                "state_dtype='8bit' runs on the cpu, triton and reference backends");
  Request r;
  r.call = checked;
  r.n_learn = num_learned(checked.learn_mask);
  Common& c = r.c;
  c = Common{};
  for (int b = 0; b < kMaxSlots; ++b) c.buf[b] = checked.state[b];
  c.coef = checked.coef;
  c.lr = checked.lr;
  c.wd = checked.wd;
  c.steps = checked.steps;
  c.grad_scale = checked.grad_scale;
  c.found_inf = checked.found_inf;
  c.tan = checked.tangents;
  c.tan_stride = checked.tan_stride;
  for (int i = 0; i < kNumConsts; ++i) c.k[i] = checked.consts[i];
  c.learn_mask = checked.learn_mask;
  c.maximize = checked.maximize != 0;
  c.vbar_detach = checked.vbar_detach != 0;
  c.sr_seed = checked.sr_seed;
  c.comp = checked.comp;
  return r;
}

Plan make_plan(const Request& r) {
  const Call& call = r.call;
  const int ssize = call.dtype == kF64 ? 8 : 4;  // compute dtype
  const int bsize = call.state_dtype == kBF16 ? 2 : ssize;  // state buffers
  const int tsize = call.tangent_dtype == kBF16 ? 2 : ssize;  // tangent rows
  const bool update = call.op != kMadaDot;
  const bool tangents = r.c.tan != nullptr;  // the check keeps it only for passes that use it
  const bool tan_rows_ok = r.n_learn <= 1 || (r.c.tan_stride * tsize) % 16 == 0;

  int64_t total = 0;
  for (int64_t i = 0; i < call.n_rows; ++i) total += call.rows[i].numel;
  Plan plan;
  const int64_t chunk = chunk_for(total);
  Args* a = nullptr;
  int64_t vpos = 0;
  auto close = [&]() {
    if (!a) return;
    a->s.vstart[a->s.n] = vpos;
    const int64_t blocks = (vpos + chunk - 1) / chunk;
    if (blocks > 0x7fffffff) throw std::invalid_argument("bucket too large for one grid");
    a->c.block_base = plan.total_blocks;
    plan.blocks.push_back(blocks);
    plan.total_blocks += blocks;
    a = nullptr;
  };
  for (int64_t i = 0; i < call.n_rows; ++i) {
    const SegRow& row = call.rows[i];
    if (row.numel <= 0) continue;  // nothing to step
    if (a && a->s.n == kMaxSeg) close();
    if (!a) {
      plan.launches.emplace_back();
      a = &plan.launches.back();
      a->c = r.c;
      a->c.chunk = chunk;
      a->c.dot = call.dot_out != nullptr;
      a->s.n = 0;
      vpos = 0;
    }
    const int k = a->s.n++;
    a->s.vstart[k] = vpos;
    a->s.numel[k] = row.numel;
    a->s.off[k] = row.offset;
    a->s.param[k] = reinterpret_cast<void*>(row.param);
    a->s.grad[k] = reinterpret_cast<const void*>(row.grad);
    a->s.group[k] = int32_t(row.group);
    a->s.pidx[k] = int32_t(row.pindex);
    // Vector path only when every stream this pass touches is 16 B aligned at
    // the segment start; unaligned segments take the scalar path.
    bool ok = aligned16(a->s.grad[k]) && (!update || aligned16(a->s.param[k]));
    for (int b = 0; b < kMaxSlots && update; ++b)
      if (r.c.buf[b]) ok = ok && aligned16(static_cast<const char*>(r.c.buf[b]) + row.offset * bsize);
    if (r.c.comp && update) ok = ok && aligned16(static_cast<const char*>(r.c.comp) + row.offset * 2);
    if (tangents)
      ok = ok && tan_rows_ok && aligned16(static_cast<const char*>(r.c.tan) + row.offset * tsize);
    if (k % 32 == 0) a->s.aligned[k / 32] = 0;
    if (ok) a->s.aligned[k / 32] |= 1u << (k % 32);
    vpos += (row.numel + kPad - 1) / kPad * kPad;
  }
  close();
  return plan;
}

}  // namespace mada_cuda
