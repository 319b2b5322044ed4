// Runs the CUDA backend's planner, launcher and kernels (csrc/cuda, compiled as
// plain C++ through cuda_on_cpu.h) on host memory and checks every buffer
// against a straightforward per-element loop over csrc/mada_math.h. No Python,
// so the same binary runs under AddressSanitizer + UBSan and ThreadSanitizer.
//
//   cuda_on_cpu_driver [--big] [--plant overrun|misaligned|no-sync]
//   cuda_on_cpu_driver --convert IN OUT   float32s in, their bf16 then fp16 bits out
//
// Params, state and tangent rows must match bit for bit (same math, same
// types: only the memory schedule differs; 8-bit codes and scales too, the loop
// decoding, stepping and encoding each block once); a hyper-gradient to 1e-12 of its
// terms (the kernels sum in a fixed tree, the loop in element order). Exit 0
// when every check passes. --plant breaks one thing on purpose for the
// sanitizer self-check (.ci/cuda_on_cpu_sanitize.sh); --big adds a 1M case.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "abi_check.h"
#include "cuda/cuda_api.h"
#include "cuda/launch.h"
#include "mada_math.h"
#include "driver_util.h"

namespace mc = mada_cuda;

namespace {

std::string g_plant;  // --plant
int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// ---- One bucket in host memory, as the Python backend would lay it out ----

struct Seg {
  int64_t numel;
  int pmis = 0, gmis = 0;  // param / grad start this many elements past a 16 B boundary
  int smis = 0;            // state offset this many elements past a multiple of 4
  int group = 0;
};

struct Config {
  int op = mc::kMadaStep;
  int variant = 0;
  int device = 0;
  uint32_t learn = 0;
  bool dot = false, scale = false, found_inf = false, maximize = false;
  double eps = 1e-8, mod_beta = 0.99, lion_b1 = 0.9, lion_b2 = 0.99;
  bool vbar_detach = false;
  double beta3 = 0.999;  // AdaMod's
  bool q8 = false;       // 8-bit state (fp32 compute only)
  bool q8_rows = false;  // and 8-bit tangent rows
};

// 8-bit state's map of slot k (docs/spec.md 5.4): E5M3 for v, vb, s (AdaMod's v, s).
bool q8_signed(const Config& cfg, int k) {
  return cfg.op == mc::kAdamodStep ? !(k == mc::kAv || k == mc::kAs) : !(k == mc::kV || k == mc::kVb || k == mc::kS);
}

template <typename P>
struct Bucket {
  using S = state_t<P>;
  std::vector<Seg> segs;
  std::vector<int64_t> offset;
  int64_t state_numel = 0, tan_stride = 0;
  std::vector<Buf<P>> param, grad;  // per segment: pmis + numel + kGuard elements
  Buf<S> state[mc::kMaxSlots], tan;
  // 8-bit state (rows): the codes and block scales; `state` (`tan`) is the decoding scratch of reference().
  bool q8, q8_rows;
  Buf<uint8_t> code[mc::kMaxSlots], tcode;
  Buf<float> scale[mc::kMaxSlots], tscale;
  int64_t tan_scale_stride = 0;
  std::vector<double> coef{0.9, 0.999, 0.3, 0.6, 0.7, 0.8}, lr{1e-2, 3e-3}, wd{0.0, 0.1}, steps;
  float grad_scale = 512.0f, found_inf = 1.0f;
  std::vector<double> dot_out;
  static constexpr int kGuard = 3;  // elements after each segment that nothing may touch

