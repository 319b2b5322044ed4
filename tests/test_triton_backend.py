"""backend="triton" against backend="reference": params, state, coefficients and hyper-gradients.

Without a GPU the kernels run under Triton's interpreter on CPU tensors. The
backend reads TRITON_INTERPRET per call and keeps its interpreted kernels
apart from its compiled ones, so the fixture below switches the interpreter on
for these tests only: other test files (and backend="auto") never see it,
whatever the import order. Sizes are small (the interpreter costs ~0.1 s per
block) but reach several tensors, two groups, multi-chunk tables, full blocks
and masked tails. On a GPU the same cases run compiled at realistic sizes,
plus CUDA-graph capture.

Tolerances, in eps = torch.finfo(dtype).eps (2^-23 for fp32 state). Each step
starts from identical inputs (the Triton optimizer is synced to the reference's
state after every step), so only one step's rounding is compared. Both
backends evaluate csrc/mada_math.h op for op without FMA, but round
differently: the header (and this kernel) multiply by reciprocals of the bias
corrections taken in fp64, the reference divides; torch's CPU fp32 sqrt is not
always correctly rounded (sqrt(1.2908058) is 1 ulp low); beta^t is
exp2(t*log2(beta)) here and pow there; the dot takes exact fp64 products here.
- params and moments: 2 eps of the tensor's largest value (a low-precision
  param may round to the other neighbour: 1 ulp <= eps of the largest);
- tangents: within 4x the reference's own error against the exact (float64,
  independent tests/spec_model.py) value, plus 4 eps of it. A fixed tolerance
  cannot work here: rows are differences of terms that cancel (at t = 1 the
  beta1 and beta2 rows are exactly 0 and gamma's is etah*A - lr ~ 1e-8 from
  terms of 1e-2), so rounding is amplified by 1/(1-beta2)-sized factors;
- hyper-gradients: both dot the same stored tangents, so they differ by the
  rounding of the sums only: 8 eps of sum |g*T|; coefficients: hyper_lr times that.
Mutating any term of the kernels (tried: the Lion beta, found_inf, the beta2
power, the friction sign) fails these by orders of magnitude.
"""
from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is optional: pip install triton")

import mada_fused  # noqa: E402
from mada_fused import backends  # noqa: E402

import spec_model  # noqa: E402  (tests/, on sys.path through conftest)
from backend_cases import ALL, CASES, FULL, random_grads  # noqa: E402  (likewise)

CUDA = torch.cuda.is_available()
SHAPES = [(1100,), (37,), (9, 13)]  # 2 chunks (2 full blocks + a tail), a lone tail, a 2-D tensor


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MADA_TRITON_CONFIG", raising=False)


GROUP_LR_WD = [(None, 0.0), (3e-3, 0.1)]  # (lr or the default, weight decay) of the two groups


def _pair(cls, kw, dtype, device, shapes):
    base = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    out = []
    for backend in ("triton", "reference"):
        ps = [b.clone().to(device).requires_grad_() for b in base]
        # Two groups: per-group lr and weight decay reach the kernel through the table.
        (_, wd0), (lr1, wd1) = GROUP_LR_WD
        groups = [{"params": ps[:-1], "weight_decay": wd0}, {"params": ps[-1:], "lr": lr1, "weight_decay": wd1}]
        out.append((ps, cls(groups, backend=backend, **kw)))
    return out


def _oracle_tangents(kw, theta, g, st, coef, group):
    """du/dk in float64 from the same (fp32) pre-step state: the independent model of docs/spec.md."""
    z = torch.zeros_like(theta)
    state = {n: st[n].double() if n in st else z for n in ("m", "v", "n", "l", "vb", "s")}
    step = int(st["step"]) if st else 0
    state.update(step=step, g_prev=st["g_prev"].double() if step and "g_prev" in st else None)
    lr, wd = GROUP_LR_WD[group]
    names = [n for n in ALL if n in kw["learn"]]
    return spec_model.mada_tangents(theta, g, state, coef, names=names, lr=kw["lr"] if lr is None else lr,
                                    weight_decay=wd, mod_beta=kw.get("mod_beta", 0.0), vbar=kw.get("vbar", "full"),
                                    maximize=kw.get("maximize", False))


