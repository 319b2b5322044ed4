"""8-bit tangent rows (MADA's ``tangent_dtype="8bit"`` with ``state_dtype="8bit"``,
docs/spec.md section 5.5).

What is checked, and against what:
- each backend's stored rows against quant8's row quantizer (the code maps of 5.4, which
  tests/test_state_8bit.py holds to a float64 model) applied to the fp32 rows the same backend
  forms with fp32 rows: hyper_lr = 0 keeps the two runs' coefficients and state identical, so
  codes and scales must be equal bit for bit; parameters under 4,096 elements keep fp32 rows;
- cpu and triton against the reference: the same codes and scales but where a one-ulp fp32
  difference (section 6's reciprocals) lands on a rounding boundary, lagged and exact order;
  the hyper-gradient each reports against -sum(g * decoded stored row) in float64;
- the hyper-gradient from 8-bit rows against the fp32-row one: within the codes' error bound;
- checkpoints (bitwise resume; fp32 / bf16 <-> 8-bit rows converted, 8-bit -> fp32 -> 8-bit
  bitwise; corrupt scales refused), bytes per parameter, fp64 parameters, the refusals.
"""
from __future__ import annotations

import copy

import pytest
import torch

import spec_model as spec
from mada_fused import MADA, AVGrad, quant8
from mada_fused.backends import BackendUnavailable, load
from mada_fused.coefficients import COEFFICIENTS
from storage_cases import FULL, loads, needs_cpu, needs_triton, run_threaded, stored
from test_state_8bit import _assert_same_state

Q8, BF16, F32 = "8bit", torch.bfloat16, torch.float32
FROZEN = {n: 0.0 for n in COEFFICIENTS}  # hyper_lr: learned (rows stored), never moving
# Odd sizes (a partial last block, padding between parameters) and one under MIN_NUMEL.
SHAPES = [(4097,), (70, 81), (300,)]
# The Triton interpreter is slow (CI's budget): Triton runs in one test, on fewer elements.
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu)]
SMALL = [(4097,), (300,)]


def _grads(steps: int, shapes=SHAPES, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * (1 + i) for i, s in enumerate(shapes)] for _ in range(steps)]


def _run(backend: str, grads, *, tangent_dtype=Q8, state_dtype=Q8, dtype=F32, threads=None, **extra):
    params = [torch.nn.Parameter(torch.linspace(-1, 1, s.numel()).view(s.shape).to(dtype)) for s in grads[0]]
    opt = MADA(params, lr=1e-2, backend=backend, state_dtype=state_dtype, tangent_dtype=tangent_dtype,
               **{**FULL, **extra})
    run_threaded(opt, params, grads, dtype, threads)
    return opt, params


def _decoded(opt, p) -> torch.Tensor:
    """Parameter ``p``'s stored rows as fp32 values, (L, numel)."""
    st = opt.state[p]
    rows = st["tangents"].reshape(len(st["tangents"]), -1)
    return quant8.dequantize_rows(rows, st["tangents_scale"]) if "tangents_scale" in st else rows.float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stored_rows_are_the_quantized_fp32_rows(backend):
    grads = _grads(3)
    f32, params32 = _run(backend, grads, tangent_dtype=F32, hyper_lr=FROZEN)
    q8, params8 = _run(backend, grads, hyper_lr=FROZEN)
    assert {b.name for b in q8._backend_for.values()} == {backend}
    a, b = stored(f32, params32), stored(q8, params8)
    for key, x in a.items():
        if key[1] != "tangents":  # the rows' storage changes nothing else
            assert torch.equal(x, b[key]), key
    for i, p in enumerate(params8):
        rows = a[i, "tangents"]
        if p.numel() < quant8.MIN_NUMEL:  # the fp32 bucket keeps fp32 rows
            assert "tangents_scale" not in q8.state[p] and torch.equal(b[i, "tangents"], rows)
            continue
        codes, scales = quant8.quantize_rows(rows.reshape(len(rows), -1))
        assert b[i, "tangents"].dtype == torch.uint8 and b[i, "tangents"].shape == rows.shape
        assert torch.equal(b[i, "tangents"].reshape(codes.shape), codes), i
        assert torch.equal(b[i, "tangents_scale"], scales), i
        assert scales.isfinite().all() and (codes != 0).any()


ORDERS = [
    *(pytest.param("reference", order, id=f"reference-{order}") for order in ("lagged", "exact")),
    *(pytest.param("cpu", order, marks=needs_cpu, id=f"cpu-{order}") for order in ("lagged", "exact")),
    pytest.param("triton", "lagged", marks=needs_triton, id="triton-lagged"),
]


