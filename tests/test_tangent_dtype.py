"""bf16 tangent rows (MADA's ``tangent_dtype=torch.bfloat16``, docs/spec.md section 5.3).

What is checked, and against what:
- the stored bits against the spec's formula in plain Python integers (tests/test_state_dtype.py's
  ``_bits``/``_sr``, buffer 7 + the coefficient's canonical index), on the fp32 tangents the same
  backend forms with fp32 rows (hyper_lr = 0 keeps the two runs' coefficients, state and fp32
  tangents identical): reference, cpu and triton (interpreted), bf16 and fp32 state;
- cpu and triton against the reference: state bits equal, tangent bits equal but for the rare
  draw that falls inside a one-ulp fp32 difference (section 6's reciprocals), lagged and exact
  order, several seeds; the hyper-gradient each reports against -sum(g * widened stored row) in
  float64;
- the hyper-gradient with bf16 rows against the fp32-row one: within the bound of independent
  unbiased roundings (and the measured ratio);
- checkpoints (bitwise resume; fp32 <-> bf16 rows converted as state is), bytes per parameter,
  fp64 parameters, and the refusals (nothing changed).
"""
from __future__ import annotations

import copy

import pytest
import torch

import spec_model as spec
from mada_fused import MADA, AVGrad
from mada_fused.backends import load
from mada_fused.coefficients import COEFFICIENTS
from storage_cases import (FULL, bit_pattern, loads, needs_cpu, needs_cuda_on_cpu, needs_triton, run_threaded,
                           sr_bf16_bytes, sr_bits, stored)
from test_state_dtype import _grads

BF16, F32 = torch.bfloat16, torch.float32
BUF_TAN0 = 7  # the spec's buffer number of beta1's row


FROZEN = {n: 0.0 for n in COEFFICIENTS}  # hyper_lr: learned (tangents stored), never moving
SHAPES = [(37,), (8, 33), (1,), (300,)]  # odd sizes: alignment padding between parameters


def _run(backend: str, grads, *, tangent_dtype=BF16, state_dtype=BF16, dtype=F32, threads=None, **extra):
    params = [torch.nn.Parameter(torch.linspace(-1, 1, s.numel()).view(s.shape).to(dtype)) for s in grads[0]]
    opt = MADA(params, lr=1e-2, backend=backend, state_dtype=state_dtype, tangent_dtype=tangent_dtype,
               **{**FULL, **extra})
    run_threaded(opt, params, grads, dtype, threads)
    return opt, params


def _spec_rows(opt, params, f32_rows: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Each parameter's bf16 rows as spec 5.3 stores its fp32 rows, in plain Python integers, at
    the flat offsets of ``opt``'s bucket (bf16 rows align parameters to 8 elements, fp32 to 4)."""
    bucket = opt._buckets[0]
    learn = [COEFFICIENTS.index(n) for n in opt._hyper.cfg.learn]
    out = []
    for i, (p, rows) in enumerate(zip(params, f32_rows)):
        step, base = int(opt.state[p]["step"]), bucket.offsets[next(k for k, q in enumerate(bucket.params) if q is p)]
        flat = rows.reshape(len(learn), -1)
        words = bytearray()
        for r, j in enumerate(learn):
            for e, x in enumerate(flat[r].tolist()):
                words += sr_bf16_bytes(x, sr_bits(seed, step, BUF_TAN0 + j, base + e))[2:]  # the high half: the bf16
        out.append(torch.frombuffer(words, dtype=torch.int16).view(rows.shape).clone())
    return out


BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu), pytest.param("cuda_on_cpu", marks=needs_cuda_on_cpu),
            pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [F32, BF16])
