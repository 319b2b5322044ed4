"""bf16 parameters without fp32 master weights: ``kahan_sum`` and ``bf16_stochastic_round``
(docs/spec.md section 5.2).

What is checked, and against what:
- the reference's stored parameter and compensation against the spec's formulas, with the
  new value x taken from an fp32-parameter run of the same step and the random bits from
  plain Python integers;
- ``cpu``, ``cuda_on_cpu`` and ``triton`` (interpreted) against the reference: parameters and ``kahan_comp``
  bit for bit where both form x by the same operations (AdaMod, DiffMod), to the spec's
  one-ulp reciprocals otherwise (MADA), with fp32 and bf16 state;
- ``cuda_on_cpu`` (the CUDA kernels compiled for the host) against ``cpu``: parameters,
  compensation and state bit for bit (MADA's tangent rows to fp32 ulps);
- the property the options exist for: with an lr whose updates are below half a bf16 ulp,
  round-to-nearest freezes the weights while both options track an fp32-parameter run;
- checkpoints (bitwise resume; loading across kahan_sum), GradScaler skips, refusals.
"""
from __future__ import annotations

import copy
import struct

import pytest
import torch

import spec_model as spec
from storage_cases import FULL, U32, loads, needs_cpu, needs_cuda_on_cpu, needs_triton, sr_bits
from mada_fused import MADA, AdaMod, AVGrad, DiffMod
from mada_fused.backends import reference as ref

BF16 = torch.bfloat16
KAHAN, SR = dict(kahan_sum=True), dict(bf16_stochastic_round=True)
MODES = {"kahan": KAHAN, "sr": SR}


CASES = {
    "mada_full": (MADA, FULL),
    "mada_corner": (MADA, dict(learn=())),  # the CPU's one-loop path
    "avgrad": (AVGrad, {}),
    "adamod": (AdaMod, {}),
    "diffmod": (DiffMod, {}),
}
SHAPES = [(37,), (8, 33), (1,), (300,)]  # odd sizes: alignment padding between parameters


def _bits16(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _params(dtype=BF16, shapes=SHAPES, scale=3.0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * scale).to(dtype)) for s in shapes]


def _grads(steps: int, shapes=SHAPES, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(BF16) for s in shapes] for _ in range(steps)]


def _run(case: str, backend: str, grads, mode: str, state_dtype=torch.float32, lr=1e-3):
    cls, kw = CASES[case]
    params = _params()
    opt = cls(params, lr=lr, backend=backend, state_dtype=state_dtype, **MODES[mode], **kw)
    for gs in grads:
        spec.set_grads(params, gs)
        opt.step()
    return opt, params


# -- the reference against the spec's formulas ----------------------------------------------
def _u(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _f(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u & U32))[0]


def _rne(x: float) -> float:
    return float(torch.tensor(x).to(BF16))  # torch's conversion is round-to-nearest-even


@pytest.mark.parametrize("case", ["mada_full", "adamod"])
@pytest.mark.parametrize("mode", ["kahan", "sr"])
def test_reference_stores_the_spec_formulas(case, mode):
    """Two steps: the second starts from a nonzero compensation. x is the fp32-parameter
    run's value from the compensated weight (theta + comp), with the same state."""
    cls, kw = CASES[case]
    grads = _grads(2, shapes=[(64,), (5,)])
    params = _params(shapes=[(64,), (5,)])
    seed = 12345
    opt = cls(params, lr=1e-2, backend="reference", sr_seed=seed, **MODES[mode], **kw)
    spec.set_grads(params, grads[0])
    opt.step()
    offsets = opt._buckets[0].offsets
    comps = [opt.state[p]["kahan_comp"].float() if mode == "kahan" else torch.zeros(p.shape) for p in params]
    assert mode != "kahan" or comps[0].any()
    twins = [torch.nn.Parameter(p.detach().float() + c) for p, c in zip(params, comps)]  # theta + comp
    twin = cls(twins, lr=1e-2, backend="reference", **kw)
    twin.load_state_dict({**opt.state_dict(), "state": {
        i: {k: v for k, v in s.items() if k != "kahan_comp"} for i, s in opt.state_dict()["state"].items()}})
    spec.set_grads(params, grads[1])
    spec.set_grads(twins, [g.float() for g in grads[1]])
    opt.step()
    twin.step()
    for p, q, off in zip(params, twins, offsets):
        for i, (x, got) in enumerate(zip(q.detach().view(-1).tolist(), p.detach().float().view(-1).tolist())):
            if mode == "sr":
                want = _f((_u(x) + (sr_bits(seed, 2, 13, off + i) & 0xFFFF)) & 0xFFFF0000)
                assert got == want, (i, x)
            else:
                assert got == _rne(x), (i, x)
                c = float(opt.state[p]["kahan_comp"].view(-1)[i])
                assert c == _rne(_f(_u(x)) - got), (i, x)  # x - theta is exact in fp32


