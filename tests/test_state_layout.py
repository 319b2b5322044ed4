"""The flat state layout keeps real models on the vector path (mada_fused/flat_state.py).

The CUDA planner (csrc/cuda/plan.cpp) and the Triton launcher give a segment 16-byte
vector accesses only when every stream it touches starts on a 16-byte boundary, and the
tangent rows only when their stride is a multiple of 16 bytes. In a GPT-2-shaped parameter
list of odd sizes (an odd width, a 50,257-element bias, 3-element biases), dense offsets
put most parameters after the first odd one on the scalar path, silently, and on a GPU an
odd bucket length (the tangent-row stride) put all of them there.
Here the planner's own report (``plan_info`` of the CPU build of csrc/cuda) and the Triton
chunk table say which path each segment takes, on both bucket layouts (host: buffers
placed apart in pages; device: plain allocations, row stride = bucket length), and the
results still match the reference backend and survive a state_dict round trip bit for bit.
"""
from __future__ import annotations

import io

import pytest
import torch

import mada_fused
from mada_fused import backends, flat_state
from mada_fused.flat_state import Bucket

from conformance_cases import ALL, CASES, FULL, random_grads  # tests/, on sys.path through conftest
from test_conformance import check  # likewise

try:
    from mada_fused import _C_cuda_on_cpu
except ImportError:  # built only with MADA_BUILD_CUDA_ON_CPU=1
    _C_cuda_on_cpu = None
try:
    from mada_fused.triton_kernels import launch
except ImportError:  # Triton is optional
    launch = None

built = pytest.mark.skipif(_C_cuda_on_cpu is None, reason="_C_cuda_on_cpu not built (MADA_BUILD_CUDA_ON_CPU=1)")


def gpt2(d: int = 7, vocab: int = 1003, ctx: int = 33, ff: int = 29) -> list[tuple[int, ...]]:
    """GPT-2's tensor list (embeddings, one block, final norm) scaled down to width 7, a
    1003-token vocabulary, context 33 and MLP width 29, plus a 3-element bias: every numel
    is odd, as in a model of odd width or with a vocabulary-sized (50,257) bias."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    return [(vocab, d), (ctx, d), *block, (d,), (d,), (3,)]


MADA_LEARN = dict(FULL, mod_beta=0.9)  # every coefficient learned: six tangent rows
ADAMOD = CASES["adamod"].kwargs


@pytest.fixture(params=["host", "device"])
def layout(request, monkeypatch) -> str:
    """Both bucket layouts on CPU tensors: "device" is the one CUDA buckets get."""
    if request.param == "device":
        monkeypatch.setattr(flat_state, "host_layout", lambda device: False)
    return request.param


def _step(opt, ps, grads) -> None:
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()


def _aligned_rows(bucket: Bucket) -> bool:
    vec = 16 // bucket.state_dtype.itemsize
    starts = [t.data_ptr() for t in bucket.buffers.values()]
    if bucket.tangents is not None:
        starts += [row.data_ptr() for row in bucket.tangents]
        if bucket.tangent_stride % vec:
            return False
    return all(s % 16 == 0 for s in starts) and all(o % vec == 0 for o in bucket.offsets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_offsets_and_tangent_stride_are_16_byte_aligned(dtype, layout):
    params = [torch.zeros(s, dtype=dtype) for s in gpt2()]
    bucket = Bucket(params, ("m", "v"), 6)
    assert _aligned_rows(bucket)
    # Dense order, no overlap, fewer than 16 bytes of padding after each parameter.
    vec = 16 // bucket.state_dtype.itemsize
    ends = [o + p.numel() for o, p in zip(bucket.offsets, params)]
    assert bucket.offsets[0] == 0
    assert all(0 <= nxt - end < vec for end, nxt in zip(ends, bucket.offsets[1:] + [bucket.numel]))


class _Recorder:
    """The extension with every call's launch layout recorded (plan_info: no kernel runs)."""

    def __init__(self, ext) -> None:
        self.ext, self.plans = ext, []

    def run(self, call: bytes, alloc=None) -> None:
        self.plans.append(self.ext.plan_info(call))  # the segment table is alive during run
        self.ext.run(call, alloc)


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cls, kwargs", [(mada_fused.MADA, MADA_LEARN), (mada_fused.AdaMod, ADAMOD)],
                         ids=["mada_learn", "adamod"])
