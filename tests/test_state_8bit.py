"""8-bit blockwise optimizer state (``state_dtype="8bit"``, docs/spec.md section 5.4).

What is checked, and against what:
- the code maps against a float64 model written from the spec's text (nearest code value
  by search, ties to the even code), their error bounds and their special values;
- one step of the reference against the float64 optimizer model (tests/spec_model.py)
  whose state goes through the same model quantizer, and a trajectory near it;
- what ``optimizer.state[p]`` shows, small parameters staying fp32, bytes per parameter;
- checkpoints: bitwise resume, fp32/bf16 <-> 8-bit conversion, 8-bit -> fp32 -> 8-bit
  bitwise; refusals that change nothing.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import spec_model as spec
from storage_cases import FULL, loads, needs_cpu, needs_triton, stored
from mada_fused import MADA, AdaMod, AVGrad, DiffMod, quant8
from mada_fused.backends import BackendUnavailable, load


CASES = {
    "mada_full": (MADA, FULL),
    "mada_adam_corner": (MADA, dict(learn=())),
    "avgrad": (AVGrad, {}),
    "adamod": (AdaMod, {}),
    "diffmod": (DiffMod, {}),
}
# Odd sizes (a partial last block, padding between parameters) and one under MIN_NUMEL.
SHAPES = [(4097,), (70, 81), (300,), (5000,)]


# -- the code maps, from the spec's text ---------------------------------------------------------
def _code_values(signed: bool) -> torch.Tensor:
    """Every magnitude code's value under scale 1: E4M3 (bias 15) or E5M3 (bias 31), subnormals."""
    bias = 15 if signed else 31
    out = []
    for mag in range(128 if signed else 256):
        e, f = mag >> 3, mag & 7
        out.append((f if e == 0 else 8 + f) * 2.0 ** (max(e, 1) - bias - 3))
    return torch.tensor(out, dtype=torch.float64)