def test_reference_kahan_comp_of_specials():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4e38, 1.0 + 2**-9 + 2**-20, 0.0])
    stored = ref.rne_bf16(x)
    comp = ref.kahan_comp(x, stored)
    assert comp[:3].eq(0).all() and stored[3].isinf()  # 3.4e38 rounds to inf: comp 0, not -inf
    assert comp[3] == 0 and comp[4] == ref.rne_bf16(torch.tensor(2**-9 + 2**-20)) and comp[5] == 0
    assert stored[2].isnan()


# -- fused backends against the reference ---------------------------------------------------------
FUSED = [
    *(pytest.param("cpu", case, mode, sd, marks=needs_cpu, id=f"cpu-{case}-{mode}-{str(sd)[6:]}")
      for case in CASES for mode in MODES for sd in (torch.float32, BF16)),
    *(pytest.param("cuda_on_cpu", case, mode, sd, marks=needs_cuda_on_cpu,
                   id=f"cuda_on_cpu-{case}-{mode}-{str(sd)[6:]}")
      for case in CASES for mode in MODES for sd in (torch.float32, BF16)),
    # The Triton interpreter is slow: each case and mode once, fp32 and bf16 state alternating.
    *(pytest.param("triton", case, mode, sd, marks=needs_triton, id=f"triton-{case}-{mode}-{str(sd)[6:]}")
      for case, sd in zip(CASES, (torch.float32, BF16) * 3) for mode in MODES),
]


