"""The fused CPU backend (csrc/cpu + mada_math.h) against the reference backend.

Every comparison runs both backends on the same fresh random data. Tolerances:
- float64: rel 1e-10. The header and the reference do the same IEEE operations
  in the same order, except torch's vectorised CPU sqrt, which is not always
  correctly rounded (1 ulp on ~1% of float64 inputs).
- float32: rel 1e-6 on parameters and state (that sqrt: 1 ulp on ~15% of inputs).
  Hyper-gradients are sums whose terms can cancel (du/dbeta2 is 0 in exact
  arithmetic at t = 1), so they must agree to rel 1e-6 OR to within the
  reference's own float32 error, measured against the same run in float64.
- bfloat16 / float16 parameters (fp32 state): the fp32 values agree to ~1 ulp,
  and one fp32 ulp can move the rounding to 16 bits by one 16-bit ulp, which
  later steps carry along: at most 2 ulps of the parameter dtype, and at most
  1% of the elements may differ at all.
"""
from __future__ import annotations

import sys

import pytest
import torch

import spec_model as sm
from mada_fused import MADA, AVGrad, AdaMod, DiffMod
from mada_fused import backends as registry
from mada_fused.backends import abi

C = pytest.importorskip("mada_fused._C_cpu", reason="the C++ CPU extension is not built")

ALL = sm.CANON
LEARN = dict(betas=(0.85, 0.98), beta3=0.3, rho=0.6, c=0.7, gamma=0.8, hyper_warmup=2,
             hyper_lr={n: 1e-2 for n in ALL}, learn=ALL)
CONFIGS = {
    "adam_corner": (MADA, dict(learn=(), weight_decay=0.1)),
    "mada_learn_all": (MADA, dict(LEARN, mod_beta=0.9, weight_decay=0.05)),
    "mada_exact_detach_max": (MADA, dict(LEARN, hyper_order="exact", vbar="detach", maximize=True)),
    "mada_learn_beta1_only": (MADA, dict(learn=("beta1",), hyper_warmup=0)),
    # Nothing learned: the clip alone runs the one-loop kernel, a fixed
    # interior point the two-loop one without tangents.
    "mada_clip_fixed": (MADA, dict(learn=(), mod_beta=0.9, maximize=True)),
    "mada_interior_fixed": (MADA, dict(LEARN, learn=(), mod_beta=0.9)),
    "avgrad": (AVGrad, dict(weight_decay=0.01)),
    "adamod": (AdaMod, dict(weight_decay=0.01)),
    "diffmod": (DiffMod, dict(len_memory=10)),
}
# Odd sizes, a zero-size tensor, many small ones; BIG adds a tensor that fills
# most of the first 64K-element chunk, so the chunk boundary falls inside a
# later small tensor (segments span chunks). The reference is slow on it, so
# only some tests use it.
SHAPES = [(3, 5), (0,), (7,), (1,), (2, 3, 4)] + [(k % 13 + 1,) for k in range(12)]
BIG = [(65521,)] + SHAPES


def make_groups(params, lr=1e-2):
    half = len(params) // 2
    return [dict(params=params[:half], lr=lr), dict(params=params[half:], lr=lr / 3, weight_decay=0.02)]


def grads_for(shapes, steps):
    out = []
    for _ in range(steps):
        row = []
        for s in shapes:
            mag = torch.exp(0.7 * torch.randn(s, dtype=torch.float64))
            row.append(mag * torch.randn(s, dtype=torch.float64))
        out.append(row)
    return out


def run(backend, name, init, grads, dtype, non_contiguous=False, **extra):
    cls, kw = CONFIGS[name]
    params = [p.to(dtype).requires_grad_() for p in init]
    opt = cls(make_groups(params), backend=backend, **{**kw, **extra})
    for row in grads:
        for p, g in zip(params, row):
            g = g.to(dtype)
            if non_contiguous and g.dim() == 2:  # a transposed view: strides differ
                g = g.t().contiguous().t()
            p.grad = g
        opt.step()
    return params, opt


