"""What is specific to backend="triton": the interpreter switch, determinism, the launch-layout
cache, the native compile, graph capture. Its numbers, on every case and dtype,
are checked in test_conformance.py (under the interpreter on CPU tensors without a GPU).

The backend reads TRITON_INTERPRET per call and keeps its interpreted kernels apart from its
compiled ones, so the fixture below switches the interpreter on for these tests only: other
test files (and backend="auto") never see it, whatever the import order.
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

from conformance_cases import CASES, FULL, random_grads  # noqa: E402  (tests/, on sys.path through conftest)
from test_conformance import check  # noqa: E402  (likewise)

CUDA = torch.cuda.is_available()


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MADA_TRITON_CONFIG", raising=False)


# -- interpreter (CPU) --------------------------------------------------------------------------
def test_interpreter_deterministic(interpret):
    """Same inputs, same bits: the reduction order is fixed by the layout, not by timing."""
    shapes = [(1100,), (37,), (9, 13)]  # 2 chunks (2 full blocks + a tail), a lone tail, a 2-D tensor
    base = [torch.randn(s) for s in shapes]
    seq = random_grads(shapes, 2, torch.float32, "cpu")
    runs = []
    for _ in range(2):
        ps = [b.clone().requires_grad_() for b in base]
        opt = mada_fused.MADA(ps, backend="triton", **FULL)
        for grads in seq:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
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


_BF16_STORAGE = dict(state_dtype=torch.bfloat16, tangent_dtype=torch.bfloat16)


@pytest.mark.parametrize("case, storage", [("full_mod", {}), ("diffmod", {}), ("full_mod", _BF16_STORAGE)])
def test_compiles_for_hopper_vectorised(interpret, monkeypatch, case, storage):
    """Triton compiles for sm_90 on the host: the kernels the interpreter checked also build
    natively (bf16 state and tangent rows too), the aligned fast path uses 16-byte accesses, and
    division and square root stay IEEE (Triton's plain fp32 `/`, sqrt and exp are approximate)."""
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
    ps = [torch.randn(s, dtype=torch.float32, requires_grad=True) for s in [(1024,), (64,), (32, 4)]]
    opt = CASES[case].cls(ps, backend="triton", **CASES[case].kwargs, **storage)
    opt.grad_scale, opt.found_inf = torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
    for _ in range(2):  # the second MADA step reads tangents too
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    args, meta = seen[-1]
    meta = {k: v for k, v in meta.items() if k.isupper()} | {"CHUNK": launch._CHUNK, "BLOCK": launch.CONFIGS[0][0]}
    assert meta["ALIGNED"] and meta["T_ALIGNED"] and meta["S_VEC"] == (8 if storage else 4)
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
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter covers the math)")
BIG = [(1 << 20,), (4097,), (123, 77), (1,)]


@pytest.fixture
def pinned(monkeypatch):
    # One config: keeps the GPU tests from compiling every candidate for every variant.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MADA_TRITON_CONFIG", "1024,8")


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