@pytest.mark.parametrize("backend, case, mode, state_dtype", FUSED)
def test_fused_backends_store_the_reference_bits(backend, case, mode, state_dtype, monkeypatch):
    """AdaMod and DiffMod form x by the reference's operations: every bit equal. MADA's fused
    x may differ from the reference's by an fp32 ulp (spec section 6's reciprocals): that
    changes a parameter's rounding with probability ~2^-16 and a compensation's (8 bits of a
    residual below 2^-9 |theta|) with ~2^-7, so a few differ, and theta + comp agrees to 2^-15."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    grads = _grads(2 if backend == "triton" else 6)
    (oa, pa), (ob, pb) = (_run(case, b, grads, mode, state_dtype) for b in ("reference", backend))
    exact = CASES[case][0] in (AdaMod, DiffMod)
    for p, q in zip(pa, pb):
        assert p.dtype == q.dtype == BF16 and q.isfinite().all()
        differ = (_bits16(p) != _bits16(q)).sum().item()
        assert differ <= (0 if exact else 1 + p.numel() // 1000)
        if mode == "kahan":
            ca, cb = oa.state[p]["kahan_comp"], ob.state[q]["kahan_comp"]
            assert ca.dtype == cb.dtype == BF16 and ca.any()
            assert (_bits16(ca) != _bits16(cb)).sum().item() <= (0 if exact else 1 + p.numel() // 20)
            torch.testing.assert_close(p.float() + ca.float(), q.float() + cb.float(), rtol=2**-15, atol=0)
        for name in oa.state[p]:
            if name not in ("tangents", "kahan_comp", "vb", "s"):
                assert torch.equal(oa.state[p][name].float(), ob.state[q][name].float()) or not exact, name


@needs_cpu
@pytest.mark.parametrize("case", ["mada_full", "mada_corner", "diffmod"])
def test_cpu_bits_do_not_depend_on_the_thread_count(case):
    """More than one 64K chunk, so two threads really split the work."""
    cls, kw = CASES[case]
    grads = _grads(3, shapes=[(150_001,), (7,)])
    out = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for mode in MODES.values():
                params = _params(shapes=[(150_001,), (7,)])
                opt = cls(params, lr=1e-3, backend="cpu", **mode, **kw)
                for gs in grads:
                    spec.set_grads(params, gs)
                    opt.step()
                out.append([_bits16(p).clone() for p in params] + [_bits16(opt.state[params[0]].get(
                    "kahan_comp", params[0].detach())).clone()])
        finally:
            torch.set_num_threads(old)
    for a, b in zip(out[:2], out[2:]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@needs_cpu
@needs_cuda_on_cpu
@pytest.mark.parametrize("state_dtype", [torch.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_cuda_kernels_store_the_cpu_bits(case, mode, state_dtype):
    """The CUDA kernels (run on the host) and the CPU kernels form x by the same mada_math.h
    operations and round it with the same keys: every bit of the parameters, the
    compensation and the state equal (MADA's fp32 tangent rows, which only feed the
    hyper-gradient, to fp32 ulps). The large shape spans several blocks and both the
    kernel's 16-byte and its scalar path."""
    shapes = SHAPES + [(5000,)]
    grads = _grads(4, shapes=shapes)
    runs = []
    for backend in ("cpu", "cuda_on_cpu"):
        cls, kw = CASES[case]
        params = _params(shapes=shapes)
        opt = cls(params, lr=1e-3, backend=backend, state_dtype=state_dtype, **MODES[mode], **kw)
        for gs in grads:
            spec.set_grads(params, gs)
            opt.step()
        runs.append((opt, params))
    (oa, pa), (ob, pb) = runs
    for p, q in zip(pa, pb):
        assert q.isfinite().all() and torch.equal(_bits16(p), _bits16(q))
        assert ("kahan_comp" in oa.state[p]) == (mode == "kahan")
        for name, x in oa.state[p].items():
            y = ob.state[q][name]
            assert x.dtype == y.dtype, name
            if name == "tangents":  # the two kernels' tangent formulas part by fp32 ulps (not rounding)
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * x.abs().max().item())
            else:
                assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name
        if mode == "kahan":
            assert oa.state[p]["kahan_comp"].any()


# -- why the options exist ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("cls", [MADA, AdaMod])
def test_updates_below_half_an_ulp_freeze_nearest_but_not_kahan_or_sr(backend, cls):
    """Weights in [1, 2) (bf16 ulp 2^-7), lr 1e-4: every update is below ~1.2e-4, a 33rd of
    half an ulp, so round-to-nearest stores the start forever. The fp32-parameter run moves
    each weight by 0.005-0.03 (0.6-4 ulps) over 300 steps (the gradients do not depend on the
    weights, so the runs see the same ones). Kahan's theta + comp tracks it to 5 % rms of the
    displacement (measured 0.55 % MADA, 2.6 % AdaMod, whose updates of ~1.6e-5 are near
    comp's own bf16 ulp: comp keeps 8 more bits, not 16), its stored theta to half an ulp
    (measured 0.36-0.45 ulp); SR's weights are unbiased: their mean displacement is within 5 %
    (measured 0.5 %, 1.1 %), each within 3 ulps rms (measured 1.9, 0.8)."""
    n, steps = 4096, 300
    g = torch.Generator().manual_seed(3)
    start = (1 + torch.rand(n, generator=g)).to(BF16)
    grads = [(0.2 * torch.randn(n, generator=g) + 1).to(BF16) for _ in range(steps)]
    kw = dict(learn=()) if cls is MADA else {}

    def run(dtype, **mode):
        p = torch.nn.Parameter(start.to(dtype, copy=True))
        opt = cls([p], lr=1e-4, backend=backend, **kw, **mode)
        for gr in grads:
            p.grad = gr.to(dtype)
            opt.step()
        comp = opt.state[p]["kahan_comp"].double() if "kahan_sum" in mode else 0.0
        return p.detach().double(), comp

    x0 = start.double()
    exact, _ = run(torch.float32)
    moved = exact - x0
    assert moved.abs().mean() > 0.004  # AdaMod's clip holds it to ~0.005, MADA moves ~0.03
    nearest, _ = run(BF16)
    assert torch.equal(nearest, x0)
    theta, comp = run(BF16, **KAHAN)
    assert ((theta + comp - exact).norm() / moved.norm()).item() < 0.05
    assert (theta - exact).abs().max().item() <= 2**-8 * 1.01
    sr, _ = run(BF16, **SR)
    assert abs(((sr - x0).mean() / moved.mean()).item() - 1) < 0.05
    # Each step's draw adds variance p (1 - p) ulp^2, p = update / ulp <= 1e-4 * 2^7: over 300
    # steps <= 3.8 ulp^2, about 2 ulps rms.
    assert (sr - exact).pow(2).mean().sqrt().item() < 3 * 2**-7


