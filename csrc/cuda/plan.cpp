// Host half of a backend call, in plain C++ (no CUDA): check the call, then lay
// the active segments out in launches and chunks. Pure arithmetic, so the
// layout is testable on machines with no GPU (binding.cpp: plan_info).
#include <stdexcept>

#include "cuda/launch.h"

namespace mada_cuda {
namespace {

template <typename T>
T* ptr(int64_t p) { return reinterpret_cast<T*>(static_cast<uintptr_t>(p)); }

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

// call = (op, variant, dtype code, device index, stream handle)
// table = (address of the packed (n, 6) int64 segment table, n, bucket numel)
// scalars = addresses of (coef, lr, weight_decay, steps, grad_scale, found_inf); 0 = none
// consts: MADA (eps, mod_beta, lion_beta1, lion_beta2, vbar_detach) or
//         AdaMod (beta1, beta2, beta3, eps, unused)
Request make_request(const std::vector<int64_t>& call, const Addrs& table, const Addrs& scalars,
                     const Addrs& bufs, int64_t tan, int64_t tan_stride, uint32_t learn_mask,
                     const std::vector<double>& consts, bool maximize, int64_t dot_out) {
  if (call.size() != 5 || table.size() != 3 || scalars.size() != 6 ||
      bufs.size() != size_t(kBufs) || consts.size() != 5)
    throw std::invalid_argument("_C_cuda.run: wrong argument lengths");
  Request r;
  r.op = int(call[0]);
  r.variant = int(call[1]);
  r.dtype = int(call[2]);
  r.device = int(call[3]);
  r.stream = static_cast<uintptr_t>(call[4]);
  if (r.op < kMadaStep || r.op > kAdamodStep) throw std::invalid_argument("bad op");
  if (r.variant < 0 || r.variant >= kMadaVariants) throw std::invalid_argument("bad variant");
  if (r.dtype < kF32 || r.dtype > kF16) throw std::invalid_argument("bad dtype code");
  r.rows = ptr<const SegRow>(table[0]);
  r.n_rows = table[1];
  const int64_t numel = table[2];
  for (int64_t i = 0; i < r.n_rows; ++i) {
    const SegRow& row = r.rows[i];
    if (row.offset < 0 || row.numel < 0 || row.offset + row.numel > numel)
      throw std::invalid_argument("segment outside the bucket's state");
  }
  if (learn_mask >= (1u << kNumCoef)) throw std::invalid_argument("bad learn mask");
  r.n_learn = __builtin_popcount(learn_mask);
  const bool tangents = r.op == kMadaDot || (r.op == kMadaStep && (r.variant & kTangents));
  if (tangents && (!tan || !r.n_learn || tan_stride < numel))
    throw std::invalid_argument("this pass needs the tangent rows of the learned coefficients");
  if (tangents) {  // a learned coefficient's tangent is computed from its state
    const int needs[kNumCoef] = {0, 0, kHasBeta3, kHasVbar, 0, kHasLion};
    for (int j = 0; j < kNumCoef; ++j)
      if (((learn_mask >> j) & 1u) && r.op == kMadaStep && (r.variant & needs[j]) != needs[j])
        throw std::invalid_argument("a learned coefficient lacks its state");
  }
  if (r.op == kMadaDot && !dot_out) throw std::invalid_argument("the dot pass needs dot_out");
  if (dot_out && !tangents) throw std::invalid_argument("dot_out needs tangent rows");
  const unsigned need = r.op == kMadaDot ? 0u
                      : r.op == kAdamodStep ? adamod_buffers(r.variant & 1) : mada_buffers(r.variant);
  Common& c = r.c;
  for (int b = 0; b < kBufs; ++b) {
    c.buf[b] = ((need >> b) & 1u) ? ptr<void>(bufs[b]) : nullptr;
    if (((need >> b) & 1u) && !bufs[b]) throw std::invalid_argument("a state buffer this pass needs is missing");
  }
  c.coef = ptr<const double>(scalars[0]);
  c.lr = ptr<const double>(scalars[1]);
  c.wd = ptr<const double>(scalars[2]);
  c.steps = ptr<const double>(scalars[3]);
  c.grad_scale = ptr<const float>(scalars[4]);
  c.found_inf = ptr<const float>(scalars[5]);
  if ((r.op == kMadaStep && !c.coef) || (r.op != kMadaDot && (!c.lr || !c.wd || !c.steps)))
    throw std::invalid_argument("a per-step scalar this pass needs is missing");
  c.tan = tangents ? ptr<void>(tan) : nullptr;
  c.tan_stride = tan_stride;
  for (int i = 0; i < 5; ++i) c.k[i] = consts[i];
  c.learn_mask = learn_mask;
  c.maximize = maximize ? 1 : 0;
  r.dot_out = ptr<double>(dot_out);
  return r;
}

Plan make_plan(const Request& r) {
  const int ssize = r.dtype == kF64 ? 8 : 4;
  const bool update = r.op != kMadaDot;
  const bool tangents = r.c.tan != nullptr;  // make_request keeps it only for passes that use it
  const bool tan_rows_ok = r.n_learn <= 1 || (r.c.tan_stride * ssize) % 16 == 0;

  int64_t total = 0;
  for (int64_t i = 0; i < r.n_rows; ++i) total += r.rows[i].numel;
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
  for (int64_t i = 0; i < r.n_rows; ++i) {
    const SegRow& row = r.rows[i];
    if (row.numel <= 0) continue;  // nothing to step
    if (a && a->s.n == kMaxSeg) close();
    if (!a) {
      plan.launches.emplace_back();
      a = &plan.launches.back();
      a->c = r.c;
      a->c.chunk = chunk;
      a->c.dot = r.dot_out != nullptr;
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
    for (int b = 0; b < kBufs && update; ++b)
      if (r.c.buf[b]) ok = ok && aligned16(static_cast<const char*>(r.c.buf[b]) + row.offset * ssize);
    if (tangents)
      ok = ok && tan_rows_ok && aligned16(static_cast<const char*>(r.c.tan) + row.offset * ssize);
    if (k % 32 == 0) a->s.aligned[k / 32] = 0;
    if (ok) a->s.aligned[k / 32] |= 1u << (k % 32);
    vpos += (row.numel + kPad - 1) / kPad * kPad;
  }
  close();
  return plan;
}

}  // namespace mada_cuda