def _close(a, b, what, tol_rel):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    tol = tol_rel * b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


def _run(cls, kw, dtype=torch.float32, device="cpu", shapes=SHAPES, steps=3, drop=None, amp=False):
    """Step both backends on the same grads and compare (tolerances: module docstring). After each
    step the Triton optimizer is synced to the reference's state, so every step is checked from
    identical inputs and rounding differences do not compound through the hyper-updates.

    ``drop``: that parameter has no grad at step 2, so its step count falls behind the others'.
    ``amp``: grads are scaled and GradScaler's found_inf is set at step 1.
    """
    p_eps = torch.finfo(dtype).eps
    s_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    mada = issubclass(cls, mada_fused.MADA) and bool(kw.get("learn", ALL))
    (tp, topt), (rp, ropt) = _pair(cls, kw, dtype, device, shapes)
    scale = 64.0 if amp else 1.0  # fp16 grads times the scale must stay finite
    for i, grads in enumerate(random_grads(shapes, steps, dtype, device, scale=scale)):
        skip = amp and i == 1
        for ps, opt in ((tp, topt), (rp, ropt)):
            for j, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if (i == 2 and j == drop) else g.clone()
            if amp:  # what GradScaler (torch 2.x) hands a fused optimizer: 0-d tensors
                opt.grad_scale = torch.full((), scale, dtype=torch.float32, device=device)
                opt.found_inf = torch.full((), float(skip), dtype=torch.float32, device=device)
        live = [j for j, p in enumerate(rp) if p.grad is not None and not skip]
        gs = {j: rp[j].grad.double().cpu() / scale for j in live}
        pre = {j: (rp[j].detach().double().cpu().clone(),  # copies: the step updates the state in place
                   {n: t.detach().cpu().clone() for n, t in ropt.state.get(rp[j], {}).items()}) for j in live}
        # Both read the same stored tangents: h differs only by the rounding of the sums.
        sums = [pre[j][1]["tangents"].double().abs().flatten(1) @ gs[j].abs().flatten()
                for j in live if "tangents" in pre[j][1]]
        h_tol = 8 * s_eps * torch.stack(sums).sum(0) if sums else torch.zeros(6)
        k_before = ropt.coefficients if mada else None
        before = [p.detach().clone() for p in tp]
        topt.step()
        ropt.step()
        for j, (a, b) in enumerate(zip(tp, rp)):
            if skip:
                assert torch.equal(a.detach(), before[j]), "found_inf must leave params untouched"
            _close(a, b, f"step {i} param {j}", 2 * p_eps)
            for name, s in ropt.state[b].items():
                if name != "tangents":
                    _close(topt.state[a][name], s, f"step {i} param {j} state {name}", 2 * s_eps)
                elif j in live:
                    coef = ropt.coefficients if kw.get("hyper_order") == "exact" else k_before  # what the step used
                    exact = _oracle_tangents(kw, pre[j][0], gs[j], pre[j][1], coef, 0 if j < len(rp) - 1 else 1)
                    for r, (x, y, z) in enumerate(zip(topt.state[a][name], s, exact)):
                        # As close to the exact value as the reference is (see the module docstring).
                        err, ref_err = ((t.double().cpu() - z).abs().max().item() for t in (x, y))
                        tol = 4 * ref_err + 4 * s_eps * z.abs().max().item()
                        assert err <= tol, f"step {i} param {j} tangent row {r}: error {err:.3g} > {tol:.3g}"
                else:  # no grad, or a skipped step: the tangents stay as they were
                    assert torch.equal(topt.state[a][name], s), f"step {i} param {j}: tangents changed"
        if isinstance(ropt, mada_fused.MADA):
            th, rh = topt.hypergradients, ropt.hypergradients
            assert th.keys() == rh.keys()
            for r, n in enumerate(th):
                assert abs(th[n] - rh[n]) <= h_tol[r].item(), f"step {i} h[{n}]: {th[n]} vs {rh[n]}"
            for n, v in ropt.coefficients.items():  # hyper_lr <= 0.1 times the h difference
                assert abs(topt.coefficients[n] - v) <= 0.1 * h_tol.max().item() + 4 * s_eps, f"step {i} {n}"
        topt.load_state_dict(ropt.state_dict())
        with torch.no_grad():
            for a, b in zip(tp, rp):
                a.copy_(b)
    return topt, tp


