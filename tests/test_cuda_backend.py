"""What is specific to backend="cuda" (csrc/cuda/, mada_fused/backends/cuda.py): the build,
launch planning, many segments and misaligned params, GradScaler, graph capture, determinism,
checkpoint exchange, 64-bit indexing. Its numbers, on every case and dtype, are checked in
test_conformance.py (tolerances: conformance_cases.TARGETS).

Each test that needs no device semantics runs twice: on the GPU (backend "cuda", CUDA
tensors) and on the CPU (backend "cuda_on_cpu": the same csrc/cuda sources built by the host
compiler through csrc/cuda/cuda_on_cpu.h, CPU tensors), so CI runs the CUDA code paths without
a GPU. The planner is the same host code in both extensions. Only graph capture, more than
2^31 elements and a second GPU need the real device, and skip without one.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mada_fused
from mada_fused import backends
from mada_fused.backends import abi

from conformance_cases import ALL, CASES, FULL, TOL, random_grads  # tests/, on sys.path through conftest
from test_conformance import check  # likewise

try:
    from mada_fused import _C_cuda
except ImportError:  # built only where nvcc was found
    _C_cuda = None
try:
    from mada_fused import _C_cuda_on_cpu
except ImportError:  # built only with MADA_BUILD_CUDA_ON_CPU=1
    _C_cuda_on_cpu = None

_NO_GPU = ("no CUDA device" if not torch.cuda.is_available()
           else "CUDA extension not built (no nvcc at install time)" if _C_cuda is None else None)
built = pytest.mark.skipif(_C_cuda is None, reason="CUDA extension not built (no nvcc at install time)")
gpu = pytest.mark.skipif(_NO_GPU is not None, reason=_NO_GPU or "")
on_cpu = pytest.mark.skipif(_C_cuda_on_cpu is None, reason="_C_cuda_on_cpu not built (MADA_BUILD_CUDA_ON_CPU=1)")


def needs_gpu(what: str):
    """For what only a real GPU has (graph capture, its memory): skips with both reasons."""
    return pytest.mark.skipif(_NO_GPU is not None, reason=f"{what} needs a GPU: {_NO_GPU}")


# Where the CUDA kernels run: (backend, device of the tensors).
RUNS = [pytest.param(("cuda", torch.device("cuda")), marks=gpu, id="cuda"),
        pytest.param(("cuda_on_cpu", torch.device("cpu")), marks=on_cpu, id="cuda_on_cpu")]


@pytest.fixture(params=RUNS)
def run(request) -> tuple[str, torch.device]:
    return request.param


# The planner (csrc/cuda/plan.cpp, host code) is the same in both builds.
@pytest.fixture(params=[pytest.param("_C_cuda_on_cpu", marks=on_cpu), pytest.param("_C_cuda", marks=built)])
def ext(request):
    return _C_cuda_on_cpu if request.param == "_C_cuda_on_cpu" else _C_cuda


# Long cross-backend runs learn slowly: h of beta2 is ill-conditioned and coefficients feed
# it back into everything; a slow rate keeps that below the tolerances.
SLOW = dict(FULL, mod_beta=0.9, hyper_lr={n: 1e-3 for n in ALL})
# Several 2K-element chunks with segments spanning chunk ends, tails, lone tiny tensors.
SHAPES = [(5000,), (7,), (37, 129), (1,), (3001,)]
DEV = torch.device("cuda")
F32 = torch.float32


def drift(backend: str, steps: int) -> float:
    """Bound on params after ``steps`` steps against another backend's, in units of the largest
    value. On the GPU 32 eps (nvcc contracts to FMA; conformance_cases.TARGETS: 8 ulps a step).
    The CPU build of the same kernels rounds like the reference up to its reciprocals, and gets
    the per-step parameter bound the Triton backend is held to (conformance_cases.TOL, 2 eps),
    summed over the steps (seen: 0.54 eps of 2 to 12)."""
    eps = torch.finfo(F32).eps
    return 32 * eps if backend == "cuda" else steps * TOL["param"] * eps


def _make(cls, kw, base, device, backend):
    ps = [b.clone().to(device).requires_grad_() for b in base]
    # Two groups: per-group lr and weight decay reach the kernel through the segment table.
    groups = [{"params": ps[:-1]}, {"params": ps[-1:], "lr": 3e-3, "weight_decay": 0.1}]
    return ps, cls(groups, backend=backend, **copy.deepcopy(kw))


def _close(a, b, what, tol_rel, floor=0.0):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    tol = tol_rel * (b.abs().max().item() + floor) if b.numel() else 0.0
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


def _fake_call(numels, variant=0, offsets=None, misalign=(), tan=0, mask=0, stride=None):
    """A packed call of made-up (16-byte aligned unless told) addresses for plan_info(); nothing is
    dereferenced but the segment table."""
    offsets = offsets if offsets is not None else [sum(numels[:i]) for i in range(len(numels))]
    rows = []
    for i, (n, off) in enumerate(zip(numels, offsets)):
        rows += [(1 << 30) + (i << 20) + (8 if i in misalign else 0), (1 << 31) + (i << 20), off, n, 0, i]
    table = torch.tensor(rows, dtype=torch.int64)
    total = sum(numels)
    f32 = abi.DTYPES["float32"]
    call = abi.pack_fixed(op=abi.MADA_STEP, variant=variant, dtype=f32, state_dtype=f32, sr_seed=0, learn_mask=mask,
                          maximize=False, vbar_detach=False, device=0, state_numel=total, num_groups=1,
                          num_params=len(numels), lr=16, wd=16, steps=16, state=[1 << 33, 1 << 34] + [1 << 35] * 5,
                          tangents=tan, tan_stride=stride or total, consts=[0.0] * 4)
    call += abi.pack_step(rows=table.data_ptr(), n_rows=len(numels), coef=16, grad_scale=16, found_inf=16,
                          dot_out=0, stream=0, num_threads=0)
    return table, call  # keep `table` alive while plan_info reads it


# -- the build and the planner --------------------------------------------------------------------
@built
def test_extension_imports_and_reports():
    assert mada_fused.build_info()["cuda_ext"] is True
    assert _C_cuda.built_archs() and all(a >= 700 for a in _C_cuda.built_archs())
    assert _C_cuda.runtime_version() >= 12010  # 32 KB kernel parameters need CUDA 12.1
    assert _C_cuda.driver_version() >= 0  # 0: no driver here; asking makes no CUDA context


def test_plan_layout(ext):
    table, call = _fake_call([1000, 7, 5000], offsets=[0, 1000, 1007])
    (launch,) = ext.plan_info(call)
    assert launch["chunk"] == 2048 and launch["blocks"] == 3
    assert launch["vstart"] == [0, 1000, 1008, 6008]  # every segment starts on a multiple of 8
    assert launch["aligned"] == [True, True, False]  # state offset 1007 breaks 16-byte alignment
    table, call = _fake_call([16, 16], misalign=(1,))
    assert ext.plan_info(call)[0]["aligned"] == [True, False]
    # Tangent rows 34 floats apart cannot all be aligned; 36 can.
    for stride, ok in ((34, False), (36, True)):
        table, call = _fake_call([16, 16], variant=16, tan=1 << 36, mask=3, stride=stride)
        assert ext.plan_info(call)[0]["aligned"] == [ok, ok]
    # The chunk follows the workload only (never the GPU), so the summation order is portable.
    table, call = _fake_call([10**8])
    assert [(x["chunk"], x["blocks"]) for x in ext.plan_info(call)] == [(32768, 3052)]
    # More segments than one launch's parameter block holds: more launches, slots continue.
    n = ext.MAX_SEGMENTS_PER_LAUNCH
    table, call = _fake_call([3] * (2 * n + 100))
    launches = ext.plan_info(call)
    assert [len(x["vstart"]) - 1 for x in launches] == [n, n, 100]
    assert [x["block_base"] for x in launches] == [0, launches[0]["blocks"], 2 * launches[0]["blocks"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_without_gpu_says_why():
    import importlib

    with pytest.raises(backends.BackendUnavailable, match="not built|no CUDA device"):
        importlib.import_module("mada_fused.backends.cuda").load()


# -- the kernels, on the GPU and on the CPU ---------------------------------------------------------
def test_supports_and_auto(run):
    """Each build runs on its own device only; auto picks the GPU build, never the CPU one."""
    backend, dev = run
    other = torch.device("cpu" if dev.type == "cuda" else "cuda")
    b = backends.load(backend)
    assert b.supports(dev, torch.bfloat16) and not b.supports(other, torch.float32)
    assert not b.supports(dev, torch.int32)
    auto = backends.resolve("auto", torch.device(dev.type, 0) if dev.type == "cuda" else dev, torch.float32).name
    assert (auto == "cuda") if backend == "cuda" else (auto != "cuda_on_cpu")


def test_many_segments_and_misaligned_params(run):
    """More tensors than one launch holds (hyper-gradient slots span launches), and a param
    that is a view at an odd address (the scalar path)."""
    backend, dev = run
    check(backend, CASES["full_mod"], F32, dev, shapes=[(3,)] * 650 + [(5000,)])
    base = torch.randn(4099, dtype=F32, device=dev)
    pc, pr = torch.nn.Parameter(base.clone()[1:]), torch.nn.Parameter(base.clone()[1:])
    assert pc.data_ptr() % 16 != 0
    oc, orf = mada_fused.MADA([pc], backend=backend, **FULL), mada_fused.MADA([pr], backend="reference", **FULL)
    for i, (g,) in enumerate(random_grads([(4098,)], 3, F32, dev)):
        for p, o in ((pc, oc), (pr, orf)):
            p.grad = g.clone()
            o.step()
        _close(pc, pr, "misaligned param", drift(backend, i + 1))


def test_gradscaler_found_inf_changes_nothing(run):
    """torch.amp.GradScaler hands us grad_scale/found_inf (we set _step_supports_amp_scaling):
    a step with an inf grad leaves params, state, step counts and coefficients as they were."""
    backend, dev = run
    assert mada_fused.MADA._step_supports_amp_scaling
    base = [torch.randn(s, dtype=F32) for s in SHAPES]
    seq = random_grads(SHAPES, 4, F32, dev)
    runs = {}
    for name in (backend, "reference"):
        ps, opt = _make(mada_fused.MADA, SLOW, base, dev, name)
        scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**10)
        for i, grads in enumerate(seq):
            scaler.scale(torch.ones((), device=dev))  # initialises the scale
            for p, g in zip(ps, grads):
                p.grad = g * scaler.get_scale()
            if i == 2:
                ps[1].grad[0] = float("inf")
                snap = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps], opt.coefficients
            scaler.step(opt)
            scaler.update()
            if i == 2:
                after = opt.state_dict()
                assert all(torch.equal(p, q) for p, q in zip(ps, snap[1]))
                assert opt.coefficients == snap[2]
                for k, st in snap[0]["state"].items():
                    for n, t in st.items():
                        assert torch.equal(after["state"][k][n], t), f"{name}: state {n} moved"
        runs[name] = ps
    for j, (a, b) in enumerate(zip(runs[backend], runs["reference"])):
        _close(a, b, f"param {j}", drift(backend, len(seq) - 1))  # one step skipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(run, dtype):
    """Same inputs, same bits: per-block slots reduced in a fixed order, no float atomics
    (on the CPU each block's threads are real threads: a race would show here too)."""
    backend, dev = run
    # Many blocks on the GPU; on the CPU (a thread switch per barrier) still several chunks.
    shapes = [(300_000 if backend == "cuda" else 9000,), (77, 129), (5,)]
    base = [torch.randn(s).to(dtype) for s in shapes]
    seq = random_grads(shapes, 4, dtype, dev)
    runs = []
    for _ in range(2):
        ps, opt = _make(mada_fused.MADA, dict(FULL, mod_beta=0.9), base, dev, backend)
        for grads in seq:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        runs.append((opt.hypergradients, opt.coefficients, copy.deepcopy(opt.state_dict()["state"]), ps))
    (h0, k0, s0, p0), (h1, k1, s1, p1) = runs
    assert h0 == h1 and k0 == k1
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert all(torch.equal(s0[i][n], s1[i][n]) for i in s0 for n in s0[i])


@pytest.mark.parametrize("other", ["cpu", "reference"])
def test_checkpoint_exchange(run, other):
    """A CUDA checkpoint resumes on the CPU backends and back, and all continue alike."""
    backend, dev = run
    if other == "cpu" and "cpu" not in backends.available():
        pytest.skip("the C++ CPU extension is not built")
    shapes, kw = SHAPES, SLOW
    base = [torch.randn(s, dtype=F32) for s in shapes]
    seq = random_grads(shapes, 6, F32, "cpu")

    def steps(ps, opt, grads_list):
        for grads in grads_list:
            for p, g in zip(ps, grads):
                p.grad = g.to(p.device).clone()
            opt.step()

    cp, copt = _make(mada_fused.MADA, kw, base, dev, backend)
    steps(cp, copt, seq[:3])
    hp, hopt = _make(mada_fused.MADA, kw, [p.detach().cpu() for p in cp], "cpu", other)
    hopt.load_state_dict(copt.state_dict())
    steps(hp, hopt, seq[3:4])
    back, bopt = _make(mada_fused.MADA, kw, [p.detach() for p in hp], dev, backend)
    bopt.load_state_dict(hopt.state_dict())  # and back to the CUDA kernels after one step there
    steps(cp, copt, seq[3:])
    steps(hp, hopt, seq[4:])
    steps(back, bopt, seq[4:])
    for j, (a, b, c) in enumerate(zip(cp, hp, back)):
        _close(b, a, f"{other} param {j}", drift(backend, len(seq)))
        _close(c, a, f"round-trip param {j}", drift(backend, len(seq)))
    for n, v in copt.coefficients.items():
        assert abs(hopt.coefficients[n] - v) < 1e-4 and abs(bopt.coefficients[n] - v) < 1e-4


# -- what needs the device itself -------------------------------------------------------------------
@needs_gpu("CUDA graph capture")
def test_cuda_graph_capture_and_replay():
    """torch's capturable-optimizer pattern: static grads, warm-up on a side stream, capture one
    step, replay. Replays compute exactly what eager steps compute, bit for bit, including a
    tensor lr changed between replays (scalars never leave the device)."""
    shapes = SHAPES
    base = [torch.randn(s, dtype=F32, device="cuda") for s in shapes]
    seq = random_grads(shapes, 6, F32, "cuda")
    lrs = [1e-2, 1e-2, 5e-3, 5e-3, 2e-3, 2e-3]
    kw = dict(FULL, mod_beta=0.9)
    del kw["lr"]

    def build():
        ps = [b.clone().requires_grad_() for b in base]
        lr = torch.tensor(lrs[0], dtype=torch.float64, device="cuda")
        return ps, lr, mada_fused.MADA(ps, lr=1e-2, backend="cuda", **copy.deepcopy(kw))

    eager, lr_e, opt = build()
    opt.param_groups[0]["lr"] = lr_e
    for grads, lr in zip(seq, lrs):
        lr_e.fill_(lr)
        for p, g in zip(eager, grads):
            p.grad = g.clone()
        opt.step()

    graphed, lr_g, gopt = build()
    gopt.param_groups[0]["lr"] = lr_g
    for p, g in zip(graphed, seq[0]):
        p.grad = g.clone()  # static grads: later steps copy into them

    def feed(k):
        lr_g.fill_(lrs[k])
        for p, g in zip(graphed, seq[k]):
            p.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: allocates the state; step 2 also runs the dot path
        for k in range(2):
            feed(k)
            gopt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gopt.step()  # captured, not run
    for k in range(2, len(seq)):
        feed(k)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)
    for a, b in zip(graphed, eager):
        for name, t in opt.state[b].items():
            assert torch.equal(gopt.state[a][name], t), name
    assert gopt.hypergradients == opt.hypergradients and gopt.coefficients == opt.coefficients