def _model_quantize(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float64 model: per 256-element block, scale 2^floor(log2 max|x|) (>= 2^-126), each
    value to the nearest code value (ties to the even code), saturating; returns the values."""
    values = _code_values(signed)
    out = torch.empty_like(x, dtype=torch.float64)
    for lo in range(0, x.numel(), quant8.BLOCK):
        b = x[lo: lo + quant8.BLOCK].double()
        top = b.abs().max().item()
        scale = 2.0 ** max(math.floor(math.log2(top)), -126) if top >= 2.0 ** -126 else 2.0 ** -126
        y = b.abs() / scale
        dist = (y.unsqueeze(1) - values.unsqueeze(0)).abs()
        best = dist.min(dim=1, keepdim=True).values
        ties = dist == best
        mag = torch.where(ties.sum(1) > 1, (ties & (torch.arange(len(values)) % 2 == 0)).int().argmax(1),
                          ties.int().argmax(1))
        v = values[mag] * scale
        if signed:
            v = torch.where(b < 0, -v, v)
        else:
            v = torch.where(b < 0, 0.0, v)
        out[lo: lo + quant8.BLOCK] = torch.where(b.abs() < 2.0 ** -126, 0.0, v)
    return out


def _wide(n: int, seed: int, signed: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)
    return x if signed else x.abs()


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_the_nearest_code_values_of_the_model(signed):
    x = _wide(4 * 256 + 77, 0, signed)
    x[5] = 0.0
    x[300] = 1.0  # a block whose max is a power of two
    x[301:340] = torch.tensor(0.5 * 1.0625).expand(39)  # a tie between two codes: to the even one
    if not signed:
        x[7] = -3.0  # a negative value under the unsigned map stores 0
    codes, scale = quant8.quantize(x, signed)
    assert codes.dtype == torch.uint8 and scale.dtype == torch.float32 and scale.numel() == 5
    got = quant8.dequantize(codes, scale, signed)
    assert torch.equal(got.double(), _model_quantize(x, signed))


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_bounds_and_every_code_decodes_to_itself(signed):
    x = _wide(256 * 40, 1, signed)
    codes, scale = quant8.quantize(x, signed)
    got = quant8.dequantize(codes, scale, signed).double()
    each = scale.repeat_interleave(256).double()
    bias = quant8.exponent_bias(signed)
    # Normal codes: half of a 3-bit mantissa's ulp, 2^-4 relative; subnormal ones: half their step.
    bound = torch.maximum(x.double().abs() * 2.0 ** -4, each * 2.0 ** (-bias - 3))
    assert ((got - x.double()).abs() <= bound).all()
    mags = torch.arange(quant8.max_magnitude(signed) + 1)
    for s in (1.0, 2.0 ** -80, 2.0 ** 100):  # every value a normal fp32 number (others flush to 0)
        unit = torch.full((len(mags),), s)
        values = quant8.q8_decode(mags, unit, signed)
        assert (values[1:] > values[:-1]).all()
        assert torch.equal(quant8.q8_encode(values, unit, signed), mags)
        if signed:
            assert torch.equal(quant8.q8_encode(-values[1:], unit[1:], signed), mags[1:] | 0x80)


@pytest.mark.parametrize("signed", [True, False])
def test_codes_decoded_to_bf16_encode_back_to_the_same_codes_and_scales(signed):
    """The DCP form of 8-bit state (distributed._dcp_form, docs/spec.md 5.4): a code's value
    has 4 significant bits and is 0 or at least 2^-126, so bf16 holds it exactly, and the
    block's largest one stays in the top binade, so its scale comes back too; blocks at
    scales from 2^-126 (values down to the fp32 normal limit and below) to 2^96 and more."""
    exps = torch.arange(-170, 100, 7).repeat_interleave(256)
    x = _wide(len(exps), 2, signed) * 2.0 ** exps
    codes, scale = quant8.quantize(x, signed)
    assert scale.min().item() == 2.0 ** -126 and scale.max().item() >= 2.0 ** 96 and scale.isfinite().all()
    values = quant8.dequantize(codes, scale, signed)
    assert torch.equal(values.to(torch.bfloat16).float(), values)
    assert ((values == 0) | (values.abs() >= 2.0 ** -126)).all()
    again = quant8.quantize(values.to(torch.bfloat16).float(), signed)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scale)


def test_a_block_with_an_inf_or_nan_is_lost_and_the_others_are_not():
    x = torch.randn(1024)
    x[3], x[700] = float("inf"), float("nan")
    codes, scale = quant8.quantize(x, True)
    assert scale[0].isnan() and scale[2].isnan() and scale[[1, 3]].isfinite().all()
    assert (codes[:256] == 0).all() and (codes[512:768] == 0).all()
    got = quant8.dequantize(codes, scale, True)
    assert got[:256].isnan().all() and got[256:512].isfinite().all()


def test_tiny_blocks_and_fp32_subnormals_store_zero():
    x = torch.full((256,), 1e-40)
    codes, scale = quant8.quantize(x, False)
    assert (codes == 0).all() and scale[0].item() == 2.0 ** -126


# -- the optimizer ---------------------------------------------------------------------------------
def _grads(steps: int, shapes=SHAPES, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * (1 + i) for i, s in enumerate(shapes)] for _ in range(steps)]


def _run(case: str, grads, backend: str = "reference", dtype=torch.float32, state_dtype="8bit", **extra):
    cls, kw = CASES[case]
    params = [torch.nn.Parameter(torch.linspace(-1, 1, s.numel()).view(s.shape).to(dtype)) for s in grads[0]]
    opt = cls(params, lr=1e-2, backend=backend, state_dtype=state_dtype, **kw, **extra)
    spec.run_steps(opt, params, [[g.to(dtype) for g in gs] for gs in grads])
    return opt, params


def _model(case: str, theta: torch.Tensor, grads, quantize: bool):
    """The float64 spec model, its state quantized by the model quantizer after each step."""
    cls, kw = CASES[case]
    state = {} if cls in (AdaMod, DiffMod, AVGrad) else spec.mada_init_state(theta)
    for g in grads:
        g = g.double()
        if cls in (AdaMod, DiffMod):
            theta, state = spec.adamod_step(theta, g, state, lr=1e-2, diff_friction=cls is DiffMod,
                                            **({"beta3": 0.999} if cls is AdaMod else {}))
        elif cls is AVGrad:
            theta, state = spec.avgrad_step(theta, g, state, lr=1e-2)
        else:
            coef = {"beta1": 0.9, "beta2": 0.999, "beta3": kw.get("beta3", 0.0), "rho": kw.get("rho", 1.0),
                    "c": kw.get("c", 1.0), "gamma": kw.get("gamma", 1.0)}
            theta, state, _, _ = spec.mada_step(theta, g, state, spec.kdict(spec.kvec(coef)), lr=1e-2,
                                                mod_beta=kw.get("mod_beta", 0.0))
        if quantize:
            state = {k: _model_quantize(v, quant8.is_signed(k)) if isinstance(v, torch.Tensor) and v.dim() else v
                     for k, v in state.items()}
    return theta


@pytest.mark.parametrize("case", ["mada_adam_corner", "adamod", "diffmod"])
def test_trajectory_follows_the_float64_model_of_the_same_quantization(case):
    """The reference (fp32 arithmetic) against the float64 model quantizing its state the same
    way: a value within an fp32 rounding of a tie between two codes may take the other code, so
    the trajectories are close, not equal. Both sit far nearer each other than the fp32-state run
    does to either, which is the size of the quantization's own effect."""
    grads = _grads(20, shapes=[(4096,)])
    theta0 = torch.linspace(-1, 1, 4096).double()
    model = _model(case, theta0, [g for (g,) in grads], quantize=True) - theta0
    _, (p,) = _run(case, grads)
    _, (q,) = _run(case, grads, state_dtype=torch.float32)
    ref, fp32 = p.detach().double() - theta0, q.detach().double() - theta0
    err = ((ref - model).norm() / model.norm()).item()
    effect = ((fp32 - model).norm() / model.norm()).item()
    assert err < 1e-3 and effect > 10 * err, (err, effect)


@pytest.mark.parametrize("case", list(CASES))
def test_state_view_shows_codes_and_scales_and_small_params_stay_fp32(case):
    opt, params = _run(case, _grads(2))
    names = opt._state_names()
    for p in params[:2] + params[3:]:
        st = opt.state[p]
        assert {n for n in st if n.endswith("_scale")} == {f"{n}_scale" for n in names}
        for n in names:
            assert st[n].dtype == torch.uint8 and st[n].shape == p.shape
            assert st[f"{n}_scale"].dtype == torch.float32
            assert st[f"{n}_scale"].shape == (quant8.num_blocks(p.numel()),)
        assert (st["m"] != 0).any() and st["m_scale"].isfinite().all()
    small = opt.state[params[2]]
    assert {t.dtype for k, t in small.items() if k != "step"} == {torch.float32}
    assert not any(k.endswith("_scale") for k in small)
    for b in opt._buckets:  # no 8-bit block holds two parameters
        assert all(o % quant8.BLOCK == 0 for o in b.offsets) or b.state_dtype == torch.float32


def test_bf16_and_fp64_params():
    p16 = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
    p64 = torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))
    opt = MADA([p16, p64], lr=1e-2, beta3=0.2, state_dtype="8bit")
    spec.run_steps(opt, [p16, p64], [[torch.randn(5000, dtype=torch.bfloat16), torch.randn(5000).double()]])
    assert opt.state[p16]["m"].dtype == torch.uint8 and opt.state[p16]["tangents"].dtype == torch.float32
    assert {t.dtype for k, t in opt.state[p64].items() if k != "step"} == {torch.float64}