def test_other_parameter_dtypes_step_as_without_the_options():
    """fp32 parameters beside bf16 ones: only the bf16 bucket keeps a compensation."""
    grads = _grads(3, shapes=[(40,), (40,)])
    outs = []
    for mode in ({}, KAHAN, SR):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 40)), torch.nn.Parameter(torch.linspace(-1, 1, 40))]
        params[1].data = params[1].data.to(BF16)
        opt = MADA(params, lr=1e-2, backend="reference", **mode)
        for gs in grads:
            spec.set_grads(params, [gs[0].float(), gs[1]])
            opt.step()
        assert "kahan_comp" not in opt.state[params[0]]
        assert ("kahan_comp" in opt.state[params[1]]) == bool(mode.get("kahan_sum"))
        outs.append(params[0].detach().clone())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# -- checkpoints -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("mode", ["kahan", "sr"])
def test_checkpoint_resumes_bit_exactly(backend, mode):
    grads = _grads(6)
    opt, params = _run("mada_full", backend, grads[:3], mode, state_dtype=BF16)
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    for gs in grads[3:]:
        spec.set_grads(params, gs)
        opt.step()
    params2 = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = MADA(params2, lr=1e-3, backend=backend, state_dtype=BF16, **MODES[mode], **FULL)
    opt2.load_state_dict(saved)
    for gs in grads[3:]:
        spec.set_grads(params2, gs)
        opt2.step()
    for p, q in zip(params, params2):
        assert torch.equal(_bits16(p), _bits16(q))
        for name, x in opt.state[p].items():
            assert torch.equal(x, opt2.state[q][name]), name


def test_checkpoints_load_across_kahan_sum():
    """Without a saved compensation, kahan_sum starts from 0; a saved one is dropped by an
    optimizer without Kahan summation (docs/spec.md 5.2)."""
    grads = _grads(2)
    plain, pp = _run("adamod", "reference", grads, "sr")
    kahan, pk = _run("adamod", "reference", grads, "kahan")
    into_kahan = AdaMod(_params(), backend="reference", **KAHAN)
    into_kahan.load_state_dict(plain.state_dict())
    for p in into_kahan._buckets[0].params:
        assert not into_kahan.state[p]["kahan_comp"].any()
    into_plain = AdaMod(_params(), backend="reference")
    into_plain.load_state_dict(kahan.state_dict())
    assert all("kahan_comp" not in into_plain.state[p] for p in into_plain._buckets[0].params)


def test_a_corrupt_compensation_is_refused_and_changes_nothing():
    opt, params = _run("adamod", "reference", _grads(2), "kahan")
    sd = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    sd["state"][0]["kahan_comp"][0] = float("nan")
    with pytest.raises(ValueError, match="kahan_comp"):
        opt.load_state_dict(sd)
    for i, st in opt.state_dict()["state"].items():
        for name, x in st.items():
            assert torch.equal(x, before["state"][i][name]), name