# -- interpreter (CPU) --------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_matches_reference(interpret, case):
    cls, kw = CASES[case]
    _run(cls, kw)


def test_interpreter_missing_grad_and_amp(interpret):
    """A parameter without a grad keeps its own step count; a found_inf step changes nothing."""
    _run(mada_fused.MADA, dict(FULL, mod_beta=0.9), drop=1, amp=True, steps=4)
    _run(mada_fused.DiffMod, dict(lr=1e-2), drop=0, amp=True, steps=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_interpreter_dtypes(interpret, dtype):
    """bf16 params round once per step from fp32 state; fp64 params keep fp64 state (the oracle's dtype)."""
    _run(mada_fused.MADA, dict(FULL, mod_beta=0.9), dtype=dtype)


def test_interpreter_deterministic(interpret):
    """Same inputs, same bits: the reduction order is fixed by the layout, not by timing."""
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        opt, ps = _run(mada_fused.MADA, FULL, steps=2)
        runs.append((opt.hypergradients, [p.detach().clone() for p in ps]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_supports_and_auto(monkeypatch):
    backend = backends.load("triton")
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not backend.supports(cpu, torch.float32), "without the interpreter, auto must never pick Triton on CPU"
    assert backends.resolve("auto", cpu, torch.float32).name != "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert all(backend.supports(cpu, d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    assert not backend.supports(cpu, torch.int32)
    # The interpreter runs only when asked for by name: auto keeps the fused CPU path (or the reference).
    assert backends.resolve("auto", cpu, torch.float32).name in ("cpu", "reference")
    assert backends.resolve("triton", cpu, torch.float32).name == "triton"


def test_unavailable_without_triton(monkeypatch):
    module = importlib.import_module("mada_fused.backends.triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    with pytest.raises(backends.BackendUnavailable, match="pip install triton"):
        module.load()


def test_layout_cache_is_bounded(interpret, monkeypatch):
    """Fresh grad allocations every step give new tables; the cache keeps only the latest few,
    and a layout seen again is found again."""
    from mada_fused.triton_kernels import launch

    monkeypatch.setattr(launch, "_MAX_LAYOUTS", 3)
    monkeypatch.setattr(launch, "_layouts", type(launch._layouts)())
    ps = [torch.randn(5, requires_grad=True)]
    opt = mada_fused.AdaMod(ps, backend="triton")
    kept = torch.randn(5)
    for i in range(6):
        ps[0].grad = kept if i % 2 else torch.randn(5)
        opt.step()
        assert len(launch._layouts) <= 3
    tables = {id(v.table) for v in launch._layouts.values()}
    opt.step()  # grad `kept` again: no new table
    assert {id(v.table) for v in launch._layouts.values()} == tables


# -- native compile, no GPU needed --------------------------------------------------------------
_TY = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
       torch.int64: "i64"}


@pytest.mark.parametrize("case", ["full_mod", "diffmod"])
def test_compiles_for_hopper_vectorised(interpret, monkeypatch, case):
    """Triton compiles for sm_90 on the host: the kernels the interpreter checked also build
    natively, the aligned fast path uses 16-byte accesses, and division and square root stay
    IEEE (Triton's plain fp32 `/`, sqrt and exp are approximate)."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mada_fused.triton_kernels import launch

    seen = []

    class Capture:  # stands in for the interpreted kernel: records one launch's arguments
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append((args, meta))

    monkeypatch.setattr(launch, "kernels", lambda interpret: type("K", (), {"fused_step": Capture()}))
    cls, kw = CASES[case]
    ps = [torch.randn(s, dtype=torch.float32, requires_grad=True) for s in [(1024,), (64,), (32, 4)]]
    opt = cls(ps, backend="triton", **kw)
    opt.grad_scale, opt.found_inf = torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
    for _ in range(2):  # the second MADA step reads tangents too
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    args, meta = seen[-1]
    meta = {k: v for k, v in meta.items() if k.isupper()} | {"CHUNK": launch._CHUNK, "BLOCK": launch.CONFIGS[0][0]}
    assert meta["ALIGNED"] and meta["T_ALIGNED"] and meta["S_VEC"] == 4
    monkeypatch.undo()
    fn = launch.kernels(False).fused_step
    names = [n for n in fn.arg_names if n not in meta]
    sig = {n: ("*" + _TY[a.dtype]) if isinstance(a, torch.Tensor) else "i64" for n, a in zip(names, args)}
    # What a launch on 16-byte aligned tensors specialises: pointer and int divisibility.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, a in zip(names, args)
             if isinstance(a, torch.Tensor) or a % 16 == 0}
    src = ASTSource(fn=fn, signature=sig | {k: "constexpr" for k in meta}, constexprs=meta, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=launch.CONFIGS[0][1], enable_fp_fusion=False)).asm["ptx"]
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    assert "div.full.f32" not in ptx and "sqrt.approx.f32" not in ptx and "ex2.approx" not in ptx


# -- native (GPU) -------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter tests above cover the math)")
# Odd sizes take the unaligned path (scalar accesses); whole 16-byte vectors everywhere take the fast one.
LAYOUTS = {"odd": [(1 << 20,), (4097,), (123, 77), (1,)], "aligned": [(1 << 20,), (4096,), (96, 80), (8,)]}
BIG = LAYOUTS["odd"]


@pytest.fixture
def pinned(monkeypatch):
    # One config: keeps the GPU tests from compiling every candidate for every variant.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MADA_TRITON_CONFIG", "1024,8")


@gpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_matches_reference(pinned, case, layout):
    cls, kw = CASES[case]
    _run(cls, kw, device="cuda", shapes=LAYOUTS[layout], steps=4)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_gpu_dtypes_amp(pinned, dtype):
    _run(mada_fused.MADA, dict(FULL, mod_beta=0.9), dtype=dtype, device="cuda", shapes=LAYOUTS["aligned"],
         amp=True, drop=2, steps=4)


@gpu
def test_cuda_graph_capture(pinned):
    """A captured step replays exactly what eager steps compute (scalars never leave the device)."""
    torch.manual_seed(3)
    base = [torch.randn(s, device="cuda") for s in BIG]
    seq = random_grads(BIG, 6, torch.float32, "cuda")
    kw = dict(FULL, mod_beta=0.9)

    eager = [b.clone().requires_grad_() for b in base]
    opt = mada_fused.MADA(eager, backend="triton", **copy.deepcopy(kw))
    for grads in seq:
        for p, g in zip(eager, grads):
            p.grad = g.clone()
        opt.step()

    graphed = [b.clone().requires_grad_() for b in base]
    gopt = mada_fused.MADA(graphed, backend="triton", **copy.deepcopy(kw))
    for p, g in zip(graphed, seq[0]):
        p.grad = g.clone()  # static grads: later steps copy into them
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gopt.step()  # warm-up: compiles, builds the chunk table
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gopt.step()
    # Capture does not run the step: step 2 is the first replay.
    for grads in seq[1:]:
        for p, g in zip(graphed, grads):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)
    assert gopt.hypergradients == opt.hypergradients