@pytest.mark.parametrize("backend, order", ORDERS)
def test_backends_store_the_reference_codes_and_sum_the_rows_they_stored(backend, order, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read per call: Triton on CPU tensors interprets
    grads = _grads(3, SMALL) if backend == "triton" else _grads(4)
    # Frozen coefficients: a row code one step apart (below) moves h by up to 1/8 of its term,
    # and a learning run would carry that into the coefficients and the state.
    kw = dict(hyper_order=order, hyper_lr=FROZEN)
    ref = _run("reference", grads[:-1], **kw)
    opt, params = ref if backend == "reference" else _run(backend, grads[:-1], **kw)
    a, b = stored(*ref), stored(opt, params)
    for key in [k for k in a if k[1] in ("tangents", "tangents_scale")]:
        x, y = a.pop(key), b.pop(key)
        assert x.dtype == y.dtype, key
        if x.dtype == torch.uint8:  # codes: the rows are formed through vb and the reciprocals of
            # section 6, so a value one fp32 ulp from a rounding boundary may take the next code
            diff = x.to(torch.int32) != y.to(torch.int32)
            assert diff.sum() <= 1 + x.numel() // 1000, key
            assert ((x.to(torch.int32) - y.to(torch.int32)).abs()[diff] == 1).all(), key
        elif key[1] == "tangents_scale":
            assert (x != y).sum() <= 1, key
        else:  # the small parameter's fp32 rows
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * x.abs().max().item())
    _assert_same_state(a, b, adamod=False)
    # The next step's hyper-gradient is -sum(g * row) over the rows it stored, decoded.
    rows = [_decoded(opt, p).double() for p in params]
    spec.set_grads(params, grads[-1])
    opt.step()
    for r, name in enumerate(opt._hyper.cfg.learn):
        terms = torch.cat([g.double().reshape(-1) * t[r] for g, t in zip(grads[-1], rows)])
        assert abs(opt.hypergradients[name] - -terms.sum().item()) <= 1e-6 * terms.abs().sum().item(), name


@needs_cpu
def test_cpu_rows_do_not_depend_on_the_thread_count():
    """More than one 64K chunk, so two threads really split the work (on block boundaries)."""
    grads = _grads(3, [(150_001,), (7,)])
    one = _run("cpu", grads, threads=1)
    two = _run("cpu", grads, threads=2)
    spec.deep_equal(stored(*one), stored(*two))
    assert one[0].hypergradients == two[0].hypergradients


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_hypergradient_with_8bit_rows_is_the_fp32_one_within_the_codes_error(backend):
    """Same state and coefficients (hyper_lr = 0): h differs only by the rows' rounding, each
    element's error at most half a code step (5.4's bound: 2^-4 of the value, or half the
    subnormal step 2^-18 of its block's scale), so |dh| <= sum |g| * that bound; and with
    random signs the errors cancel far below it."""
    grads = _grads(6, [(4096,), (64, 65)])
    runs = {td: _run(backend, grads[:-1], tangent_dtype=td, hyper_lr=FROZEN) for td in (F32, Q8)}
    f32_opt, f32_params = runs[F32]
    rows = [f32_opt.state[p]["tangents"].reshape(len(f32_opt.state[p]["tangents"]), -1).double()
            for p in f32_params]
    h = {}
    for td, (opt, params) in runs.items():
        spec.set_grads(params, grads[-1])
        opt.step()
        h[td] = opt.hypergradients
    for r, name in enumerate(h[F32]):
        g = torch.cat([x.double().reshape(-1) for x in grads[-1]])
        t = torch.cat([x[r] for x in rows])
        scale = torch.cat([quant8.q8_scale(x[r].float()).double().repeat_interleave(quant8.BLOCK)[: x.shape[1]]
                           for x in rows])
        bound = (g.abs() * torch.maximum(t.abs() * 2.0**-4, scale * 2.0**-18)).sum().item()
        dh = abs(h[Q8][name] - h[F32][name])
        assert dh <= bound * (1 + 1e-6), name
        assert dh <= bound / 8 or bound == 0, name  # they cancel: far below the worst case
        assert dh > 0 or bound == 0, name  # the rows really are coded


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_grad_scaler_skips_writes_no_row(backend):
    opt, params = _run(backend, _grads(2))
    snap = spec.snapshot(opt, params)
    opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([1.0])
    spec.set_grads(params, _grads(1, seed=1)[0])
    opt.step()
    spec.assert_unchanged(snap, opt, params)


# -- checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_state_dict_resumes_bitwise(backend):
    grads = _grads(6)
    opt, params = _run(backend, grads[:3])
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["tangents"].dtype == torch.uint8 and "tangents_scale" in saved["state"][0]
    start = [p.detach().clone() for p in params]
    spec.run_steps(opt, params, grads[3:])
    fresh = [torch.nn.Parameter(s.clone()) for s in start]
    other = MADA(fresh, lr=1e-2, backend=backend, state_dtype=Q8, tangent_dtype=Q8, **FULL)
    other.load_state_dict(saved)
    spec.run_steps(other, fresh, grads[3:])
    spec.deep_equal(stored(opt, params), stored(other, fresh))
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))
    assert opt.hypergradients == other.hypergradients


