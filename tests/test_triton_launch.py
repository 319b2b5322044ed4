"""The Triton backend's host side and address arithmetic (triton_kernels/launch.py), without a GPU:
launch config, layout cache, CUDA-graph capture guard, and 64-bit tangent offsets."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is optional: pip install triton")

import mada_fused  # noqa: E402
from mada_fused.triton_kernels import launch  # noqa: E402

from conformance_cases import ALL  # noqa: E402  (tests/, on sys.path through conftest)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MADA_TRITON_CONFIG", raising=False)


def test_config_is_fixed_or_pinned(monkeypatch):
    """No timing on live data: one default, the same on every rank, or the pinned one; a bad pin is refused."""
    monkeypatch.delenv(launch.CONFIG_ENV, raising=False)
    assert launch._config() == launch.CONFIGS[0]
    monkeypatch.setenv(launch.CONFIG_ENV, "512,4")
    assert launch._config() == (512, 4)
    for bad in ("3000,4", "1024", "a,b", "1024,3", "0,4"):
        monkeypatch.setenv(launch.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=launch.CONFIG_ENV):
            launch._config()


def test_layout_key_holds_tangent_stride_and_bucket_size(interpret, monkeypatch):
    """Two optimizers over the same tensors (same pointers, offsets, groups) but buckets of
    different size and tangent stride must not share a chunk table: its T_ALIGNED promise and
    bound check were made for one bucket."""
    monkeypatch.setattr(launch, "_layouts", type(launch._layouts)())
    ps = [torch.randn(6, requires_grad=True), torch.randn(5, requires_grad=True)]
    extra = torch.randn(3, requires_grad=True)  # never gets a grad: same active segments, larger bucket
    plain = mada_fused.MADA(ps, backend="triton", lr=1e-2, learn=())
    learning = mada_fused.MADA([*ps, extra], backend="triton", lr=1e-2, learn=ALL, hyper_warmup=0)
    for p in ps:
        p.grad = torch.randn_like(p)
    plain.step()
    learning.step()
    assert len(launch._layouts) == 2
    strides = {opt._buckets[0].tangent_stride for opt in (plain, learning)}
    for lay, stride in zip(launch._layouts.values(), (plain._buckets[0].tangent_stride,
                                                      learning._buckets[0].tangent_stride)):
        assert lay.t_aligned == (stride % lay.s_vec == 0)
    assert len(strides) == 2


def test_new_layout_refused_under_capture(monkeypatch):
    """A first table needs pinned host memory and an upload, which a CUDA graph cannot record:
    refused with a clear error before anything is cached (a capture runs nothing, so nothing changed)."""
    monkeypatch.setattr(launch, "_layouts", type(launch._layouts)())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    p = torch.zeros(4)
    seg = SimpleNamespace(params=[p], grads=[p], offsets=[0], numels=[4], groups=[0], param_index=[0])
    bucket = SimpleNamespace(device=torch.device("cuda"), state_dtype=torch.float32, tangent_dtype=torch.float32,
                             numel=4, tangent_stride=4)
    with pytest.raises(RuntimeError, match="warm-up"):
        launch._layout(seg, bucket, launch._CHUNK)
    assert not launch._layouts
    with pytest.raises(RuntimeError, match="warm-up"):  # the fp64 constants are uploaded once too
        launch._const((0.5, 1.5), torch.device("cuda"))


def test_tangent_row_offset_is_64_bit():
    """Triton passes a tangent stride below 2^31 as i32; row * stride must still be formed in i64
    (six learned rows wrap an i32 product once a bucket passes ~430M elements)."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernels(False).fused_step
    ptr = dict(table="*i64", coef="*fp64", steps="*fp64", consts="*fp64", partial="*fp64")
    meta = dict(KIND=0, STEP=True, DOT=True, ROWS=sum(k << (3 * k) for k in range(6)), NL=6, NLP=8,
                HAS_BETA3=True, HAS_VBAR=True, HAS_LION=True, HAS_MOD=True, VBAR_DETACH=False, MAXIMIZE=False,
                DIFF=False, HAS_SCALE=False, HAS_INF=False, SR=False, PROUND=0, ALIGNED=False, T_ALIGNED=False,
                S_VEC=4, CHUNK=8192,
                BLOCK=1024, Q8=False, TQ8=False)
    sig = {n: "i32" if n in ("tstride", "n_chunks", "first", "seed") else ptr.get(n, "*fp32")
           for n in fn.arg_names if n not in meta}
    src = ASTSource(fn=fn, signature=sig | {k: "constexpr" for k in meta}, constexprs=meta)
    ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8)).asm["ttir"]
    assert "arith.extsi %tstride : i32 to i64" in ttir
    assert not re.search(r"arith\.muli [^\n]*%tstride\b[^\n]*: i32", ttir)


def test_kernels_have_one_import_path(monkeypatch):
    """The backend imports mada_fused.triton_kernels and nothing else: no loader of its own that
    could hand back a second copy of the folder; not installed, it says how to install it."""
    import importlib
    import sys

    from mada_fused import backends

    module = importlib.import_module("mada_fused.backends.triton")
    assert module.load()._k is sys.modules["mada_fused.triton_kernels"]
    monkeypatch.setitem(sys.modules, "mada_fused.triton_kernels", None)  # the import now fails
    with pytest.raises(backends.BackendUnavailable, match="pip install -e"):
        module.load()