def test_stored_rows_are_the_spec_rounding_of_the_fp32_rows(backend, state_dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read per call: Triton on CPU tensors interprets
    grads = _grads(2 if backend == "triton" else 4, SHAPES)
    seed = 977
    f32, params32 = _run(backend, grads, tangent_dtype=F32, state_dtype=state_dtype, hyper_lr=FROZEN, sr_seed=seed)
    bf, params16 = _run(backend, grads, state_dtype=state_dtype, hyper_lr=FROZEN, sr_seed=seed)
    assert {b.name for b in bf._backend_for.values()} == {backend}
    a, b = stored(f32, params32), stored(bf, params16)
    for key, x in a.items():
        if key[1] != "tangents":  # the rows' dtype changes nothing else
            assert torch.equal(bit_pattern(x), bit_pattern(b[key])), key
    want = _spec_rows(bf, params16, [a[i, "tangents"] for i in range(len(params32))], seed)
    for i, w in enumerate(want):
        got = b[i, "tangents"]
        assert got.dtype == BF16 and torch.equal(got.view(torch.int16), w), i
        assert torch.isfinite(got).all() and got.float().abs().sum() > 0


FUSED = [
    *(pytest.param("cpu", sd, order, seed, marks=needs_cpu, id=f"cpu-{str(sd)[6:]}-{order}-{seed}")
      for sd in (F32, BF16) for order in ("lagged", "exact") for seed in (0, 5, 2**32 - 1)),
    # The CUDA kernels on host threads (csrc/cuda through cuda_on_cpu.h).
    *(pytest.param("cuda_on_cpu", sd, order, seed, marks=needs_cuda_on_cpu,
                   id=f"cuda_on_cpu-{str(sd)[6:]}-{order}-{seed}")
      for sd in (F32, BF16) for order in ("lagged", "exact") for seed in (0, 2**32 - 1)),
    # The interpreter is slow: each state dtype and order once.
    *(pytest.param("triton", sd, order, 3, marks=needs_triton, id=f"triton-{str(sd)[6:]}-{order}")
      for sd in (F32, BF16) for order in ("lagged", "exact")),
]


@pytest.mark.parametrize("backend, state_dtype, order, seed", FUSED)
def test_fused_backends_store_the_reference_bits_and_sum_the_rows_they_stored(backend, state_dtype, order, seed,
                                                                             monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    grads = _grads(3 if backend == "triton" else 6, SHAPES, seed=seed % 7)
    # Frozen coefficients: a row element one bf16 ulp apart (below) moves h by up to 2^-8 of its
    # term, and a learning run would carry that into the coefficients and the state.
    kw = dict(state_dtype=state_dtype, hyper_order=order, sr_seed=seed, hyper_lr=FROZEN)
    ref_opt, ref_params = _run("reference", grads[:-1], **kw)
    opt, params = _run(backend, grads[:-1], **kw)
    assert {b.name for b in opt._backend_for.values()} == {backend}
    a, b = stored(ref_opt, ref_params), stored(opt, params)
    for key, x in a.items():
        y = b[key]
        if key[1] in ("m", "v", "n", "g_prev", "l", "step"):
            assert torch.equal(bit_pattern(x), bit_pattern(y)), key
        elif x.dtype == BF16:  # vb, s and the rows see section 6's reciprocals: a one-ulp fp32 difference,
            # which changes the rounded value only when the draw falls inside it (2^-16 per ulp)
            assert y.dtype == BF16 and (bit_pattern(x) != bit_pattern(y)).sum() <= 1 + x.numel() // 1000, key
            torch.testing.assert_close(x.float(), y.float(), rtol=2**-7, atol=1e-30)
        else:  # fp32 vb and s: to rounding
            torch.testing.assert_close(x, y, rtol=1e-5, atol=0)
    # The next step's hyper-gradient is -sum(g * row) over the rows it stored, widened exactly.
    rows = [opt.state[p]["tangents"].double() for p in params]
    spec.set_grads(params, grads[-1])
    opt.step()
    learn = opt._hyper.cfg.learn
    for r, name in enumerate(learn):
        terms = torch.cat([(g.double() * t[r]).reshape(-1) for g, t in zip(grads[-1], rows)])
        want, scale = -terms.sum().item(), terms.abs().sum().item()
        assert abs(opt.hypergradients[name] - want) <= 1e-6 * scale, name


@needs_cpu
def test_cpu_rows_do_not_depend_on_the_thread_count():
    """More than one 64K chunk, so two threads really split the work."""
    grads = _grads(3, [(150_001,), (7,)])
    one = _run("cpu", grads, threads=1)
    two = _run("cpu", grads, threads=2)
    for key, x in stored(*one).items():
        assert torch.equal(bit_pattern(x), bit_pattern(stored(*two)[key])), key
    assert one[0].hypergradients == two[0].hypergradients


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_hypergradient_with_bf16_rows_is_the_fp32_one_to_rounding(backend):
    """Same state and coefficients (hyper_lr = 0): h differs only by the rows' rounding, a sum of
    independent zero-mean errors of std <= 2^-8 |g * du/dk| each, so |dh| <= 6 sigma."""
    grads = _grads(6, [(4096,), (64, 65)])
    runs = {td: _run(backend, grads[:-1], tangent_dtype=td, hyper_lr=FROZEN) for td in (F32, BF16)}
    rows = [runs[F32][0].state[p]["tangents"].double() for p in runs[F32][1]]
    h = {}
    for td, (opt, params) in runs.items():
        spec.set_grads(params, grads[-1])
        opt.step()
        h[td] = opt.hypergradients
    for r, name in enumerate(h[F32]):
        terms = torch.cat([(g.double() * t[r]).reshape(-1) for g, t in zip(grads[-1], rows)])
        sigma = 2**-8 * terms.norm().item()
        assert abs(h[BF16][name] - h[F32][name]) <= 6 * sigma, name
        assert h[BF16][name] != h[F32][name] or sigma == 0, name  # the rows really are rounded


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_grad_scaler_skips_writes_no_row(backend, monkeypatch):
    """found_inf set: no row, buffer or parameter is written, and the next step reads the rows of
    the last successful one (spec section 5)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    opt, params = _run(backend, _grads(2, SHAPES))
    before = stored(opt, params), [p.detach().clone() for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([1.0])
    spec.set_grads(params, _grads(1, SHAPES, seed=1)[0])
    opt.step()
    for key, x in stored(opt, params).items():
        assert torch.equal(bit_pattern(x), bit_pattern(before[0][key])), key
    assert all(torch.equal(p, q) for p, q in zip(params, before[1]))


# -- checkpoints --------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("state_dtype", [F32, BF16])
def test_state_dict_resumes_bitwise(state_dtype):
    grads = _grads(8, SHAPES)
    opt, params = _run("cpu", grads[:4], state_dtype=state_dtype, sr_seed=99)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["tangents"].dtype == BF16
    start = [p.detach().clone() for p in params]
    spec.run_steps(opt, params, grads[4:])
    fresh = [torch.nn.Parameter(s.clone()) for s in start]
    other = MADA(fresh, lr=1e-2, backend="cpu", state_dtype=state_dtype, tangent_dtype=BF16, **FULL)
    other.load_state_dict(saved)
    spec.run_steps(other, fresh, grads[4:])
    for key, x in stored(opt, params).items():
        assert torch.equal(bit_pattern(x), bit_pattern(stored(other, fresh)[key])), key
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))
    assert opt.hypergradients == other.hypergradients


def test_checkpoints_convert_between_fp32_and_bf16_rows():
    """fp32 -> bf16 rounds to nearest even, once; bf16 -> fp32 widens exactly (spec 5.1, 5.3)."""
    grads = _grads(3, SHAPES)
    f32_opt, f32_params = _run("reference", grads, tangent_dtype=F32)
    params = [torch.nn.Parameter(p.detach().clone()) for p in f32_params]
    bf = MADA(params, lr=1e-2, backend="reference", state_dtype=BF16, tangent_dtype=BF16, **FULL)
    bf.load_state_dict(f32_opt.state_dict())
    for (i, name), x in stored(f32_opt, f32_params).items():
        y = bf.state[params[i]][name]
        want = x.to(BF16) if name == "tangents" else x
        assert y.dtype == want.dtype and torch.equal(y, want), name
    spec.run_steps(bf, params, grads)  # and it steps on
    back = MADA([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, backend="reference",
                state_dtype=BF16, **FULL)
    back.load_state_dict(bf.state_dict())
    for (i, name), x in stored(bf, params).items():
        y = back.state[back.param_groups[0]["params"][i]][name]
        assert y.dtype == (F32 if name == "tangents" else x.dtype) and torch.equal(y, x.to(y.dtype)), name


# -- memory, dtypes, refusals -------------------------------------------------------------------
def test_full_mada_keeps_24_bytes_per_parameter_with_bf16_state_and_rows():
    """MADA's defaults learn all six: m, v, n, g', l, vb and six rows (spec 5.3)."""
    got = {}
    for sd, td in ((F32, F32), (BF16, F32), (F32, BF16), (BF16, BF16)):
        p = torch.nn.Parameter(torch.zeros(1024))
        opt = MADA([p], backend="reference", state_dtype=sd, tangent_dtype=td)
        spec.run_steps(opt, [p], [[torch.randn(1024)]])
        got[sd, td] = sum(t.nbytes for k, t in opt.state[p].items() if k != "step") / p.numel()
    assert got == {(F32, F32): 48.0, (BF16, F32): 36.0, (F32, BF16): 36.0, (BF16, BF16): 24.0}


def test_fp64_params_keep_fp64_rows():
    p64 = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    p32 = torch.nn.Parameter(torch.randn(5))
    opt = MADA([p64, p32], lr=1e-2, backend="reference", tangent_dtype=BF16)
    spec.run_steps(opt, [p64, p32], [[torch.randn(5, dtype=torch.float64), torch.randn(5)]])
    assert opt.state[p64]["tangents"].dtype == torch.float64 and opt.state[p32]["tangents"].dtype == BF16


@pytest.mark.parametrize("bad", ["8-bit", torch.uint8, torch.float16, torch.float64, "bfloat16", None])
@pytest.mark.parametrize("cls", [MADA, AVGrad])
def test_bad_tangent_dtype_is_refused(cls, bad):
    p = torch.nn.Parameter(torch.randn(3))
    before = p.detach().clone()
    with pytest.raises(ValueError, match="tangent_dtype must be torch.float32, torch.bfloat16 or '8bit'"):
        cls([p], tangent_dtype=bad)
    assert torch.equal(p, before)


def test_every_backend_stores_bf16_rows_and_auto_picks_cpu():
    p = torch.nn.Parameter(torch.randn(4))
    for name in ("reference", "cpu", "cuda_on_cpu", "cuda", "triton"):
        if loads(name):
            assert BF16 in load(name).tangent_dtypes, name
    auto = MADA([p], tangent_dtype=BF16)
    p.grad = torch.randn(4)
    auto.step()
    assert {b.name for b in auto._backend_for.values()} <= {"cpu", "reference"}
    assert auto.state[p]["tangents"].dtype == BF16