def hyper(opt):
    return getattr(opt, "hypergradients", {}) or {}


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def fresh(steps=4, shapes=SHAPES):
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    return init, grads_for(shapes, steps)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float64_matches_reference(name):
    init, grads = fresh(shapes=BIG if name in ("mada_learn_all", "adamod") else SHAPES)
    p_ref, o_ref = run("reference", name, init, grads, torch.float64, non_contiguous=True)
    p_cpu, o_cpu = run("cpu", name, init, grads, torch.float64, non_contiguous=True)
    for a, b in zip(p_cpu, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    for a, b in zip(p_cpu, p_ref):
        for key, x in o_ref.state[b].items():
            torch.testing.assert_close(o_cpu.state[a][key], x, rtol=1e-9, atol=1e-12, msg=key)
    for k, h in hyper(o_ref).items():
        assert hyper(o_cpu)[k] == pytest.approx(h, rel=1e-9, abs=1e-12), k
    if hasattr(o_ref, "coefficients"):
        assert o_cpu.coefficients == pytest.approx(o_ref.coefficients, rel=1e-12)


@pytest.mark.parametrize("name", ["adam_corner", "mada_learn_all", "adamod", "diffmod"])
def test_float32_matches_reference(name):
    init, grads = fresh(shapes=BIG if name == "adam_corner" else SHAPES)
    extra = dict(hyper_lr={n: 0.0 for n in ALL}) if name == "mada_learn_all" else {}
    p_ref, o_ref = run("reference", name, init, grads, torch.float32, **extra)
    p_cpu, o_cpu = run("cpu", name, init, grads, torch.float32, non_contiguous=True, **extra)
    for a, b in zip(p_cpu, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if hyper(o_ref):
        _, o_64 = run("reference", name, init, grads, torch.float64, **extra)
        for k, h in hyper(o_ref).items():
            own_error = abs(h - hyper(o_64)[k])  # the reference's float32 rounding
            assert abs(hyper(o_cpu)[k] - h) <= max(1e-6 * abs(h), 4 * own_error), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mada_learn_all", "adamod"])
def test_low_precision_params(name, dtype):
    init, grads = fresh(4)
    p_ref, o_ref = run("reference", name, init, grads, dtype)
    p_cpu, o_cpu = run("cpu", name, init, grads, dtype)
    a = torch.cat([p.detach().flatten() for p in p_cpu]).float()
    b = torch.cat([p.detach().flatten() for p in p_ref]).float()
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(torch.finfo(dtype).tiny))))
    assert ((a - b).abs() <= 2 * ulp).all()
    assert (a != b).float().mean() < 0.01
    state = o_cpu.state[p_cpu[-1]]
    assert all(t.dtype == torch.float32 for k, t in state.items() if k != "step")
    torch.testing.assert_close(state["m"], o_ref.state[p_ref[-1]]["m"], rtol=1e-6, atol=1e-7)


# adam_corner, adamod and diffmod run one-loop kernels (the gradient unscaled in
# place), mada_learn_all the split one.
@pytest.mark.parametrize("config", ["mada_learn_all", "adam_corner", "adamod", "diffmod"])
@pytest.mark.parametrize("scale, skip", [(1024.0, False), (1024.0, True)])
def test_amp_unscale_and_skip(scale, skip, config):
    init, grads = fresh(3)
    outs = []
    cls, kw = CONFIGS[config]
    for backend in ("reference", "cpu"):
        params = [p.float().requires_grad_() for p in init]
        opt = cls(make_groups(params), backend=backend, **kw)
        for i, row in enumerate(grads):
            for p, g in zip(params, row):
                p.grad = (g * scale).float()
            last = i == len(grads) - 1
            opt.grad_scale = torch.tensor([scale])
            opt.found_inf = torch.tensor([1.0 if (skip and last) else 0.0])
            before = [p.detach().clone() for p in params]
            h_before = dict(hyper(opt))
            opt.step()
            if skip and last:  # nothing moves: params, state step counters, hyper-gradients
                assert all(torch.equal(a, b) for a, b in zip(before, params))
                assert hyper(opt) == h_before
        outs.append(params)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _learning_run(data, config, threads=None, isa=None):
    old_threads, old_isa = torch.get_num_threads(), C.isa()
    try:
        if threads:
            torch.set_num_threads(threads)
        if isa:
            C.set_isa(isa)
        params, opt = run("cpu", config, *data, torch.float32)
    finally:
        torch.set_num_threads(old_threads)
        C.set_isa(old_isa)
    return [p.detach() for p in params], hyper(opt) if isinstance(opt, MADA) else None


