"""bf16 optimizer state (``state_dtype=torch.bfloat16``, docs/spec.md section 5.1).

What is checked, and against what:
- the hash and the stochastic rounding of the reference against plain Python integers
  written from the spec's formulas;
- the ``cpu``, ``cuda_on_cpu`` (the CUDA kernels on host threads) and ``triton``
  (interpreted) backends' stored bits against the reference's, ``cuda_on_cpu``'s against
  ``cpu``'s (with missing grads and unaligned parameters), and ``cpu`` against itself on one
  and two threads;
- the trajectory against the float64 model of the spec (tests/spec_model.py), and the
  property SR exists for: an EMA whose steps are below half a bf16 ulp still moves;
- AdaMod/DiffMod groups with their own betas and maximize in one bucket: maximizing g
  stores the bits of minimizing -g, on every backend;
- checkpoints (bitwise resume with the seed; fp32 <-> bf16 conversion), bytes per
  parameter, and the refusals.
"""
from __future__ import annotations

import copy
import random
import struct

import pytest
import torch

import spec_model as spec
from storage_cases import (FULL, U32, bit_pattern, loads, needs_cpu, needs_cuda_on_cpu, needs_triton, run_threaded,
                           sr_bf16_bytes, sr_bits, stored)
from mada_fused import MADA, AdaMod, AVGrad, DiffMod
from mada_fused.backends import load
from mada_fused.backends import reference as ref

BF16 = torch.bfloat16


CASES = {
    "mada_full": (MADA, FULL),
    "mada_adam_corner": (MADA, dict(learn=())),  # the one-loop CPU path
    "mada_fixed_terms": (MADA, dict(beta3=0.3, rho=0.2, c=0.5, gamma=0.7, mod_beta=0.8, learn=())),
    "avgrad": (AVGrad, {}),
    "adamod": (AdaMod, {}),
    "diffmod": (DiffMod, {}),
}
SHAPES = [(37,), (8, 33), (1,), (300,)]  # odd sizes: alignment padding between parameters


# -- the hash, from the spec's text -------------------------------------------------------------
def test_reference_hash_is_the_spec_formula():
    rng = random.Random(0)
    for _ in range(300):
        seed, step, buf, index = rng.getrandbits(32), rng.getrandbits(32), rng.randrange(7), rng.getrandbits(40)
        key = ref.sr_key(torch.tensor(seed), torch.tensor(step), buf)
        assert int(ref.sr_bits(key, torch.tensor(index))) == sr_bits(seed, step, buf, index)


def test_reference_rounding_is_the_spec_formula_and_keeps_specials():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=g) * torch.exp(torch.randn(2000, generator=g) * 20)
    special = [float("inf"), -float("inf"), float("nan"), 3.3e38, -3.3e38, 0.0, -0.0, 1e-40, -1e-42]
    x = torch.cat([x, torch.tensor(special)])
    r = torch.randint(0, 2**32, x.shape, generator=g)
    out = ref.sr_bf16(x, r)
    for xi, ri, oi in zip(x.tolist(), r.tolist(), out.tolist()):
        assert struct.pack("<f", oi) == sr_bf16_bytes(xi, ri), (xi, ri)
    torch.testing.assert_close(out.to(BF16).float(), out, rtol=0, atol=0, equal_nan=True)  # bf16 values
    assert out[-9:-7].isinf().all() and out[-7].isnan()


def test_the_low_bits_of_consecutive_elements_are_uniform():
    """The rounding reads the low 16 bits: over 2^16 consecutive indices of one key, each of
    256 bins of them holds 256 +- 5 sigma (sigma = 16), and consecutive steps' bits do not
    correlate."""
    index = torch.arange(1 << 16)
    lows = []
    for step in (1, 2):
        key = ref.sr_key(torch.tensor(0), torch.tensor(step), 1)
        low = ref.sr_bits(key, index) & 0xFFFF
        counts = torch.bincount(low >> 8, minlength=256)
        assert counts.min() >= 176 and counts.max() <= 336
        lows.append(low.double() - 32767.5)
    corr = (lows[0] * lows[1]).mean() / (lows[0].std() * lows[1].std())
    assert abs(corr.item()) < 0.02  # 5 sigma of 2^-8