def test_a_step_grad_scaler_skips_stores_nothing():
    opt, params = _run("mada_full", _grads(2))
    snap = spec.snapshot(opt, params)
    opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([1.0])
    spec.set_grads(params, _grads(1, seed=1)[0])
    opt.step()
    spec.assert_unchanged(snap, opt, params)


def test_full_mada_bytes_per_parameter():
    """Six buffers of 1 byte plus 4 bytes per 256-element scale, and six fp32 tangent rows."""
    p = torch.nn.Parameter(torch.zeros(256 * 64))
    opt = MADA([p], state_dtype="8bit")
    spec.run_steps(opt, [p], [[torch.randn(p.numel())]])
    measured = sum(t.nbytes for k, t in opt.state[p].items() if k != "step") / p.numel()
    assert measured == 6 * (1 + 4 / 256) + 6 * 4


# -- fused backends: the reference's codes and scales -------------------------------------------
# Codes of buffers whose fp32 values the backends form by the same operations are equal; vb
# and s go through a bias correction or 1/t that the fused backends multiply by a reciprocal
# and the reference divides by (spec section 6): one fp32 ulp apart, which changes a code only
# when the value sits within that ulp of a rounding boundary (or a power of two, for a scale).
SAME_OPS = ("m", "v", "n", "g_prev", "l")


