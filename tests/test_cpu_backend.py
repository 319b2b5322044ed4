"""What is specific to the fused CPU backend (csrc/cpu + mada_math.h): thread count and ISA
switching, 16-bit conversions, checkpoint exchange, host-side state layout and argument checks.
Its numbers, on every case and dtype, are checked in test_conformance.py.
"""
from __future__ import annotations

import sys

import pytest
import torch

from conformance_cases import CASES  # tests/, on sys.path through conftest
from mada_fused import MADA
from mada_fused import backends as registry
from mada_fused.backends import abi

C = pytest.importorskip("mada_fused._C_cpu", reason="the C++ CPU extension is not built")

# Odd sizes, a zero-size tensor, many small ones; BIG adds a tensor that fills most of the
# first 64K-element chunk, so the chunk boundary falls inside a later small tensor.
SHAPES = [(3, 5), (0,), (7,), (1,), (2, 3, 4)] + [(k % 13 + 1,) for k in range(12)]
BIG = [(65521,)] + SHAPES


def make_groups(params, lr=1e-2):
    half = len(params) // 2
    return [dict(params=params[:half], lr=lr), dict(params=params[half:], lr=lr / 3, weight_decay=0.02)]


def run(backend, name, init, grads, dtype):
    case = CASES[name]
    params = [p.to(dtype).clone().requires_grad_() for p in init]
    opt = case.cls(make_groups(params), backend=backend, **case.kwargs)
    for row in grads:
        for p, g in zip(params, row):
            p.grad = g.to(dtype)
        opt.step()
    return params, opt


def hyper(opt):
    return getattr(opt, "hypergradients", {}) or {}


def fresh(steps=4, shapes=SHAPES):
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.exp(0.7 * torch.randn(s, dtype=torch.float64)) * torch.randn(s, dtype=torch.float64)
              for s in shapes] for _ in range(steps)]
    return init, grads


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
@pytest.mark.parametrize("config", ["learn_all_warmup", "diffmod", "adam_corner"])
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


@pytest.mark.parametrize("name", ["learn_all_warmup", "adamod"])
@pytest.mark.parametrize("src, dst", [("cpu", "reference"), ("reference", "cpu")])
def test_checkpoint_resumes_across_backends(name, src, dst):
    init, grads = fresh(4)
    params, opt = run(src, name, init, grads[:3], torch.float32)
    sd = opt.state_dict()
    other = [p.detach().clone().requires_grad_() for p in params]
    opt2 = CASES[name].cls(make_groups(other), backend=dst, **CASES[name].kwargs)
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
    f32 = abi.DTYPES["float32"]
    fixed = abi.pack_fixed(op=abi.MADA_STEP, variant=0, dtype=f32, state_dtype=f32, sr_seed=0, learn_mask=0,
                           maximize=False, vbar_detach=False, device=0, state_numel=8, num_groups=1, num_params=1,
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
    opt = MADA(params, backend="cpu", **CASES["learn_all_warmup"].kwargs)
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
    opt = MADA(params, backend="cpu", **CASES["learn_beta1_only"].kwargs)
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