def test_rounding_is_unbiased_and_within_one_ulp():
    """Over 2^16 draws the rounded mean of one value equals it to a few 1e-3 ulp."""
    x = torch.full((1 << 16,), 1.0 + 0.3 * 2**-7)  # 0.3 ulp above a bf16 value
    out = ref.sr_bf16(x, torch.arange(1 << 16) * 40503 & U32)
    assert set(out.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs((out.double().mean() - x.double().mean()).item()) < 0.01 * 2**-7


# -- one trajectory ---------------------------------------------------------------------------
def _grads(steps: int, shapes=SHAPES, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * (1 + i) for i, s in enumerate(shapes)] for _ in range(steps)]


def _run(case: str, backend: str, grads, dtype=torch.float32, state_dtype=BF16, threads=None, **extra):
    cls, kw = CASES[case]
    params = [torch.nn.Parameter(torch.linspace(-1, 1, s.numel()).view(s.shape).to(dtype)) for s in grads[0]]
    opt = cls(params, lr=1e-2, backend=backend, state_dtype=state_dtype, **kw, **extra)
    run_threaded(opt, params, grads, dtype, threads)
    return opt, params


# The buffers whose fp32 values the two backends form by the same operations. vb and s go
# through a bias correction or a 1/t that the fused backends multiply by a reciprocal and the
# reference divides by (spec section 6): one fp32 ulp apart, which changes the rounded bf16
# value only when the random draw falls in that ulp's 2^-16 of the range.
SAME_OPS = ("m", "v", "n", "g_prev", "l")


FUSED = [
    *(pytest.param("cpu", dtype, case, marks=needs_cpu, id=f"cpu-{case}-{str(dtype)[6:]}")
      for case in CASES for dtype in (torch.float32, BF16)),
    # The CUDA kernels: every parameter dtype with fp32 compute (vector and scalar paths).
    *(pytest.param("cuda_on_cpu", dtype, case, marks=needs_cuda_on_cpu, id=f"cuda_on_cpu-{case}-{str(dtype)[6:]}")
      for case in CASES for dtype in (torch.float32, BF16, torch.float16)),
    # The Triton interpreter (CPU tensors) is slow: every case once, on fp32 parameters.
    *(pytest.param("triton", torch.float32, case, marks=needs_triton, id=f"triton-{case}") for case in CASES),
]


@pytest.mark.parametrize("backend, dtype, case", FUSED)
def test_fused_backends_store_the_reference_bits(backend, dtype, case, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read per call: Triton on CPU tensors interprets
    grads = _grads(3 if backend == "triton" else 6)
    a = stored(*_run(case, "reference", grads, dtype))
    b = stored(*_run(case, backend, grads, dtype))
    assert a.keys() == b.keys()
    adamod = CASES[case][0] in (AdaMod, DiffMod)  # AdaMod's s is a division in both
    for key, x in a.items():
        y = b[key]
        assert x.dtype == y.dtype == (BF16 if key[1] not in ("step", "tangents") else x.dtype), key
        if key[1] in SAME_OPS or adamod or key[1] == "step":
            assert torch.equal(bit_pattern(x), bit_pattern(y)), key
        elif key[1] in ("vb", "s"):
            differ = (bit_pattern(x) != bit_pattern(y)).sum().item()
            assert differ <= 1 + x.numel() // 1000, key
            torch.testing.assert_close(x.float(), y.float(), rtol=2**-7, atol=0)
        else:  # tangent rows: fp32, to rounding (du/dgamma = etah * A - lr * sign(uL) cancels)
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * x.abs().max().item())