def _assert_same_state(a: dict, b: dict, adamod: bool) -> None:
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        assert x.dtype == y.dtype, key
        name = key[1].removesuffix("_scale")
        if x.dtype == torch.uint8 or key[1].endswith("_scale"):
            if name in SAME_OPS or adamod:
                assert torch.equal(x, y), key
            else:
                assert (x != y).sum().item() <= 1 + x.numel() // 1000, key
        elif key[1] == "step":
            assert torch.equal(x, y)
        else:  # small parameters' fp32 state and the tangent rows: to rounding
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * x.abs().max().item())


FUSED = [
    *(pytest.param("cpu", dtype, case, marks=needs_cpu, id=f"cpu-{case}-{str(dtype)[6:]}")
      for case in CASES for dtype in (torch.float32, torch.bfloat16)),
    # The Triton interpreter (CPU tensors) is slow: every case on fp32 parameters, one on bf16.
    *(pytest.param("triton", torch.float32, case, marks=needs_triton, id=f"triton-{case}") for case in CASES),
    pytest.param("triton", torch.bfloat16, "mada_full", marks=needs_triton, id="triton-mada_full-bfloat16"),
]


@pytest.mark.parametrize("backend, dtype, case", FUSED)
def test_fused_backends_store_the_reference_codes_and_scales(backend, dtype, case, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read per call: Triton on CPU tensors interprets
    grads = _grads(4 if backend == "cpu" else 2)
    a = stored(*_run(case, grads, "reference", dtype))
    b = stored(*_run(case, grads, backend, dtype))
    _assert_same_state(a, b, CASES[case][0] in (AdaMod, DiffMod))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("mode", [dict(kahan_sum=True), dict(bf16_stochastic_round=True)], ids=["kahan", "sr"])
@pytest.mark.parametrize("case", ["adamod", "diffmod"])
def test_bf16_params_without_master_weights_over_8bit_state(backend, mode, case, monkeypatch):
    """spec 5.2's parameter stores on top of 8-bit state: the fused backends step a block at
    its flat offset, so the Kahan compensation and the parameter's random bits are the
    reference's. AdaMod and DiffMod form every value by the reference's operations: all bits equal."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    grads = _grads(3 if backend == "cpu" else 1, shapes=[(4097,), (70, 81)])
    (oa, pa), (ob, pb) = (_run(case, grads, b, torch.bfloat16, **mode) for b in ("reference", backend))
    for p, q in zip(pa, pb):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
    spec.deep_equal(stored(oa, pa), stored(ob, pb))
    assert oa.state[pa[0]]["m"].dtype == torch.uint8


@needs_triton
@pytest.mark.parametrize("kind, tq8", [(0, False), (1, False), (0, True)],
                         ids=["mada_full", "diffmod", "mada_full-8bit_rows"])
def test_triton_compiles_the_8bit_state_path(kind, tq8):
    """The compiled kernel (not only the interpreter) takes the 8-bit path: compiled to TTIR for
    an H100 target (no GPU needed), every state buffer's codes and scales stored in both the
    unmasked and the masked block, and a max-reduction per 256 elements forming the scales;
    with 8-bit tangent rows (spec 5.5) each row's codes and scales too."""
    import triton
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mada_fused.triton_kernels import launch

    fn = launch.kernels(False).fused_step
    ptr = dict(table="*i64", coef="*fp64", steps="*fp64", consts="*fp64", partial="*fp64", qsc="*i64",
               tan="*u8" if tq8 else "*fp32", ptype="*fp32", scale_p="*fp32", inf_p="*fp32", lr_p="*fp64", wd_p="*fp64")
    mada = kind == 0
    meta = dict(KIND=kind, STEP=True, DOT=mada, ROWS=sum(k << (3 * k) for k in range(6)) if mada else 0,
                NL=6 if mada else 0, NLP=8 if mada else 1, HAS_BETA3=mada, HAS_VBAR=mada, HAS_LION=mada,
                HAS_MOD=mada, VBAR_DETACH=False, MAXIMIZE=False, DIFF=not mada, HAS_SCALE=False, HAS_INF=False,
                SR=False, PROUND=0, ALIGNED=True, T_ALIGNED=True, S_VEC=16, CHUNK=8192, BLOCK=1024, Q8=True,
                TQ8=tq8)
    sig = {n: "i32" if n in ("tstride", "n_chunks", "first", "seed") else ptr.get(n, "*u8")
           for n in fn.arg_names if n not in meta}
    src = ASTSource(fn=fn, signature=sig | {k: "constexpr" for k in meta}, constexprs=meta)
    ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8)).asm["ttir"]
    buffers = 7 if mada else 4
    # codes and scales of each buffer, the parameter (and MADA's six tangent rows), per block kind
    assert ttir.count("tt.store") >= 2 * (2 * buffers + 1 + (2 * 6 if tq8 else 0))
    assert "tt.reduce" in ttir and "tt.reshape" in ttir