# -- GradScaler and refusals ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu),
                                     pytest.param("cuda_on_cpu", marks=needs_cuda_on_cpu),
                                     pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("mode", ["kahan", "sr"])
def test_a_skipped_step_changes_nothing(backend, mode, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    opt, params = _run("mada_full", backend, _grads(2), mode)
    before = [p.detach().clone() for p in params]
    state = {(i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state[p].items() if k != "step"}
    spec.set_grads(params, _grads(1, seed=9)[0])
    opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([1.0])
    opt.step()
    assert all(torch.equal(_bits16(p), _bits16(q)) for p, q in zip(params, before))
    after = {(i, k): v for i, p in enumerate(params) for k, v in opt.state[p].items() if k != "step"}
    assert state.keys() == after.keys() and ((0, "kahan_comp") in state) == (mode == "kahan")
    assert all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("cls", [MADA, AVGrad, AdaMod, DiffMod])
def test_bad_combinations_are_refused(cls):
    p = torch.nn.Parameter(torch.zeros(4, dtype=BF16))
    with pytest.raises(ValueError, match="choose one"):
        cls([p], kahan_sum=True, bf16_stochastic_round=True)
    with pytest.raises(TypeError, match="kahan_sum"):
        cls([p], kahan_sum=1)
    with pytest.raises(TypeError, match="bf16_stochastic_round"):
        cls([p], bf16_stochastic_round="yes")
    assert not p.any() and p.grad is None


def test_moving_a_parameter_to_bf16_starts_its_compensation_at_zero():
    p = torch.nn.Parameter(torch.linspace(1, 2, 50))
    opt = AdaMod([p], lr=1e-2, backend="reference", **KAHAN)
    p.grad = torch.ones(50)
    opt.step()
    assert "kahan_comp" not in opt.state[p]
    p.data = p.data.to(BF16)
    p.grad = torch.ones(50, dtype=BF16)
    opt.step()
    assert opt.state[p]["kahan_comp"].dtype == BF16 and opt.state[p]["kahan_comp"].any()
    assert opt.state[p]["m"].dtype == torch.float32 and int(opt.state[p]["step"]) == 2


@needs_triton
@pytest.mark.parametrize("pround", [1, 2])
def test_triton_compiles_the_bf16_parameter_stores(pround):
    """The interpreter runs the kernels above; this compiles the GPU path (to TTIR) with bf16
    parameters and bf16 state: Kahan stores one more stream, its compensation (no GPU needed)."""
    import triton
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mada_fused.triton_kernels import launch

    fn = launch.kernels(False).fused_step
    ptr = dict(table="*i64", coef="*fp64", steps="*fp64", consts="*fp64", partial="*fp64", ptype="*bf16",
               comp_p="*bf16")
    meta = dict(KIND=1, STEP=True, DOT=False, ROWS=0, NL=0, NLP=1, HAS_BETA3=False, HAS_VBAR=False,
                HAS_LION=False, HAS_MOD=False, VBAR_DETACH=False, MAXIMIZE=False, DIFF=True, HAS_SCALE=False,
                HAS_INF=False, SR=True, PROUND=pround, ALIGNED=True, T_ALIGNED=True, S_VEC=8, CHUNK=8192,
                BLOCK=1024, Q8=False, TQ8=False)
    sig = {n: "i32" if n in ("tstride", "n_chunks", "first", "seed") else ptr.get(n, "*bf16")
           for n in fn.arg_names if n not in meta}
    src = ASTSource(fn=fn, signature=sig | {k: "constexpr" for k in meta}, constexprs=meta)
    ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8)).asm["ttir"]
    # m, v, s, g_prev, the parameter and Kahan's comp, in the unmasked and the masked block
    assert ttir.count("tt.store") == 2 * (5 + (pround == 2))