@needs_cpu
@needs_cuda_on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case, rows", [(c, torch.float32) for c in CASES] +
                         [(c, BF16) for c in CASES if CASES[c][0] is MADA and "learn" not in CASES[c][1]],
                         ids=lambda x: str(x)[6:] + "_rows" if isinstance(x, torch.dtype) else x)
def test_cuda_kernels_store_the_cpu_bits_with_missing_grads_and_unaligned_params(case, rows, dtype):
    """The CUDA kernels (on host threads) and the CPU loop form every fp32 value by the same
    mada_math.h operations (both built without FMA contraction), so every stored bit, the
    tangent rows and the parameters agree, for every buffer (vb and s included). The bucket
    holds several segments; one parameter starts 4 or 2 bytes past a 16-byte boundary (the
    kernels' scalar path), one has 2053 elements (a chunk boundary and a scalar tail), and
    one has no grad on steps 2 and 4 (its segment is skipped and its step count lags, which
    the rounding keys read). MADA's learning case once more with bf16 tangent rows (section
    5.3). Its coefficients are frozen (hyper_lr = 0): the CPU sums the hyper-gradient in fp32
    lanes, the kernels in float64, so a learning run's coefficients part in their last bits
    (the hyper-gradients themselves agree to 1e-5)."""
    shapes = [(37,), (2053,), (8, 33), (5,)]
    grads = _grads(5, shapes=shapes)
    for step in (1, 3):
        grads[step][2] = None
    cls, kw = CASES[case]
    learns = cls is MADA and "learn" not in kw
    if learns:
        kw = dict(kw, hyper_lr={n: 0.0 for n in ref.COEFFICIENTS})
    if rows == BF16:
        kw = dict(kw, tangent_dtype=BF16)

    def run(backend):
        params = []
        for i, s in enumerate(shapes):
            n = torch.Size(s).numel()
            data = torch.linspace(-1, 1, n + 1).to(dtype)
            data = data[1:] if i == 0 else data[:n]  # parameter 0: unaligned
            params.append(torch.nn.Parameter(data.view(s)))
        assert params[0].data_ptr() % 16 != 0
        opt = cls(params, lr=1e-2, backend=backend, state_dtype=BF16, sr_seed=3, **kw)
        for gs in grads:
            spec.set_grads(params, [None if g is None else g.to(dtype) for g in gs])
            opt.step()
        return stored(opt, params), [p.detach().clone() for p in params], opt

    want, got = run("cpu"), run("cuda_on_cpu")
    assert want[0].keys() == got[0].keys()
    for key, x in want[0].items():
        assert torch.equal(bit_pattern(x), bit_pattern(got[0][key])), key
    for p, q in zip(want[1], got[1]):
        assert torch.equal(p, q)
    if learns:
        ha, hb = want[2].hypergradients, got[2].hypergradients
        assert ha.keys() == hb.keys() == set(ref.COEFFICIENTS)
        for n in ha:
            assert abs(ha[n] - hb[n]) <= 1e-5 * abs(ha[n]), (n, ha[n], hb[n])


@needs_cuda_on_cpu
@pytest.mark.parametrize("order, learn", [("lagged", ref.COEFFICIENTS), ("exact", ref.COEFFICIENTS),
                                          ("lagged", ("beta2", "rho", "gamma"))])