def test_checkpoints_convert_between_fp32_bf16_and_8bit_rows():
    grads = _grads(3)
    q8, params = _run("reference", grads)
    sd8 = q8.state_dict()
    for other in (F32, BF16):
        o = MADA([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, backend="reference",
                 state_dtype=Q8, tangent_dtype=other, **FULL)
        o.load_state_dict(copy.deepcopy(sd8))  # codes to values
        for i, p in enumerate(params):
            want = _decoded(q8, p).to(other).view(q8.state[p]["tangents"].shape)
            assert torch.equal(o.state_dict()["state"][i]["tangents"], want), (other, i)
        back = MADA([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, backend="reference",
                    state_dtype=Q8, tangent_dtype=Q8, **FULL)
        back.load_state_dict(o.state_dict())  # and to codes again
        if other == F32:  # every code value is an fp32 value: nothing is lost
            spec.deep_equal(back.state_dict()["state"], sd8["state"])
    # fp32 rows into 8-bit ones: coded as a step stores them.
    o32, p32 = _run("reference", grads, tangent_dtype=F32)
    o8 = MADA([torch.nn.Parameter(p.detach().clone()) for p in p32], lr=1e-2, backend="reference",
              state_dtype=Q8, tangent_dtype=Q8, **FULL)
    o8.load_state_dict(o32.state_dict())
    st, mine = o32.state_dict()["state"][1], o8.state[o8.param_groups[0]["params"][1]]
    codes, scales = quant8.quantize_rows(st["tangents"].reshape(len(st["tangents"]), -1))
    assert torch.equal(mine["tangents"].reshape(codes.shape), codes) and torch.equal(mine["tangents_scale"], scales)


@pytest.mark.parametrize("corrupt, why", [
    (lambda st: st.__setitem__("tangents_scale", st["tangents_scale"] * 1.5), "not 8-bit block scales"),
    (lambda st: st.pop("tangents_scale"), "expected"),
    (lambda st: st.__setitem__("tangents_scale", st["tangents_scale"][:, :-1]), "shape"),
    (lambda st: st.__setitem__("tangents", st["tangents"].to(torch.int8)), "entries"),
])
def test_a_corrupt_checkpoint_is_refused_and_changes_nothing(corrupt, why):
    opt, params = _run("reference", _grads(2, SMALL))
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd["state"][0])
    snap = spec.snapshot(opt, params)
    with pytest.raises(ValueError, match=why):
        opt.load_state_dict(sd)
    spec.assert_unchanged(snap, opt, params)


# -- memory, dtypes, refusals -------------------------------------------------------------------
def test_full_mada_keeps_12_2_bytes_per_parameter():
    """Six 8-bit buffers and six 8-bit rows, each 1 byte plus a 4-byte scale per 256 elements."""
    p = torch.nn.Parameter(torch.zeros(256 * 64))
    opt = MADA([p], backend="reference", state_dtype=Q8, tangent_dtype=Q8)
    spec.run_steps(opt, [p], [[torch.randn(p.numel())]])
    measured = sum(t.nbytes for k, t in opt.state[p].items() if k != "step") / p.numel()
    assert measured == 12 * (1 + 4 / 256)


def test_fp64_and_bf16_params():
    p64 = torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))
    p16 = torch.nn.Parameter(torch.randn(5000, dtype=BF16))
    opt = MADA([p64, p16], lr=1e-2, backend="reference", state_dtype=Q8, tangent_dtype=Q8)
    spec.run_steps(opt, [p64, p16], [[torch.randn(5000, dtype=torch.float64), torch.randn(5000, dtype=BF16)]])
    assert opt.state[p64]["tangents"].dtype == torch.float64 and "tangents_scale" not in opt.state[p64]
    assert opt.state[p16]["tangents"].dtype == torch.uint8


@pytest.mark.parametrize("state_dtype", [F32, BF16])
@pytest.mark.parametrize("cls", [MADA, AVGrad])
def test_8bit_rows_without_8bit_state_are_refused(cls, state_dtype):
    p = torch.nn.Parameter(torch.randn(5000))
    with pytest.raises(ValueError, match="tangent_dtype='8bit' needs state_dtype='8bit'"):
        cls([p], state_dtype=state_dtype, tangent_dtype=Q8)


def test_backends_that_store_8bit_rows_and_named_ones_that_cannot_refuse():
    p = torch.nn.Parameter(torch.randn(5000))
    auto = MADA([p], state_dtype=Q8, tangent_dtype=Q8)
    p.grad = torch.randn(5000)
    auto.step()
    (backend,) = {b.name for b in auto._backend_for.values()}
    assert backend == ("cpu" if loads("cpu") else "reference")
    for name in ("cuda_on_cpu", "cuda"):
        try:
            load(name)
        except BackendUnavailable:
            continue
        assert torch.uint8 not in load(name).tangent_dtypes
        with pytest.raises(ValueError, match=rf"backend '{name}' cannot store '8bit'"):
            MADA([p], backend=name, state_dtype=Q8, tangent_dtype=Q8)