@needs_cpu
def test_cpu_8bit_state_with_bf16_tangent_rows():
    """Full MADA at 18.1 bytes per parameter (spec 5.3's bf16 rows over 8-bit state): the cpu
    backend stores the reference's codes and scales, and rows within a bf16 ulp of them."""
    grads = _grads(4)
    a = stored(*_run("mada_full", grads, "reference", tangent_dtype=torch.bfloat16))
    b = stored(*_run("mada_full", grads, "cpu", tangent_dtype=torch.bfloat16))
    for key, x in a.items():
        if key[1] == "tangents":
            assert x.dtype == b[key].dtype == torch.bfloat16 and x.isfinite().all()
            torch.testing.assert_close(x.float(), b[key].float(), rtol=2**-7, atol=1e-3 * x.float().abs().max().item())
            b[key] = x
    _assert_same_state(a, b, adamod=False)


@needs_cpu
@pytest.mark.parametrize("case", ["mada_full", "mada_adam_corner", "diffmod"])
def test_cpu_codes_do_not_depend_on_the_thread_count(case):
    """More than one 64K chunk, segments of odd sizes: two threads split inside a segment,
    only ever on a block boundary."""
    grads = _grads(3, shapes=[(150_001,), (70_001,), (7,)])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(case, grads, "cpu")
        torch.set_num_threads(2)
        two = _run(case, grads, "cpu")
    finally:
        torch.set_num_threads(old)
    spec.deep_equal(stored(*one), stored(*two))
    assert all(torch.equal(p, q) for p, q in zip(one[1], two[1]))


@needs_cpu
def test_cpu_grad_scaler_skip_stores_nothing():
    opt, params = _run("mada_full", _grads(2), "cpu")
    snap = spec.snapshot(opt, params)
    opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([1.0])
    spec.set_grads(params, _grads(1, seed=1)[0])
    opt.step()
    spec.assert_unchanged(snap, opt, params)


# -- checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mada_full", "adamod", "diffmod"])
def test_state_dict_resumes_bitwise(case):
    grads = _grads(4)
    whole, wp = _run(case, grads)
    half, hp = _run(case, grads[:2])
    cls, kw = CASES[case]
    params = [torch.nn.Parameter(p.detach().clone()) for p in hp]
    fresh = cls(params, lr=1e-2, backend="reference", state_dtype="8bit", **kw)
    fresh.load_state_dict(copy.deepcopy(half.state_dict()))
    spec.run_steps(fresh, params, grads[2:])
    spec.deep_equal(fresh.state_dict(), whole.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(params, wp))