@pytest.mark.parametrize("state_dtype", [torch.float32, BF16], ids=lambda d: "state_" + str(d)[6:])
@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16], ids=lambda d: str(d)[6:])
def test_cuda_kernels_store_the_reference_bf16_tangent_rows(dtype, state_dtype, order, learn):
    """tangent_dtype=bfloat16 (docs/spec.md section 5.3), with either state dtype and either
    hyper order (the exact order's dot pass reads the bf16 rows too). hyper_lr = 0 keeps the
    coefficients where they start, so a row element's draw is the only way the backends can
    part. A learned subset checks that a row draws the bits of its coefficient (buffer 7 + j),
    not of its rank. The rows' fp32 values differ from the reference's by rounding (up to 1e-4 relative
    where du/dgamma cancels, as for fp32 rows), so a stored bf16 element differs only when
    its random draw falls in that gap: held to 1 % of the elements, and to one bf16 ulp
    where it does. The buffers formed by the same operations stay bitwise equal, and the
    hyper-gradients, sums over the rows, agree to 1e-3."""
    grads = _grads(6)
    extra = dict(tangent_dtype=BF16, hyper_order=order, learn=learn, hyper_lr={n: 0.0 for n in learn})
    ra, rb = (_run("mada_full", name, grads, dtype, state_dtype=state_dtype, **extra)
              for name in ("reference", "cuda_on_cpu"))
    a, b = stored(*ra), stored(*rb)
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        if key[1] == "tangents":
            assert x.dtype == y.dtype == BF16 and x.any(), key
            differ = (bit_pattern(x) != bit_pattern(y)).sum().item()
            assert differ <= 1 + x.numel() // 100, (key, differ)
            torch.testing.assert_close(x.float(), y.float(), rtol=2**-7, atol=1e-4 * x.float().abs().max().item())
        elif key[1] in SAME_OPS or key[1] == "step":
            assert torch.equal(bit_pattern(x), bit_pattern(y)), key
        else:
            torch.testing.assert_close(x.float(), y.float(), rtol=2**-7 if state_dtype == BF16 else 1e-5, atol=0)
    ha, hb = ra[0].hypergradients, rb[0].hypergradients
    assert ha.keys() == hb.keys() == set(learn)
    for n in ha:
        assert abs(ha[n] - hb[n]) <= 1e-3 * abs(ha[n]), (n, ha[n], hb[n])


@needs_cpu
@pytest.mark.parametrize("case", ["mada_full", "mada_adam_corner", "diffmod"])
def test_cpu_bits_do_not_depend_on_the_thread_count(case):
    """More than one 64K chunk, so two threads really split the work."""
    grads = _grads(3, shapes=[(150_001,), (7,)])
    one = _run(case, "cpu", grads, threads=1)
    two = _run(case, "cpu", grads, threads=2)
    for key, x in stored(*one).items():
        assert torch.equal(bit_pattern(x), bit_pattern(stored(*two)[key])), key
    for p, q in zip(one[1], two[1]):
        assert torch.equal(p, q)


# -- against the float64 model ------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("case", ["mada_fixed_terms", "adamod"])
def test_trajectory_stays_near_the_float64_model(case):
    """Each stored value carries at most one bf16 ulp (2^-7 relative) of unbiased error per
    rounding. Over these 40 steps that accumulates to about 2^-8 * sqrt(40) ~ 2.5 % rms in v
    (beta2 = 0.999 barely forgets) and ~1 % in m, so ~2 % rms in an update. The parameters'
    displacement is held to 6 % in norm (3x that; measured 0.8-1.3 %), and its signed mean
    error, which only a bias would make large, to 0.2 % of its mean size (10x the 2e-4 std
    of a mean of 4096 unbiased errors; measured < 1e-4). The fp32-state run is held to
    what rounding fp32 parameters (|theta| <= 1, 2^-25 each step) allows: 40 * 2^-25 * 64
    over a displacement norm of 0.5, below 2e-4."""
    steps = 40
    grads = _grads(steps, shapes=[(4096,)])
    cls, kw = CASES[case]
    theta0 = torch.linspace(-1, 1, 4096).double()  # _run's start, exactly
    theta, state = theta0.clone(), {} if cls is AdaMod else spec.mada_init_state(theta0)
    for (g,) in grads:
        if cls is AdaMod:
            theta, state = spec.adamod_step(theta, g.double(), state, lr=1e-2)
        else:
            coef = {"beta1": 0.9, "beta2": 0.999, **{n: kw[n] for n in ("beta3", "rho", "c", "gamma")}}
            theta, state, _, _ = spec.mada_step(theta, g.double(), state, spec.kdict(spec.kvec(coef)), lr=1e-2,
                                                mod_beta=kw["mod_beta"])
    exact = theta - theta0
    for state_dtype, norm_tol, mean_tol in ((BF16, 0.06, 2e-3), (torch.float32, 2e-4, 2e-5)):
        _, (p,) = _run(case, "cpu", grads, state_dtype=state_dtype)
        moved = p.detach().double() - theta0
        assert ((moved - exact).norm() / exact.norm()).item() < norm_tol, state_dtype
        assert abs((moved - exact).mean().item()) < mean_tol * exact.abs().mean().item(), state_dtype