  Bucket(std::vector<Seg> s, int n_learn, uint64_t seed, const Config& cfg = {})
      : segs(std::move(s)), q8(cfg.q8), q8_rows(cfg.q8_rows) {
    Rng rng(seed);
    const int64_t block = mc::kQ8BlockElems;
    for (const Seg& g : segs) {
      state_numel = q8 ? (state_numel + block - 1) / block * block : (state_numel + 3) / 4 * 4 + g.smis;
      offset.push_back(state_numel);
      state_numel += g.numel;
      param.emplace_back(g.pmis + g.numel + kGuard);
      grad.emplace_back(g.gmis + g.numel + kGuard);
      fill(param.back(), rng, -1.0, 1.0);
      fill(grad.back(), rng, -1.0, 1.0);
      steps.push_back(double(1 + rng.below(20)));
    }
    steps[0] = 1.0;  // the first step takes its own branches (d = 0)
    if (q8) state_numel = (state_numel + block - 1) / block * block;
    for (int b = 0; b < mc::kMaxSlots; ++b) {
      state[b] = Buf<S>(state_numel);
      // v, vb and s are non-negative by construction (b = 1, 5, 6; AdaMod's s is 2)
      const bool positive = b == 1 || b == 2 || b == 5 || b == 6;
      fill(state[b], rng, positive ? 0.0 : -0.1, 0.1);
      if (!q8) continue;
      code[b] = Buf<uint8_t>(state_numel);  // padding past a segment holds garbage nothing may touch
      for (uint8_t& x : code[b]) x = uint8_t(rng.below(256));
      scale[b] = Buf<float>(state_numel / block);
      for (size_t i = 0; i < segs.size(); ++i) encode(state[b].data(), code[b].data(), scale[b].data(), i, q8_signed(cfg, b));
    }
    // 8-bit rows: a stride of whole blocks, their scales' one block longer than needed.
    tan_stride = q8_rows ? state_numel : state_numel + (state_numel % 4 ? 4 - state_numel % 4 : 0);
    tan = Buf<S>(size_t(n_learn) * size_t(tan_stride));
    fill(tan, rng, -1.0, 1.0);
    if (q8_rows) {
      tan_scale_stride = state_numel / block + 1;
      tcode = Buf<uint8_t>(tan.size());
      for (uint8_t& x : tcode) x = uint8_t(rng.below(256));
      tscale = Buf<float>(size_t(n_learn) * size_t(tan_scale_stride), 1.0f);
      rows(false);
    }
    dot_out.assign(size_t(n_learn), 0.25);
  }
  // Segment s's values x (a state buffer or a tangent row, in flat state order) as codes
  // and the scales of its blocks, block by block over its elements (docs/spec.md 5.4).
  void encode(const S* x, uint8_t* code, float* scale, size_t s, bool sgn) {
    const int64_t block = mc::kQ8BlockElems;
    for (int64_t lo = 0; lo < segs[s].numel; lo += block) {
      const int64_t e0 = offset[s] + lo, n = std::min(block, segs[s].numel - lo);
      float amax = 0.0f;
      bool finite = true;
      for (int64_t j = 0; j < n; ++j) {
        amax = std::max(amax, std::fabs(float(x[e0 + j])));
        finite = finite && std::isfinite(float(x[e0 + j]));
      }
      const float sc = mada::q8_scale(amax, finite);
      scale[e0 / block] = sc;
      for (int64_t j = 0; j < n; ++j) code[e0 + j] = uint8_t(mada::q8_encode(float(x[e0 + j]), sc, sgn));
    }
  }
  void decode(S* x, const uint8_t* code, const float* scale, bool sgn) {
    for (int64_t e = 0; e < state_numel; ++e) x[e] = S(mada::q8_decode(code[e], scale[e / mc::kQ8BlockElems], sgn));
  }
  void decode(int b, bool sgn) { decode(state[b].data(), code[b].data(), scale[b].data(), sgn); }
  void encode(int b, bool sgn) {
    for (size_t s = 0; s < segs.size(); ++s) encode(state[b].data(), code[b].data(), scale[b].data(), s, sgn);
  }
  // Every 8-bit tangent row (signed codes) decoded into `tan`, or encoded from it.
  void rows(bool decoding) {
    for (size_t r = 0; r < tan.size() / size_t(tan_stride); ++r) {
      S* x = tan.data() + r * tan_stride;
      float* sc = tscale.data() + r * tan_scale_stride;
      if (decoding) decode(x, tcode.data() + r * tan_stride, sc, true);
      else
        for (size_t s = 0; s < segs.size(); ++s) encode(x, tcode.data() + r * tan_stride, sc, s, true);
    }
  }
  P* param_at(size_t s) { return param[s].data() + segs[s].pmis; }
  P* grad_at(size_t s) { return grad[s].data() + segs[s].gmis; }
};

// ---- The call, as the Python backend makes it ----

template <typename P>
void run_kernels(Bucket<P>& b, const Config& cfg, mc::Plan* plan_out = nullptr) {
  std::vector<mc::SegRow> rows;
  for (size_t s = 0; s < b.segs.size(); ++s)
    rows.push_back({addr(b.param_at(s)), addr(b.grad_at(s)), b.offset[s], b.segs[s].numel,
                    b.segs[s].group, int64_t(s)});
  mc::Call call{};
  call.op = cfg.op;
  call.variant = uint32_t(cfg.variant);
  call.dtype = dtype_code<P>();
  call.state_dtype = cfg.q8 ? mc::kQ8 : call.dtype == mc::kF64 ? mc::kF64 : mc::kF32;
  call.tangent_dtype = cfg.q8_rows ? mc::kQ8 : call.dtype == mc::kF64 ? mc::kF64 : mc::kF32;
  call.learn_mask = cfg.learn;
  call.maximize = cfg.maximize;
  call.vbar_detach = cfg.vbar_detach;
  call.device = cfg.device;
  call.state_numel = b.state_numel;
  call.num_groups = int64_t(b.lr.size());
  call.num_params = int64_t(b.steps.size());
  call.lr = b.lr.data();
  call.wd = b.wd.data();
  call.steps = b.steps.data();
  for (int k = 0; k < mc::kMaxSlots; ++k) {
    call.state[k] = b.q8 ? static_cast<void*>(b.code[k].data()) : b.state[k].data();
    call.scales[k] = b.q8 ? b.scale[k].data() : nullptr;
  }
  call.tangents = !cfg.learn ? nullptr : b.q8_rows ? static_cast<void*>(b.tcode.data()) : b.tan.data();
  call.tan_stride = b.tan_stride;
  call.tan_scales = b.q8_rows ? b.tscale.data() : nullptr;
  call.tan_scale_stride = b.tan_scale_stride;
  const double mada[] = {cfg.eps, cfg.mod_beta, cfg.lion_b1, cfg.lion_b2};
  const double adamod[] = {b.coef[0], b.coef[1], cfg.beta3, cfg.eps};
  std::memcpy(call.consts, cfg.op == mc::kAdamodStep ? adamod : mada, sizeof call.consts);
  call.rows = rows.data();
  call.n_rows = int64_t(rows.size());
  call.coef = b.coef.data();
  call.grad_scale = cfg.scale ? &b.grad_scale : nullptr;
  call.found_inf = cfg.found_inf ? &b.found_inf : nullptr;
  call.dot_out = cfg.dot ? b.dot_out.data() : nullptr;
  const std::string why = mada_abi::check_call(call);
  if (!why.empty()) throw std::invalid_argument(why);
  const mc::Request r = mc::make_request(call);
  mc::Plan plan = mc::make_plan(r);
  if (g_plant == "overrun") {  // the last segment one element longer than its state
    mc::SegTable& t = plan.launches.back().s;
    t.numel[t.n - 1] += 1;
  }
  if (g_plant == "misaligned")  // vector path for every segment, aligned or not
    for (mc::Args& a : plan.launches)
      for (uint32_t& w : a.s.aligned) w = ~0u;
  std::vector<double> slots(size_t(plan.total_blocks) * size_t(r.n_learn), std::nan(""));
  mc::execute(r, plan, slots.data());
  if (plan_out) *plan_out = plan;
}

// ---- The same step, one element at a time ----
// With 8-bit state: decoded, stepped as fp32 state, and each block encoded once
// from its new values (docs/spec.md 5.4).

template <typename P>
void reference(Bucket<P>& b, const Config& cfg) {
  using S = typename Bucket<P>::S;
  if (cfg.found_inf) return;
  const unsigned used = cfg.op == mc::kAdamodStep ? mc::adamod_slots(cfg.variant) : cfg.op == mc::kMadaStep ? mc::mada_slots(cfg.variant) : 0u;
  if (b.q8)
    for (int k = 0; k < mc::kMaxSlots; ++k)
      if ((used >> k) & 1u) b.decode(k, q8_signed(cfg, k));
  if (b.q8_rows) b.rows(true);
  const int n_learn = __builtin_popcount(cfg.learn);
  std::vector<double> dot(size_t(n_learn), 0.0);
  const bool update = cfg.op != mc::kMadaDot;
  const bool tangents = cfg.op == mc::kMadaStep && (cfg.variant & mc::kTangents);
  const int V = cfg.variant;
  for (size_t s = 0; s < b.segs.size(); ++s) {
    const Seg& sg = b.segs[s];
    const double lr = b.lr[sg.group], wd = b.wd[sg.group], t = b.steps[s];
    const mada::MadaConst mk{cfg.eps, cfg.mod_beta, cfg.lion_b1, cfg.lion_b2, cfg.vbar_detach};
    const auto ms = mada::make_mada_scalars<S>(b.coef.data(), lr, wd, t, mk);
    const auto as = mada::make_adamod_scalars<S>(b.coef[0], b.coef[1], cfg.beta3, cfg.eps, lr, wd, t);
    for (int64_t i = 0; i < sg.numel; ++i) {
      const int64_t e = b.offset[s] + i;
      S g = to_state(b.grad_at(s)[i]);
      if (cfg.scale) g = g / S(b.grad_scale);
      if (cfg.maximize) g = -g;
      for (int j = 0, r = 0; j < mada::kNumCoef; ++j)
        if ((cfg.learn >> j) & 1u) {
          if (cfg.dot) dot[r] = std::fma(double(g), double(b.tan[r * b.tan_stride + e]), dot[r]);
          ++r;
        }
      if (!update) continue;
      S* st[mc::kMaxSlots];
      for (int k = 0; k < mc::kMaxSlots; ++k) st[k] = &b.state[k][e];
      const S theta = to_state(b.param_at(s)[i]);
      S out, tq[mada::kNumCoef] = {};
      if (cfg.op == mc::kAdamodStep) {
        out = V & 1 ? mada::adamod_element<S, true>(as, g, theta, *st[0], *st[1], *st[2], *st[3])
                    : mada::adamod_element<S, false>(as, g, theta, *st[0], *st[1], *st[2], *st[3]);
      } else {
        mada::MadaState<S> ms_{*st[0], *st[1], *st[2], *st[3], *st[4], *st[5], *st[6]};
        out = mada_element_dyn<S>(V, ms, g, theta, ms_, tq);
        const S vals[mc::kMaxSlots] = {ms_.m, ms_.v, ms_.n, ms_.g_prev, ms_.l, ms_.vb, ms_.s};
        for (int k = 0; k < mc::kMaxSlots; ++k)
          if ((used >> k) & 1u) *st[k] = vals[k];  // write back only what the variant owns
      }
      b.param_at(s)[i] = from_state<P>(out);
      if (tangents)
        for (int j = 0, r = 0; j < mada::kNumCoef; ++j)
          if ((cfg.learn >> j) & 1u) b.tan[r++ * b.tan_stride + e] = tq[j];
    }
  }
  if (cfg.dot)
    for (int r = 0; r < n_learn; ++r) b.dot_out[r] += dot[r];
  if (b.q8)
    for (int k = 0; k < mc::kMaxSlots; ++k)
      if ((used >> k) & 1u) b.encode(k, q8_signed(cfg, k));
  if (b.q8_rows && tangents) b.rows(false);
}

template <typename P>
void compare(const Bucket<P>& got, const Bucket<P>& want, const std::string& name) {
  bool same = true;
  for (size_t s = 0; s < got.segs.size(); ++s) same = same && bits_equal(got.param[s], want.param[s]);
  expect(same, name + ": params");
  for (int k = 0; k < mc::kMaxSlots; ++k) {
    const std::string slot = name + ": state " + std::to_string(k);
    if (got.q8)
      expect(bits_equal(got.code[k], want.code[k]) && bits_equal(got.scale[k], want.scale[k]), slot + " codes");
    else
      expect(bits_equal(got.state[k], want.state[k]), slot);
  }
  if (got.q8_rows)
    expect(bits_equal(got.tcode, want.tcode) && bits_equal(got.tscale, want.tscale), name + ": tangent row codes");
  else
    expect(bits_equal(got.tan, want.tan), name + ": tangent rows");
  for (size_t r = 0; r < got.dot_out.size(); ++r) {
    const double d = std::fabs(got.dot_out[r] - want.dot_out[r]);
    expect(d <= 1e-12 * (1.0 + std::fabs(want.dot_out[r])) * double(got.state_numel + 1),
           name + ": hyper-gradient " + std::to_string(r));
  }
}

template <typename P>
mc::Plan check_case(const std::string& name, const std::vector<Seg>& segs, const Config& cfg,
                    uint64_t seed = 1) {
  Bucket<P> got(segs, __builtin_popcount(cfg.learn), seed, cfg);
  Bucket<P> want = got;
  mc::Plan plan;
  const auto t0 = std::chrono::steady_clock::now();
  run_kernels(got, cfg, &plan);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  reference(want, cfg);
  compare(got, want, name);
  std::printf("%-34s %8lld elements %3zu launches %5lld blocks %8.1f ms\n", name.c_str(),
              (long long)got.state_numel, plan.launches.size(), (long long)plan.total_blocks, ms);
  return plan;
}

// Bit i of the plan: segment i takes the vector path.
bool vector_path(const mc::Plan& plan, int launch, int seg) {
  return (plan.launches[launch].s.aligned[seg / 32] >> (seg % 32)) & 1u;
}

// A bucket with every schedule boundary: a chunk (2048) spanning segments and a
// segment spanning chunks, vector tails (numel % units), misaligned params and
// grads, state offsets off 16 B, and a group with weight decay.
std::vector<Seg> mixed_layout() {
  return {{1}, {7}, {8, 0, 0, 0, 1}, {1000}, {5003, 0, 0, 0, 1}, {33, 1}, {64, 0, 3}, {17, 0, 0, 1},
          {2048}, {4096, 0, 0, 0, 1}, {3}, {1001}};
}

template <typename P>
void dtype_cases(const char* name) {
  const std::string n(name);
  Config all;  // every state, tangents, all six learned, a dot, AMP scale
  all.variant = 31;
  all.learn = 63;
  all.dot = all.scale = true;
  const mc::Plan plan = check_case<P>(n + " mada all+dot+scale", mixed_layout(), all);
  // Segment 3 (1000, aligned state offset 16) vector; 5 (param 1 element off) and 7 (state offset off) scalar.
  expect(vector_path(plan, 0, 3) && !vector_path(plan, 0, 5) && !vector_path(plan, 0, 7), n + ": vector/scalar split");
  Config some;  // a learn subset, maximize, no lion / vbar state
  some.variant = mc::kTangents | mc::kHasBeta3 | mc::kHasMod;
  some.learn = 0b000111;
  some.dot = some.maximize = true;
  some.vbar_detach = true;
  check_case<P>(n + " mada subset+maximize", mixed_layout(), some, 2);
  Config plain;
  check_case<P>(n + " mada plain", mixed_layout(), plain, 3);
  Config dot;
  dot.op = mc::kMadaDot;
  dot.learn = 0b100001;
  dot.dot = true;
  check_case<P>(n + " dot pass", mixed_layout(), dot, 4);
  Config adamod;
  adamod.op = mc::kAdamodStep;
  check_case<P>(n + " adamod", mixed_layout(), adamod, 5);
  adamod.variant = 1;
  adamod.scale = true;
  check_case<P>(n + " diffmod+scale", mixed_layout(), adamod, 6);
}

// 8-bit state: blocks past a segment's end (padding codes that nothing may
// touch), segments spanning chunks, misaligned params and grads (the scalar
// path); every MADA term with a dot, 8-bit tangent rows read by a dot and
// written, their dot pass, and (fp32 only) the clip alone and DiffMod.
template <typename P>
void q8_cases(const char* name, bool all_cases) {
  const std::string n(name);
  const std::vector<Seg> layout{{4097}, {300, 1}, {256, 0, 3}, {2600}};
  Config every;
  every.q8 = true;
  every.variant = 31;
  every.learn = 63;
  every.dot = every.scale = true;
  const mc::Plan plan = check_case<P>(n + " 8-bit mada all+dot+scale", layout, every, 11);
  expect(plan.launches[0].s.vstart[1] % mc::kQ8BlockElems == 0 && vector_path(plan, 0, 0) && !vector_path(plan, 0, 1),
         n + " 8-bit: blocks and the vector/scalar split");
  Config rows = every;  // 8-bit tangent rows: read for the dot, then written
  rows.q8_rows = true;
  rows.variant = mc::kTangents | mc::kHasBeta3 | mc::kHasLion;
  rows.learn = 0b100101;
  check_case<P>(n + " 8-bit rows mada subset+dot", layout, rows, 14);
  if (!all_cases) return;
  Config dot;
  dot.q8 = dot.q8_rows = true;
  dot.op = mc::kMadaDot;
  dot.learn = 0b110000;
  dot.dot = dot.scale = true;
  check_case<P>(n + " 8-bit rows dot pass", layout, dot, 15);
  Config clip;
  clip.q8 = true;
  clip.variant = mc::kHasMod;
  check_case<P>(n + " 8-bit mada clip", layout, clip, 12);
  Config adamod;
  adamod.q8 = true;
  adamod.op = mc::kAdamodStep;
  adamod.variant = 1;
  adamod.maximize = true;
  check_case<P>(n + " 8-bit diffmod+maximize", layout, adamod, 13);
}

// More than kMaxSeg (600) segments: two launches, one block index space of
// slots. Each chunk spans about 30 segments, each with its own scalars.
void many_segments() {
  Rng rng(7);
  std::vector<Seg> segs;
  for (int i = 0; i < 700; ++i) segs.push_back({int64_t(rng.below(120)), int(rng.below(3) == 0), 0, 0, i & 1});
  Config c;
  c.variant = 31;
  c.learn = 0b101010;
  c.dot = true;
  const mc::Plan plan = check_case<__half>("f16 700 segments", segs, c);
  expect(plan.launches.size() == 2 && plan.launches[1].c.block_base == plan.blocks[0], "700 segments: 2 launches");
  c.variant = mc::kHasMod;
  c.learn = 0;
  c.dot = false;
  check_case<float>("f32 700 segments", segs, c);
}

void found_inf() {
  Config c;
  c.variant = 31;
  c.learn = 63;
  c.dot = c.scale = c.found_inf = true;
  check_case<float>("f32 found_inf: no change", mixed_layout(), c);
  c.q8 = true;
  check_case<float>("f32 8-bit found_inf: no change", {{4097}, {300}}, c);
  c.q8 = false;
  c.op = mc::kAdamodStep;
  c.variant = 1;
  c.learn = 0;
  c.dot = false;
  check_case<__nv_bfloat16>("bf16 diffmod found_inf: no change", mixed_layout(), c);
}

// execute() sets the call's device and must leave the caller's current device as it was.
void device_restore() {
  cuda_on_cpu::device_count = 2;
  expect(cudaSetDevice(1) == cudaSuccess, "device: set 1");
  Config c;
  check_case<float>("f32 on device 0, caller on 1", {{100}}, c);
  int dev = -1;
  cudaGetDevice(&dev);
  expect(dev == 1, "device: the caller's device is restored after a call on another");
  c.device = 5;  // no such device: the call fails and changes nothing
  Bucket<float> b({{100}}, 0, 1);
  const Bucket<float> before = b;
  bool threw = false;
  try {
    run_kernels(b, c);
  } catch (const std::runtime_error&) {
    threw = true;
  }
  cudaGetDevice(&dev);
  expect(threw && dev == 1 && bits_equal(b.param[0], before.param[0]), "device: a bad device throws, changes nothing");
  expect(cudaGetLastError() == cudaSuccess, "device: the failed call leaves no pending error");
  cudaSetDevice(0);
  cuda_on_cpu::device_count = 1;
}

void conversions() {
  // bf16: ties to even, NaN quiet; fp16: ties to even, subnormals, overflow to inf.
  const struct { float f; uint16_t bf, h; } cases[] = {
      {1.0f, 0x3F80, 0x3C00},
      {1.00390625f, 0x3F80, 0x3C04},         // 1 + 2^-8: bf16 tie -> even (down)
      {1.01171875f, 0x3F82, 0x3C0C},         // 1 + 3 * 2^-8: bf16 tie -> even (up)
      {1.00048828125f, 0x3F80, 0x3C00},      // 1 + 2^-11: fp16 tie -> even (down)
      {1.00146484375f, 0x3F80, 0x3C02},      // 1 + 3 * 2^-11: fp16 tie -> even (up)
      {65520.0f, 0x4780, 0x7C00},            // fp16 rounds to inf
      {5.9604644775390625e-8f, 0x3380, 0x0001},  // 2^-24: smallest fp16 subnormal
      {2.98023223876953125e-8f, 0x3300, 0x0000},  // 2^-25: tie -> even (zero)
      {-0.0f, 0x8000, 0x8000},
      {INFINITY, 0x7F80, 0x7C00},
  };
  for (const auto& c : cases) {
    expect(__float2bfloat16_rn(c.f).bits == c.bf, "bf16 of " + std::to_string(c.f));
    expect(__float2half_rn(c.f).bits == c.h, "fp16 of " + std::to_string(c.f));
    if (std::isfinite(c.f) && c.h != 0x7C00) {
      expect(__half2float(__float2half_rn(c.f)) == __half2float(__half{c.h}), "fp16 round trip");
    }
  }
  expect(std::isnan(__bfloat162float(__float2bfloat16_rn(NAN))) && std::isnan(__half2float(__float2half_rn(NAN))),
         "NaN stays NaN");
  for (uint32_t h = 0; h < 0x7C00; ++h)  // every finite fp16 survives float and back
    expect(__float2half_rn(__half2float(__half{uint16_t(h)})).bits == h, "fp16 bits " + std::to_string(h));
}

// The host conversions of cuda_on_cpu.h, for tests/test_cuda_on_cpu.py to compare with torch's.
int convert(const char* in, const char* out) {
  std::FILE* f = std::fopen(in, "rb");
  if (!f) return 2;
  std::vector<float> x;
  for (float v; std::fread(&v, 4, 1, f) == 1;) x.push_back(v);
  std::fclose(f);
  std::vector<uint16_t> bits;
  for (float v : x) bits.push_back(__float2bfloat16_rn(v).bits);
  for (float v : x) bits.push_back(__float2half_rn(v).bits);
  f = std::fopen(out, "wb");
  if (!f) return 2;
  const bool ok = std::fwrite(bits.data(), 2, bits.size(), f) == bits.size();
  return std::fclose(f) == 0 && ok ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  bool big = false;
  if (argc == 4 && std::string(argv[1]) == "--convert") return convert(argv[2], argv[3]);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--big") big = true;
    else if (a == "--plant" && i + 1 < argc) g_plant = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--big] [--plant overrun|misaligned|no-sync]\n", argv[0]);
      return 2;
    }
  }
  if (g_plant == "no-sync") cuda_on_cpu::plant_no_sync = true;
  if (!g_plant.empty()) {  // one case that exercises the planted bug, then the sanitizer's verdict
    Config c;
    c.variant = 31;
    c.learn = 63;
    c.dot = true;
    check_case<float>("planted " + g_plant, mixed_layout(), c);
    return g_failures ? 1 : 0;
  }
  conversions();
  dtype_cases<float>("f32");
  dtype_cases<double>("f64");
  dtype_cases<__nv_bfloat16>("bf16");
  dtype_cases<__half>("f16");
  q8_cases<float>("f32", true);
  q8_cases<__nv_bfloat16>("bf16", false);
  q8_cases<__half>("f16", false);
  many_segments();
  found_inf();
  device_restore();
  if (big) {
    Config c;
    c.variant = 31;
    c.learn = 63;
    c.dot = c.scale = true;
    check_case<float>("f32 1M elements", {{300001}, {700003, 1}}, c);
  }
  std::printf(g_failures ? "%d checks FAILED\n" : "all checks passed\n", g_failures);
  return g_failures ? 1 : 0;
}