# DiffMod: its exp is our own polynomial, so the scalar and AVX2 objects agree bit for bit too.
# adam_corner has no sums to reduce: its elements are split evenly over the threads instead.
@pytest.mark.parametrize("config", ["mada_learn_all", "diffmod", "adam_corner"])
def test_deterministic_for_thread_count_and_isa(config):
    """Bitwise: chunking is fixed where sums are reduced (in order), no FMA contraction."""
    data = fresh(3, BIG)
    p1, h1 = _learning_run(data, config, threads=1)
    p2, h2 = _learning_run(data, config, threads=2)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2)) and h1 == h2
    cfg = C.build_config()
    if "avx2" in cfg["isas_built"] and cfg["cpu_has_avx2"]:
        p3, h3 = _learning_run(data, config, isa="base")
        assert all(torch.equal(a, b) for a, b in zip(p1, p3)) and h1 == h3


@pytest.mark.parametrize("isa", ["base", "avx2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_conversions_are_torchs(dtype, isa):
    """Every 16-bit pattern widens like torch; float32s (ties, subnormals, inf, nan) round like torch."""
    if isa not in C.build_config()["isas_built"] or (isa == "avx2" and not C.build_config()["cpu_has_avx2"]):
        pytest.skip(f"no {isa} kernels here")
    code = {torch.bfloat16: 2, torch.float16: 3}[dtype]
    old = C.isa()
    C.set_isa(isa)
    try:
        bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        wide = torch.empty(bits.numel(), dtype=torch.float32)
        C.convert(code, True, bits.data_ptr(), wide.data_ptr(), bits.numel())
        assert torch.equal(wide.view(torch.int32), bits.float().view(torch.int32)) or torch.equal(
            wide.nan_to_num(7.0), bits.float().nan_to_num(7.0))
        f = torch.cat([torch.randint(-2**31, 2**31 - 1, (1 << 18,), dtype=torch.int32).view(torch.float32),
                       wide + wide * 2.0 ** -9, wide + wide * 2.0 ** -12,  # ties and near-ties
                       torch.tensor([0.0, -0.0, 1e-45, 65504.0, 65520.0, 1e38, float("inf"), float("nan")])])
        narrow = torch.empty(f.numel(), dtype=dtype)
        C.convert(code, False, f.data_ptr(), narrow.data_ptr(), f.numel())
        expect = f.to(dtype)
        same = narrow.view(torch.int16) == expect.view(torch.int16)
        assert (same | (narrow.isnan() & expect.isnan())).all()
    finally:
        C.set_isa(old)


@pytest.mark.parametrize("name", ["mada_learn_all", "adamod"])
@pytest.mark.parametrize("src, dst", [("cpu", "reference"), ("reference", "cpu")])
def test_checkpoint_resumes_across_backends(name, src, dst):
    init, grads = fresh(4)
    params, opt = run(src, name, init, grads[:3], torch.float32)
    sd = opt.state_dict()
    cls, kw = CONFIGS[name]
    other = [p.detach().clone().requires_grad_() for p in params]
    opt2 = cls(make_groups(other), backend=dst, **kw)
    opt2.load_state_dict(sd)
    for a, b in zip(params, other):  # loaded bit-exactly, into the flat buffers
        for key, x in opt.state[a].items():
            assert torch.equal(opt2.state[b][key], x), key
    if hasattr(opt, "coefficients"):
        assert opt2.coefficients == opt.coefficients
    for ps, o in ((params, opt), (other, opt2)):
        for p, g in zip(ps, grads[3]):
            p.grad = g.float()
        o.step()
    for a, b in zip(params, other):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_missing_extension_falls_back(monkeypatch):
    import mada_fused

    monkeypatch.setitem(sys.modules, "mada_fused._C_cpu", None)  # import now raises ImportError
    monkeypatch.delattr(mada_fused, "_C_cpu", raising=False)
    monkeypatch.setattr(registry, "_loaded", {k: v for k, v in registry._loaded.items() if k != "cpu"})
    monkeypatch.setattr(registry, "_failed", {})
    with pytest.raises(registry.BackendUnavailable, match="pip install -e"):
        registry.load("cpu")
    assert registry.resolve("auto", torch.device("cpu"), torch.float32).name == "reference"
    with pytest.raises(registry.BackendUnavailable, match="not built"):
        MADA([torch.zeros(3, requires_grad=True)], backend="cpu")


def test_extension_rejects_out_of_bounds_segments():
    p, g, m, v = (torch.zeros(8) for _ in range(4))
    lr, wd, steps, coef = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), \
        torch.ones(1, dtype=torch.float64), torch.tensor([0.9, 0.999, 0, 1, 1, 1], dtype=torch.float64)
    fixed = abi.pack_fixed(op=abi.MADA_STEP, variant=0, dtype=abi.DTYPES["float32"], learn_mask=0, maximize=False,
                           vbar_detach=False, device=0, state_numel=8, num_groups=1, num_params=1,
                           lr=lr.data_ptr(), wd=wd.data_ptr(), steps=steps.data_ptr(),
                           state=[m.data_ptr(), v.data_ptr()], tangents=0, tan_stride=8,
                           consts=[1e-8, 0.0, 0.95, 0.98])
    for offset, numel, group in [(4, 8, 0), (-1, 2, 0), (0, 8, 3)]:
        table = torch.tensor([p.data_ptr(), g.data_ptr(), offset, numel, group, 0])
        step = abi.pack_step(rows=table.data_ptr(), n_rows=1, coef=coef.data_ptr(), grad_scale=0, found_inf=0,
                             dot_out=0, stream=0, num_threads=1)
        with pytest.raises(ValueError, match="outside the flat state|bad group"):
            C.run(fixed + step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_state_streams_start_in_distinct_page_slots(dtype):
    """The pass walks every state buffer and tangent row in step; each starts in its own
    256-byte slot of a page (flat_state), and state_dict still shows views of them."""
    params = [torch.randn(5000, dtype=dtype, requires_grad=True), torch.randn(3, 7, dtype=dtype, requires_grad=True)]
    opt = MADA(params, backend="cpu", **CONFIGS["mada_learn_all"][1])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    (bucket,) = opt._buckets
    rows = bucket.tangents
    assert rows.shape == (6, bucket.numel) and rows.stride(1) == 1 and rows.stride(0) >= bucket.numel
    starts = [b.data_ptr() for b in bucket.buffers.values()] + [r.data_ptr() for r in rows]
    slots = [a % 4096 // 256 for a in starts]
    assert len(starts) == 13 and len(set(slots)) == 13 and 0 not in slots and 1 not in slots
    view = opt.state[params[1]]["tangents"]
    assert view.shape == (6, 3, 7) and view.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()
    assert torch.equal(view[:, 2], rows[:, 5000 + 14 : 5000 + 21])


def test_tangent_rows_must_be_contiguous_and_apart():
    params = [torch.randn(40, requires_grad=True)]
    opt = MADA(params, backend="cpu", **CONFIGS["mada_learn_beta1_only"][1])
    params[0].grad = torch.randn(40)
    opt.step()
    (bucket,) = opt._buckets
    before = params[0].detach().clone()
    for bad in (torch.zeros(40, 1).t(), torch.zeros(80).as_strided((1, 40), (40, 2))):
        bucket.tangents = bad
        with pytest.raises(ValueError, match="contiguous rows of 40"):
            opt.step()
        assert torch.equal(params[0], before)
    bucket.tangents = torch.zeros(1, 64)[:, :40]  # padded rows are fine
    opt.step()