@needs_cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_an_ema_below_half_an_ulp_per_step_still_moves(backend):
    """v = 1 (a bf16 value, ulp 2^-7) and g^2 = 2 with beta2 = 0.999: each step moves v by
    0.001 * (2 - v) <= 0.001, an eighth of an ulp, so round-to-nearest stores 1 forever
    (checked below). With SR the mean over 4096 elements follows the exact EMA
    2 - 0.999^N: each element's error is a sum of unbiased draws (std <= 0.05 here), so the
    mean's std is ~1e-3; the bound is 0.01."""
    n, steps = 4096, 200
    p = torch.nn.Parameter(torch.zeros(n))
    opt = MADA([p], lr=0.0, learn=(), backend=backend, state_dtype=BF16)
    p.grad = torch.full((n,), 2.0**0.5)
    opt.step()
    opt.state[p]["v"].fill_(1.0)
    for _ in range(steps):
        opt.step()
    v = opt.state[p]["v"].double()
    exact = 2 - 0.999**steps  # 1.181
    assert abs(v.mean().item() - exact) < 0.01
    assert (v > 1.0).float().mean().item() > 0.99
    nearest = torch.ones((), dtype=BF16)
    for _ in range(steps):
        nearest = (0.999 * nearest.float() + 0.001 * 2.0).to(BF16)
    assert nearest.item() == 1.0  # the premise: round-to-nearest would freeze


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu),
                                     pytest.param("cuda_on_cpu", marks=needs_cuda_on_cpu)])
def test_a_step_grad_scaler_skips_stores_nothing(backend):
    """found_inf set: no buffer, tangent row or parameter is written (spec section 5)."""
    opt, params = _run("mada_full", backend, _grads(2))
    before = stored(opt, params), [p.detach().clone() for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([1.0])
    spec.set_grads(params, _grads(1, seed=1)[0])
    opt.step()
    for key, x in stored(opt, params).items():
        assert torch.equal(bit_pattern(x), bit_pattern(before[0][key])), key
    assert all(torch.equal(p, q) for p, q in zip(params, before[1]))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu),
                                     pytest.param("cuda_on_cpu", marks=needs_cuda_on_cpu),
                                     pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("cls", [AdaMod, DiffMod])