@needs_gpu("64-bit indexing over 2^31 elements (26 GB)")
def test_more_than_2_31_elements():
    """64-bit indexing: an Adam-corner step on 2^31 + 4099 bf16 elements (about 26 GB), all
    equal, must give every element the bits a small tensor of the same values gets."""
    n = 2**31 + 4099
    if torch.cuda.mem_get_info()[0] < 30 * 2**30:
        pytest.skip("needs about 30 GB of free GPU memory")
    out = []
    for size in (4099, n):
        p = torch.full((size,), 0.5, dtype=torch.bfloat16, device=DEV, requires_grad=True)
        p.grad = torch.full_like(p, 0.25)
        opt = mada_fused.MADA([p], lr=1e-2, learn=(), backend="cuda")
        opt.step()
        out.append((p.detach(), opt.state[p]["v"]))
    (small, v_small), (big, v_big) = out
    want, v_want = small[0].item(), v_small[0].item()
    assert want != 0.5 and (small == want).all()
    for x in (big[:4099], big[2**31 - 5:], big[:: 2**20]):
        assert (x == want).all()
    assert (v_big[-4099:] == v_want).all() and (v_big[:: 2**20] == v_want).all()


@pytest.mark.skipif(_NO_GPU is not None or torch.cuda.device_count() < 2,
                    reason=f"needs 2 GPUs ({_NO_GPU or f'{torch.cuda.device_count()} here'})")
def test_step_on_another_device_keeps_the_current_device():
    """The extension makes the params' GPU current for its launches and puts the caller's back:
    the runtime's current device is the thread's, which torch shares. (On the CPU build,
    tests/native's driver checks the same with emulated devices: test_cuda_on_cpu.py.)"""
    shapes = [(5000,), (7,)]
    base = [torch.randn(s, dtype=F32) for s in shapes]
    seq = random_grads(shapes, 3, F32, "cpu")
    for current, params_on in ((0, 1), (1, 0)):
        torch.cuda.set_device(current)
        ps, opt = _make(mada_fused.MADA, SLOW, base, torch.device("cuda", params_on), "cuda")
        rp, ropt = _make(mada_fused.MADA, SLOW, base, "cpu", "reference")
        for grads in seq:
            for p, q, g in zip(ps, rp, grads):
                p.grad, q.grad = g.to(p.device), g.clone()
            opt.step()
            ropt.step()
            assert torch.cuda.current_device() == current
        for j, (a, b) in enumerate(zip(ps, rp)):
            _close(a, b, f"param {j} on cuda:{params_on}", drift("cuda", len(seq)))
    torch.cuda.set_device(0)