@pytest.mark.parametrize("case", ["mada_full", "adamod"])
def test_checkpoints_convert_between_fp32_bf16_and_8bit(case):
    cls, kw = CASES[case]
    opt8, params = _run(case, _grads(3))
    sd8 = opt8.state_dict()
    for other in (torch.float32, torch.bfloat16):
        o = cls([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_dtype=other, **kw)
        o.load_state_dict(copy.deepcopy(sd8))  # 8-bit codes to values
        back = cls([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_dtype="8bit", **kw)
        back.load_state_dict(o.state_dict())  # and to codes again
        for i, p in enumerate(params):
            for n in o._state_names():
                want = quant8.dequantize(sd8["state"][i][n].reshape(-1), sd8["state"][i][f"{n}_scale"],
                                         quant8.is_signed(n)) if f"{n}_scale" in sd8["state"][i] \
                    else sd8["state"][i][n].reshape(-1)
                assert torch.equal(o.state_dict()["state"][i][n].reshape(-1), want.to(other)), (other, i, n)
        if other == torch.float32:  # every code value is an fp32 value: nothing is lost
            spec.deep_equal(back.state_dict()["state"], sd8["state"])
    # fp32 state into 8-bit: quantized as a step stores it.
    o32, p32 = _run(case, _grads(3), state_dtype=torch.float32)
    o8 = cls([torch.nn.Parameter(p.detach().clone()) for p in p32], lr=1e-2, state_dtype="8bit", **kw)
    o8.load_state_dict(o32.state_dict())
    st = o32.state_dict()["state"][0]
    codes, scale = quant8.quantize(st["m"].reshape(-1), True)
    assert torch.equal(o8.state[o8.param_groups[0]["params"][0]]["m"].reshape(-1), codes)
    assert torch.equal(o8.state[o8.param_groups[0]["params"][0]]["m_scale"], scale)


@pytest.mark.parametrize("corrupt, why", [
    (lambda st: st.__setitem__("v_scale", st["v_scale"] * 1.5), "not 8-bit block scales"),
    (lambda st: st.__setitem__("v_scale", st["v_scale"] * float("nan")), "not 8-bit block scales"),
    (lambda st: st.pop("m_scale"), "expected"),
    (lambda st: st.__setitem__("m_scale", st["m_scale"][:-1]), "shape"),
    (lambda st: st.__setitem__("m", st["m"].to(torch.int8)), "entries"),
])
def test_a_corrupt_8bit_checkpoint_is_refused_and_changes_nothing(corrupt, why):
    opt, params = _run("mada_full", _grads(2))
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd["state"][0])
    snap = spec.snapshot(opt, params)
    with pytest.raises(ValueError, match=why):
        opt.load_state_dict(sd)
    spec.assert_unchanged(snap, opt, params)


def test_adam_state_converts_into_an_8bit_optimizer():
    """convert.from_adam's layout holds small and large parameters in one bucket: loading splits it."""
    from mada_fused.convert import from_adam
    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(10))]
    adam = torch.optim.Adam(params, lr=1e-2)
    spec.run_steps(adam, params, [[torch.randn(5000), torch.randn(10)]] * 2)
    opt = AdaMod(params, lr=1e-2, state_dtype="8bit")
    opt.load_state_dict(from_adam(adam.state_dict(), opt))
    assert opt.state[params[0]]["m"].dtype == torch.uint8 and opt.state[params[1]]["m"].dtype == torch.float32
    got = quant8.dequantize(opt.state[params[0]]["m"], opt.state[params[0]]["m_scale"], True)
    assert torch.equal(got, _model_quantize(adam.state[params[0]]["exp_avg"], True).float())


# -- backends and refusals -------------------------------------------------------------------------
def test_auto_picks_a_backend_that_stores_8bit_and_named_ones_that_cannot_refuse():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = AdaMod([p], state_dtype="8bit")
    p.grad = torch.randn(5000)
    opt.step()
    (backend,) = {b.name for b in opt._backend_for.values()}
    assert backend == ("cpu" if loads("cpu") else "reference")
    for name in ("cuda_on_cpu", "cuda"):
        try:
            load(name)
        except BackendUnavailable:
            continue
        with pytest.raises(ValueError, match=rf"backend '{name}' cannot store '8bit' optimizer state"):
            MADA([p], backend=name, state_dtype="8bit")


@pytest.mark.parametrize("bad", ["8-bit", "int8", torch.uint8, torch.int8])
def test_bad_state_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="state_dtype must be"):
        MADA([torch.nn.Parameter(torch.randn(3))], state_dtype=bad)