def test_groups_with_their_own_options_and_maximize_round_as_one_bucket(backend, cls, monkeypatch):
    """Two groups of one bucket, one maximizing with its own betas: each group's pass draws
    the bucket's element indices, so maximizing g stores the bits of minimizing -g, and the
    fused backends store the reference's."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    grads = _grads(3)

    def run(name, negate):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, g.numel()).view(g.shape)) for g in grads[0]]
        groups = [{"params": params[:2]}, {"params": params[2:], "betas": (0.8, 0.99), "maximize": not negate}]
        opt = cls(groups, lr=1e-2, backend=name, state_dtype=BF16, sr_seed=7)
        for gs in grads:
            spec.set_grads(params, [-g if negate and i >= 2 else g for i, g in enumerate(gs)])
            opt.step()
        assert len(opt._buckets) == 1
        return stored(opt, params), [p.detach().clone() for p in params]

    want = run("reference", negate=False)
    for got in (run(backend, negate=False), run(backend, negate=True)):
        for key, x in want[0].items():
            assert torch.equal(bit_pattern(x), bit_pattern(got[0][key])), key
        assert all(torch.equal(a, b) for a, b in zip(want[1], got[1]))


# -- checkpoints --------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("case", ["mada_full", "diffmod"])
def test_state_dict_resumes_bitwise_with_its_seed(case):
    grads = _grads(8)
    opt, params = _run(case, "cpu", grads[:4], sr_seed=12345)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["mada"]["sr_seed"] == 12345
    start = [p.detach().clone() for p in params]
    spec.run_steps(opt, params, grads[4:])
    want = stored(opt, params), [p.detach().clone() for p in params]

    cls, kw = CASES[case]
    results = []
    for seed in (0, 12345):  # the checkpoint's seed wins over the constructor's
        fresh = [torch.nn.Parameter(s.clone()) for s in start]
        other = cls(fresh, lr=1e-2, backend="cpu", state_dtype=BF16, sr_seed=seed, **kw)
        other.load_state_dict(copy.deepcopy(saved))
        assert other.state_dict()["mada"]["sr_seed"] == 12345
        spec.run_steps(other, fresh, grads[4:])
        results.append((stored(other, fresh), [p.detach().clone() for p in fresh]))
    for got, ps in results:
        for key, x in want[0].items():
            assert torch.equal(bit_pattern(x), bit_pattern(got[key])), key
        assert all(torch.equal(a, b) for a, b in zip(want[1], ps))
    # and the seed matters: the same run from seed 0 stores other bits
    again, ps = _run(case, "cpu", grads, sr_seed=0)
    assert not torch.equal(bit_pattern(stored(again, ps)[(0, "v")]), bit_pattern(want[0][(0, "v")]))


@pytest.mark.parametrize("case", ["mada_full", "adamod"])
def test_checkpoints_convert_between_fp32_and_bf16_state(case):
    """fp32 -> bf16 rounds to nearest even, once; bf16 -> fp32 widens exactly (spec 5.1)."""
    grads = _grads(3)
    f32_opt, f32_params = _run(case, "reference", grads, state_dtype=torch.float32)
    cls, kw = CASES[case]
    params = [torch.nn.Parameter(p.detach().clone()) for p in f32_params]
    bf = cls(params, lr=1e-2, backend="reference", state_dtype=BF16, **kw)
    bf.load_state_dict(f32_opt.state_dict())
    for (i, name), x in stored(f32_opt, f32_params).items():
        y = bf.state[params[i]][name]
        if name in ("step", "tangents"):
            assert y.dtype == x.dtype and torch.equal(x, y), name
        else:
            assert y.dtype == BF16 and torch.equal(y, x.to(BF16)), name
    spec.run_steps(bf, params, grads)  # and it steps on
    back = cls([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, backend="reference", **kw)
    back.load_state_dict(bf.state_dict())
    for (i, name), x in stored(bf, params).items():
        y = back.state[back.param_groups[0]["params"][i]][name]
        assert y.dtype == (x.dtype if name in ("step", "tangents") else torch.float32), name
        assert torch.equal(y, x.to(y.dtype)), name


# -- memory -------------------------------------------------------------------------------------
BYTES = {  # (buffers, tangent rows) per parameter element: spec sections 1.4, 3, 4
    "mada_full": (7, 6), "mada_adam_corner": (2, 0), "mada_fixed_terms": (7, 0), "avgrad": (3, 0),
    "adamod": (3, 0), "diffmod": (4, 0),
}


@pytest.mark.parametrize("case", list(BYTES))
def test_bytes_of_state_per_parameter(case):
    """Measured as the nbytes of what optimizer.state holds (step aside), on a parameter of
    1024 elements (no alignment padding), against 4 or 2 bytes per buffer plus 4 per
    tangent row."""
    buffers, rows = BYTES[case]
    for state_dtype, size in ((torch.float32, 4), (BF16, 2)):
        opt, (p,) = _run(case, "reference", _grads(1, shapes=[(1024,)]), state_dtype=state_dtype)
        measured = sum(t.nbytes for k, t in opt.state[p].items() if k != "step") / p.numel()
        assert measured == size * buffers + 4 * rows, (case, state_dtype)
        bucket = opt._buckets[0]
        assert sum(b.nbytes for b in bucket.buffers.values()) == size * buffers * 1024


def test_default_mada_state_is_36_bytes_per_parameter_in_bf16_against_48():
    """MADA's defaults learn all six: m, v, n, g', l, vb and six tangent rows (no clip)."""
    got = {}
    for state_dtype in (torch.float32, BF16):
        p = torch.nn.Parameter(torch.zeros(1024))
        opt = MADA([p], backend="reference", state_dtype=state_dtype)
        spec.run_steps(opt, [p], [[torch.randn(1024)]])
        got[state_dtype] = sum(t.nbytes for k, t in opt.state[p].items() if k != "step") / p.numel()
    assert got == {torch.float32: 48.0, BF16: 36.0}


# -- dtypes, backends and refusals --------------------------------------------------------------
def test_fp64_params_keep_fp64_state_and_low_precision_params_take_bf16():
    p64 = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    p16 = torch.nn.Parameter(torch.randn(5, dtype=torch.float16))
    opt = MADA([p64, p16], lr=1e-2, beta3=0.2, backend="reference", state_dtype=BF16)
    spec.run_steps(opt, [p64, p16], [[torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float16)]])
    assert {t.dtype for k, t in opt.state[p64].items() if k != "step"} == {torch.float64}
    assert opt.state[p16]["m"].dtype == BF16 and opt.state[p16]["tangents"].dtype == torch.float32


@needs_cpu
def test_auto_picks_cpu_for_bf16_state_and_every_native_backend_stores_it():
    p = torch.nn.Parameter(torch.randn(4))
    opt = AdaMod([p], state_dtype=BF16)
    p.grad = torch.randn(4)
    opt.step()
    assert {b.name for b in opt._backend_for.values()} == {"cpu"}
    for name in ("cpu", "cuda_on_cpu", "cuda", "triton", "reference"):
        if loads(name):
            assert BF16 in load(name).state_dtypes, name


@pytest.mark.parametrize("bad, why", [
    ("8-bit", "float32, torch.bfloat16 or '8bit'"), (torch.float16, "float32, torch.bfloat16 or '8bit'"),
    (torch.float64, "float32, torch.bfloat16 or '8bit'"), ("bfloat16", "float32, torch.bfloat16 or '8bit'"),
])
@pytest.mark.parametrize("cls", [MADA, AVGrad, AdaMod, DiffMod])
def test_bad_state_dtype_is_refused(cls, bad, why):
    p = torch.nn.Parameter(torch.randn(3))
    before = p.detach().clone()
    with pytest.raises(ValueError, match=why):
        cls([p], state_dtype=bad)
    assert torch.equal(p, before)


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, True, None])
def test_bad_sr_seed_is_refused(bad):
    with pytest.raises(ValueError, match="sr_seed"):
        MADA([torch.nn.Parameter(torch.randn(3))], sr_seed=bad)


def test_a_checkpoint_with_a_bad_seed_is_refused_and_changes_nothing():
    opt, params = _run("mada_full", "reference", _grads(2), sr_seed=5)
    sd = copy.deepcopy(opt.state_dict())
    sd["mada"]["sr_seed"] = -3
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="sr_seed"):
        opt.load_state_dict(sd)
    spec.deep_equal(opt.state_dict(), before)
