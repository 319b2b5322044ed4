"""What is specific to backend="cuda" (csrc/cuda/, mada_fused/backends/cuda.py): the build,
launch planning, many segments and misaligned params, GradScaler, graph capture, determinism,
checkpoint exchange, 64-bit indexing. Its numbers, on every case and dtype, are checked in
test_conformance.py (tolerances: conformance_cases.TARGETS).

Without a GPU the extension must still build and import (it makes no CUDA call at import),
and its host-side planning (chunks, launches, alignment, argument checks) is tested here;
every GPU test skips with its reason.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mada_fused
from mada_fused import backends
from mada_fused.backends import abi

from conformance_cases import ALL, CASES, FULL, random_grads  # tests/, on sys.path through conftest
from test_conformance import check  # likewise

try:
    from mada_fused import _C_cuda
except ImportError as e:  # built only where nvcc was found
    _C_cuda, _WHY = None, str(e)

built = pytest.mark.skipif(_C_cuda is None, reason="CUDA extension not built (no nvcc at install time)")
gpu = pytest.mark.skipif(not torch.cuda.is_available() or _C_cuda is None,
                         reason="no CUDA device" if not torch.cuda.is_available() else "CUDA extension not built")

# Long cross-backend runs learn slowly: h of beta2 is ill-conditioned and coefficients feed
# it back into everything; a slow rate keeps that below the tolerances.
SLOW = dict(FULL, mod_beta=0.9, hyper_lr={n: 1e-3 for n in ALL})
# Several 2K-element chunks with segments spanning chunk ends, tails, lone tiny tensors.
SHAPES = [(5000,), (7,), (37, 129), (1,), (3001,)]
DEV = torch.device("cuda")
F32 = torch.float32


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


# -- no GPU needed --------------------------------------------------------------------------------
@built
def test_extension_imports_and_reports():
    assert mada_fused.build_info()["cuda_ext"] is True
    assert _C_cuda.built_archs() and all(a >= 700 for a in _C_cuda.built_archs())
    assert _C_cuda.runtime_version() >= 12010  # 32 KB kernel parameters need CUDA 12.1


@built
def test_plan_layout():
    table, call = _fake_call([1000, 7, 5000], offsets=[0, 1000, 1007])
    (launch,) = _C_cuda.plan_info(call)
    assert launch["chunk"] == 2048 and launch["blocks"] == 3
    assert launch["vstart"] == [0, 1000, 1008, 6008]  # every segment starts on a multiple of 8
    assert launch["aligned"] == [True, True, False]  # state offset 1007 breaks 16-byte alignment
    table, call = _fake_call([16, 16], misalign=(1,))
    assert _C_cuda.plan_info(call)[0]["aligned"] == [True, False]
    # Tangent rows 34 floats apart cannot all be aligned; 36 can.
    for stride, ok in ((34, False), (36, True)):
        table, call = _fake_call([16, 16], variant=16, tan=1 << 36, mask=3, stride=stride)
        assert _C_cuda.plan_info(call)[0]["aligned"] == [ok, ok]
    # The chunk follows the workload only (never the GPU), so the summation order is portable.
    table, call = _fake_call([10**8])
    assert [(x["chunk"], x["blocks"]) for x in _C_cuda.plan_info(call)] == [(32768, 3052)]
    # More segments than one launch's parameter block holds: more launches, slots continue.
    n = _C_cuda.MAX_SEGMENTS_PER_LAUNCH
    table, call = _fake_call([3] * (2 * n + 100))
    launches = _C_cuda.plan_info(call)
    assert [len(x["vstart"]) - 1 for x in launches] == [n, n, 100]
    assert [x["block_base"] for x in launches] == [0, launches[0]["blocks"], 2 * launches[0]["blocks"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_without_gpu_says_why():
    import importlib

    with pytest.raises(backends.BackendUnavailable, match="not built|no CUDA device"):
        importlib.import_module("mada_fused.backends.cuda").load()


# -- GPU ------------------------------------------------------------------------------------------
@gpu
def test_supports_and_auto():
    b = backends.load("cuda")
    assert b.supports(torch.device("cuda"), torch.bfloat16) and not b.supports(torch.device("cpu"), torch.float32)
    assert not b.supports(torch.device("cuda"), torch.int32)
    assert backends.resolve("auto", torch.device("cuda", 0), torch.float32).name == "cuda"


@gpu
def test_many_segments_and_misaligned_params():
    """More tensors than one launch holds (hyper-gradient slots span launches), and a param
    that is a view at an odd address (the scalar path)."""
    check("cuda", CASES["full_mod"], F32, DEV, shapes=[(3,)] * 650 + [(5000,)])
    base = torch.randn(4099, dtype=F32, device=DEV)
    pc, pr = torch.nn.Parameter(base.clone()[1:]), torch.nn.Parameter(base.clone()[1:])
    assert pc.data_ptr() % 16 != 0
    oc, orf = mada_fused.MADA([pc], backend="cuda", **FULL), mada_fused.MADA([pr], backend="reference", **FULL)
    for (g,) in random_grads([(4098,)], 3, F32, DEV):
        for p, o in ((pc, oc), (pr, orf)):
            p.grad = g.clone()
            o.step()
        _close(pc, pr, "misaligned param", 32 * torch.finfo(F32).eps)


@gpu
def test_gradscaler_found_inf_changes_nothing():
    """torch.amp.GradScaler hands us grad_scale/found_inf (we set _step_supports_amp_scaling):
    a step with an inf grad leaves params, state, step counts and coefficients as they were."""
    assert mada_fused.MADA._step_supports_amp_scaling
    base = [torch.randn(s, dtype=F32) for s in SHAPES]
    seq = random_grads(SHAPES, 4, F32, DEV)
    runs = {}
    for backend in ("cuda", "reference"):
        ps, opt = _make(mada_fused.MADA, SLOW, base, DEV, backend)
        scaler = torch.amp.GradScaler(DEV.type, init_scale=2.0**10)
        for i, grads in enumerate(seq):
            scaler.scale(torch.ones((), device=DEV))  # initialises the scale
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
                    for name, t in st.items():
                        assert torch.equal(after["state"][k][name], t), f"{backend}: state {name} moved"
        runs[backend] = ps, opt
    (cp, copt), (rp, ropt) = runs["cuda"], runs["reference"]
    for j, (a, b) in enumerate(zip(cp, rp)):
        _close(a, b, f"param {j}", 32 * torch.finfo(F32).eps)


@gpu
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


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype):
    """Same inputs, same bits: per-block slots reduced in a fixed order, no float atomics."""
    shapes = [(300_000,), (77, 129), (5,)]
    base = [torch.randn(s).to(dtype) for s in shapes]
    seq = random_grads(shapes, 4, dtype, DEV)
    runs = []
    for _ in range(2):
        ps, opt = _make(mada_fused.MADA, dict(FULL, mod_beta=0.9), base, DEV, "cuda")
        for grads in seq:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        runs.append((opt.hypergradients, opt.coefficients, copy.deepcopy(opt.state_dict()["state"]), ps))
    (h0, k0, s0, p0), (h1, k1, s1, p1) = runs
    assert h0 == h1 and k0 == k1
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert all(torch.equal(s0[i][n], s1[i][n]) for i in s0 for n in s0[i])


@gpu
@pytest.mark.parametrize("other", ["cpu", "reference"])
def test_checkpoint_exchange(other):
    """A CUDA checkpoint resumes on the CPU backends and back, and all continue alike."""
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

    cp, copt = _make(mada_fused.MADA, kw, base, DEV, "cuda")
    steps(cp, copt, seq[:3])
    hp, hopt = _make(mada_fused.MADA, kw, [p.detach().cpu() for p in cp], "cpu", other)
    hopt.load_state_dict(copt.state_dict())
    steps(hp, hopt, seq[3:4])
    back, bopt = _make(mada_fused.MADA, kw, [p.detach() for p in hp], DEV, "cuda")
    bopt.load_state_dict(hopt.state_dict())  # and back to CUDA after one step there
    steps(cp, copt, seq[3:])
    steps(hp, hopt, seq[4:])
    steps(back, bopt, seq[4:])
    for j, (a, b, c) in enumerate(zip(cp, hp, back)):
        _close(b, a, f"{other} param {j}", 32 * torch.finfo(F32).eps)
        _close(c, a, f"round-trip param {j}", 32 * torch.finfo(F32).eps)
    for n, v in copt.coefficients.items():
        assert abs(hopt.coefficients[n] - v) < 1e-4 and abs(bopt.coefficients[n] - v) < 1e-4


@gpu
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