def test_cuda_planner_puts_every_segment_on_the_vector_path(cls, kwargs, dtype, layout, monkeypatch):
    backend = backends.load("cuda_on_cpu")
    rec = _Recorder(backend._ext)
    monkeypatch.setattr(backend, "_ext", rec)
    shapes = gpt2()
    ps = [torch.randn(s, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    opt = cls(ps, backend="cuda_on_cpu", **kwargs)
    for grads in random_grads(shapes, 2, dtype, "cpu"):  # step 2 of MADA reads the tangents (dot pass)
        _step(opt, ps, grads)
    segs = [ok for plan in rec.plans for launch in plan for ok in launch["aligned"]]
    assert len(rec.plans) >= 2 and len(segs) == len(rec.plans) * len(shapes)
    assert all(segs), f"{segs.count(False)} of {len(segs)} segments on the scalar path"
    assert _aligned_rows(opt._buckets[0])


@built
@pytest.mark.parametrize("case", ["full_mod", "adamod"])
def test_cuda_on_cpu_matches_the_reference_on_gpt2(case, layout):
    check("cuda_on_cpu", CASES[case], torch.float32, torch.device("cpu"), shapes=gpt2())


@pytest.mark.parametrize("backend", ["cpu", "cuda_on_cpu"])
def test_state_dict_is_per_parameter_and_round_trips(backend, layout):
    if backend not in backends.available():
        pytest.skip(backends.unavailable_reasons()[backend])
    shapes = gpt2()
    init = [torch.randn(s) for s in shapes]
    seq = random_grads(shapes, 3, torch.float32, "cpu")
    ps = [x.clone().requires_grad_() for x in init]
    opt = mada_fused.MADA(ps, backend=backend, **MADA_LEARN)
    for grads in seq[:2]:
        _step(opt, ps, grads)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    for p, st in zip(ps, saved["state"].values()):
        assert st["m"].shape == p.shape and st["tangents"].shape == (len(ALL), *p.shape)
    # A fresh optimizer loads it and takes the same step, bit for bit; pad elements stay zero.
    qs = [p.detach().clone().requires_grad_() for p in ps]
    other = mada_fused.MADA(qs, backend=backend, **MADA_LEARN)
    other.load_state_dict(saved)
    for a, b in zip(ps, qs):
        for name, t in opt.state[a].items():
            assert torch.equal(t, other.state[b][name]), name
    _step(opt, ps, seq[2])
    _step(other, qs, seq[2])
    assert all(torch.equal(a, b) for a, b in zip(ps, qs))
    assert opt.coefficients == other.coefficients
    for o in (opt, other):
        (bucket,) = o._buckets
        used = torch.zeros(bucket.numel, dtype=torch.bool)
        for off, p in zip(bucket.offsets, bucket.params):
            used[off:off + p.numel()] = True
        pads = [t[~used] for t in bucket.buffers.values()] + [bucket.tangents[:, ~used]]
        assert all(not t.any() for t in pads)


@pytest.mark.skipif(launch is None, reason="Triton is optional: pip install triton")
@pytest.mark.parametrize("cls, kwargs", [(mada_fused.MADA, MADA_LEARN), (mada_fused.AdaMod, ADAMOD)],
                         ids=["mada_learn", "adamod"])
def test_triton_layout_puts_every_chunk_on_the_vector_path(cls, kwargs, layout, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors: the interpreter (~0.1 s a block)
    monkeypatch.delenv("MADA_TRITON_CONFIG", raising=False)
    monkeypatch.setattr(launch, "_layouts", type(launch._layouts)())
    shapes = gpt2(vocab=131)
    ps = [torch.randn(s).requires_grad_() for s in shapes]
    opt = cls(ps, backend="triton", **kwargs)
    (grads,) = random_grads(shapes, 1, torch.float32, "cpu")
    _step(opt, ps, grads)
    (lay,) = launch._layouts.values()
    assert lay.n_chunks >= len(shapes) and lay.parts == [(0, lay.n_chunks, True)], lay.parts
    assert lay.t_aligned and _aligned_rows(opt._buckets[0])


@pytest.mark.skipif(launch is None, reason="Triton is optional: pip install triton")
@pytest.mark.parametrize("case", ["full_mod", "adamod"])
def test_triton_matches_the_reference_on_gpt2(case, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MADA_TRITON_CONFIG", raising=False)
    monkeypatch.setattr(flat_state, "host_layout", lambda device: False)  # what CUDA buckets get
    check("triton", CASES[case], torch.float32, torch.device("cpu"), shapes=gpt2(vocab=131))
