"""The one native call interface (csrc/abi.h) against its Python mirror (mada_fused/backends/abi.py).

Each extension reports the constants and layouts it was compiled with (``ext.abi()``); they
must equal the mirror's, or Python would pack calls the extension misreads. Then the checks
every call passes (csrc/abi_check.h), through both extensions: ``_C_cpu.run`` and the CUDA
extension's ``plan_info`` (which checks and plans without a GPU), when it is built.
"""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from mada_fused import MADA
from mada_fused.backends import abi, native
from mada_fused.backends.base import MadaKernelConfig


def _ext(name: str):
    try:
        return importlib.import_module(f"mada_fused.{name}")
    except ImportError as e:
        pytest.skip(f"mada_fused.{name} is not built ({e})")


@pytest.mark.parametrize("name", ["_C_cpu", "_C_cuda"])
def test_extension_was_compiled_from_the_mirrored_header(name):
    reported = _ext(name).abi()
    mirror = abi.report()
    assert reported.keys() == mirror.keys()
    for key in mirror:
        assert reported[key] == mirror[key], key


def test_mirror_layout_has_no_padding_to_hide():
    """The Python formats pack without padding; the C++ compiler pads to natural alignment.
    They agree only while every field sits at a multiple of its element size."""
    for fields in (abi.SEG_ROW, abi.CALL_FIXED + abi.CALL_STEP):
        for name, (offset, size) in abi.layout(fields).items():
            element = min(size, 8)
            assert offset % element == 0, name
    fixed, step = abi.layout(abi.CALL_FIXED), abi.layout(abi.CALL_STEP)
    assert len(abi.pack_fixed(**_FIXED_ZERO)) + len(abi.pack_step(**_STEP_ZERO)) == abi.CALL_SIZE
    assert sum(s for _, s in fixed.values()) % 8 == 0 and abi.CALL_SIZE % 8 == 0
    assert set(abi.ADAMOD_STATE) <= set(abi.MADA_STATE) and len(abi.MADA_STATE) == abi.MAX_SLOTS
    assert sorted(abi.MADA_BITS.values()) == [1, 2, 4, 8, 16] and "rows" in step


_FIXED_ZERO = dict(op=0, variant=0, dtype=0, state_dtype=0, sr_seed=0, learn_mask=0, maximize=False, vbar_detach=False, device=0,
                   state_numel=0, num_groups=0, num_params=0, lr=0, wd=0, steps=0, state=[], tangents=0,
                   tan_stride=0, consts=[0.0] * abi.NUM_CONSTS)
_STEP_ZERO = dict(rows=0, n_rows=0, coef=0, grad_scale=0, found_inf=0, dot_out=0, stream=0, num_threads=0)


def test_mask_and_variant_follow_the_canonical_order():
    assert abi.mask_of(()) == 0 and abi.mask_of((0, 2, 5)) == 0b100101
    with pytest.raises(ValueError):
        abi.mask_of((6,))
    cfg = MadaKernelConfig(learn=(2,), has_beta3=True, has_vbar=False, has_lion=False, has_mod=True, eps=1e-8,
                           mod_beta=0.9, lion_betas=(0.9, 0.99), vbar_detach=False, maximize=False)
    assert native.mada_variant(cfg) == abi.MADA_BITS["beta3"] | abi.MADA_BITS["mod"] | abi.MADA_BITS["tangents"]
    assert native.mada_variant(dataclasses.replace(cfg, learn=(), has_mod=False)) == abi.MADA_BITS["beta3"]


# -- the checks of csrc/abi_check.h ---------------------------------------------------------------
N = 8


class Call:
    """A good MADA step over real tensors (beta1 and beta3 learned, with dot_out), one field
    of which a case spoils."""

    def __init__(self):
        f32, f64 = dict(dtype=torch.float32), dict(dtype=torch.float64)
        self.p, self.g = torch.randn(N, **f32), torch.randn(N, **f32)
        self.state = [torch.zeros(N, **f32) for _ in range(4)]  # m v n g_prev
        self.tangents = torch.zeros(2, N, **f32)
        self.dot = torch.zeros(2, **f64)
        self.lr, self.wd, self.steps = torch.full((1,), 1e-2, **f64), torch.zeros(1, **f64), torch.ones(1, **f64)
        self.coef = torch.tensor([0.9, 0.999, 0.5, 1.0, 1.0, 1.0], **f64)
        bits = abi.MADA_BITS
        self.fixed = dict(
            op=abi.MADA_STEP, variant=bits["beta3"] | bits["tangents"], dtype=abi.DTYPES["float32"],
            state_dtype=abi.DTYPES["float32"], sr_seed=0, learn_mask=abi.mask_of((0, 2)), maximize=False, vbar_detach=False, device=0, state_numel=N,
            num_groups=1, num_params=1, lr=self.lr.data_ptr(), wd=self.wd.data_ptr(),
            steps=self.steps.data_ptr(), state=[t.data_ptr() for t in self.state],
            tangents=self.tangents.data_ptr(), tan_stride=N, consts=[1e-8, 0.0, 0.9, 0.99],
        )
        self.row = dict(param=self.p.data_ptr(), grad=self.g.data_ptr(), offset=0, numel=N, group=0, pindex=0)
        self.step = dict(coef=self.coef.data_ptr(), grad_scale=0, found_inf=0, dot_out=self.dot.data_ptr(),
                         stream=0, num_threads=1)

    def packed(self) -> bytes:
        self.table = torch.tensor([self.row[name] for name, _ in abi.SEG_ROW], dtype=torch.int64)
        return abi.pack_fixed(**self.fixed) + abi.pack_step(rows=self.table.data_ptr(), n_rows=1, **self.step)

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in (self.p, *self.state, self.tangents, self.dot)]


def _spoil(call: Call, case: str) -> None:
    fixed, row, step = call.fixed, call.row, call.step
    bits = abi.MADA_BITS
    if case == "op":
        fixed["op"] = 7
    elif case == "dtype":
        fixed["dtype"] = len(abi.DTYPES)
    elif case == "state dtype":
        fixed["state_dtype"] = abi.DTYPES["float16"]
    elif case == "tangent dtype":
        fixed["tangent_dtype"] = abi.DTYPES["float16"]
    elif case == "fp64 tangents":
        fixed["tangent_dtype"] = abi.DTYPES["float64"]
    elif case == "8-bit rows, fp32 state":
        fixed["tangent_dtype"] = abi.STATE_8BIT
    elif case == "variant":
        fixed["variant"] = 32
    elif case == "learn mask":
        fixed["learn_mask"] = 1 << abi.NUM_COEF
    elif case == "tangents bit":
        fixed["variant"] = bits["beta3"]
    elif case == "lacks its state":
        fixed["variant"] = bits["tangents"]
    elif case == "outside":
        row["offset"] = 1
    elif case == "negative":
        row["numel"] = -1
    elif case == "group":
        row["group"] = 1
    elif case == "step counter":
        row["pindex"] = 1
    elif case == "null param":
        row["param"] = 0
    elif case == "state buffer":
        fixed["state"] = fixed["state"][:3]
    elif case == "tangent rows":
        fixed["tangents"] = 0
    elif case == "row stride":
        fixed["tan_stride"] = N - 1
    elif case == "coefficients":
        step["coef"] = 0
    elif case == "no lr":
        fixed["lr"] = 0
    elif case == "dot without rows":
        fixed.update(variant=bits["beta3"], learn_mask=0)
    elif case == "dot pass without dot_out":
        fixed.update(op=abi.MADA_DOT, variant=0)
        step["dot_out"] = 0
    elif case == "adamod learns":
        fixed.update(op=abi.ADAMOD_STEP, variant=0)
    elif case == "param round":
        fixed["param_round"] = len(abi.PARAM_ROUNDS)
    elif case == "param round of fp32":  # the call's parameters are fp32
        fixed["param_round"] = abi.PARAM_ROUNDS["stochastic"]
    elif case == "kahan without comp":
        fixed.update(dtype=abi.DTYPES["bfloat16"], param_round=abi.PARAM_ROUNDS["kahan"], comp=0)
    else:
        raise AssertionError(case)


CASES = {
    "op": "unknown op", "dtype": "unknown dtype", "state dtype": "does not go with",
    "tangent dtype": "tangent dtype code 3 does not go with", "fp64 tangents": "tangent dtype code 1 does not go with",
    "8-bit rows, fp32 state": "8-bit tangent rows need 8-bit state",
    "variant": "variant", "learn mask": "learn mask",
    "tangents bit": "tangents bit", "lacks its state": "lacks its state", "outside": "outside the flat state",
    "negative": "outside the flat state", "group": "bad group", "step counter": "parameter index",
    "null param": "null address", "state buffer": "state buffer", "tangent rows": "tangent rows",
    "row stride": "tangent rows", "coefficients": "coefficients", "no lr": "lr, weight_decay and steps",
    "dot without rows": "dot_out needs tangent rows", "dot pass without dot_out": "needs dot_out",
    "adamod learns": "AdaMod learns", "param round": "unknown parameter rounding",
    "param round of fp32": "bf16 parameters only", "kahan without comp": "compensation buffer",
}


def _entries():
    """(name, function taking a packed call) of each built extension."""
    out = []
    for name, fn in (("_C_cpu", "run"), ("_C_cuda", "plan_info")):
        try:
            out.append((name, getattr(importlib.import_module(f"mada_fused.{name}"), fn)))
        except ImportError:
            pass
    return out


@pytest.mark.parametrize("name, entry", _entries(), ids=[n for n, _ in _entries()])
def test_a_good_call_passes(name, entry):
    call = Call()
    before = call.snapshot()
    entry(call.packed())
    if name == "_C_cpu":  # it ran: the parameter moved and the tangent rows were written
        assert not torch.equal(call.p, before[0]) and not torch.equal(call.tangents, before[5])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name, entry", _entries(), ids=[n for n, _ in _entries()])
def test_a_spoiled_call_is_refused_and_changes_nothing(name, entry, case):
    call = Call()
    _spoil(call, case)
    before = call.snapshot()
    with pytest.raises(ValueError, match=CASES[case]):
        entry(call.packed())
    for a, b in zip(before, call.snapshot()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name, entry", _entries(), ids=[n for n, _ in _entries()])
def test_a_call_of_the_wrong_size_is_refused(name, entry):
    call = Call().packed()
    for bad in (call[:-8], call + bytes(8), b""):
        with pytest.raises(ValueError, match="a call is"):
            entry(bad)
    with pytest.raises(TypeError):
        entry(bytearray(call))  # bytes only: a buffer could change under the kernels


def test_the_call_is_packed_once_per_bucket_and_config(monkeypatch):
    _ext("_C_cpu")
    packed = []
    real = abi.pack_fixed
    monkeypatch.setattr(abi, "pack_fixed", lambda **kw: packed.append(kw["op"]) or real(**kw))
    params = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(3, 5))]
    opt = MADA(params, lr=1e-2, learn=("beta1",), hyper_warmup=0, hyper_order="exact", backend="cpu")
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert packed == [abi.MADA_STEP, abi.MADA_DOT]  # the first step has no tangents to reduce yet
    opt.param_groups[0]["lr"] = 5e-3  # a new value in the same lr table: nothing to repack
    opt.step()
    assert len(packed) == 2


@pytest.mark.parametrize("name", ["_C_cpu", "_C_cuda", "_C_cuda_on_cpu"])
def test_bf16_state_runs_in_every_extension(name):
    ext = _ext(name)
    call = Call()
    call.state = [torch.zeros(N, dtype=torch.bfloat16) for _ in range(4)]
    call.fixed.update(state_dtype=abi.DTYPES["bfloat16"], state=[t.data_ptr() for t in call.state])
    if name == "_C_cuda":  # host memory: the planner only (16-byte bf16 words: the vector path)
        assert ext.plan_info(call.packed())[0]["aligned"] == [True]
        return
    if name == "_C_cpu":
        ext.run(call.packed())
    else:
        ext.run(call.packed(), lambda n: torch.empty(n, dtype=torch.float64))
    assert call.state[0].any() and call.state[1].any()  # m and v were written


@pytest.mark.parametrize("name", ["_C_cpu", "_C_cuda", "_C_cuda_on_cpu"])
def test_bf16_tangent_rows_run_in_every_extension(name):
    ext = _ext(name)
    call = Call()
    call.tangents = torch.full((2, N), float("nan"), dtype=torch.bfloat16)
    call.fixed.update(tangent_dtype=abi.DTYPES["bfloat16"], tangents=call.tangents.data_ptr())
    if name == "_C_cuda":  # host memory: the planner only (16-byte bf16 words: the vector path)
        assert ext.plan_info(call.packed())[0]["aligned"] == [True]
        return
    f32 = Call()  # the same call with fp32 rows
    f32.p.copy_(call.p), f32.g.copy_(call.g)
    if name == "_C_cpu":
        ext.run(call.packed())
        ext.run(f32.packed())
    else:
        alloc = lambda n: torch.empty(n, dtype=torch.float64)  # noqa: E731
        ext.run(call.packed(), alloc)
        ext.run(f32.packed(), alloc)
    assert f32.tangents[0].all()  # (du/dbeta3 is 0 at step 1: d = n = 0)
    torch.testing.assert_close(call.tangents.float(), f32.tangents, rtol=2**-7, atol=0)  # all written


@pytest.mark.parametrize("round_", ["stochastic", "kahan"])
@pytest.mark.parametrize("name", ["_C_cpu", "_C_cuda", "_C_cuda_on_cpu"])
def test_bf16_param_rounding_runs_in_every_extension(name, round_):
    ext = _ext(name)
    call = Call()
    call.p, call.g = call.p.to(torch.bfloat16), call.g.to(torch.bfloat16)
    call.comp = torch.zeros(N, dtype=torch.bfloat16)
    call.row.update(param=call.p.data_ptr(), grad=call.g.data_ptr())
    call.fixed.update(dtype=abi.DTYPES["bfloat16"], param_round=abi.PARAM_ROUNDS[round_],
                      comp=call.comp.data_ptr() if round_ == "kahan" else 0)
    if name == "_C_cuda":  # host memory: the planner only (16-byte bf16 words: the vector path)
        assert ext.plan_info(call.packed())[0]["aligned"] == [True]
        return
    before = call.p.clone()
    if name == "_C_cpu":
        ext.run(call.packed())
    else:
        ext.run(call.packed(), lambda n: torch.empty(n, dtype=torch.float64))
    assert not torch.equal(call.p, before) and (round_ != "kahan" or call.comp.any())


@pytest.mark.parametrize("name", ["_C_cuda", "_C_cuda_on_cpu"])
def test_the_cuda_planner_refuses_8bit_state_by_name(name):
    ext = _ext(name)
    call = Call()
    blk = 256  # one whole 8-bit block, so only the planner can object
    call.state = [torch.zeros(blk, dtype=torch.uint8) for _ in range(4)]
    call.scales = [torch.ones(1) for _ in range(4)]
    call.tangents = torch.zeros(2, blk)
    call.fixed.update(state_dtype=abi.STATE_8BIT, state=[t.data_ptr() for t in call.state], state_numel=blk,
                      scales=[t.data_ptr() for t in call.scales], tangents=call.tangents.data_ptr(), tan_stride=blk)
    before = call.snapshot()
    with pytest.raises(ValueError, match="do not store 8-bit state"):
        ext.plan_info(call.packed())
    assert all(torch.equal(a, b) for a, b in zip(call.snapshot(), before))


def _q8_call(rows: bool) -> Call:
    """A good MADA step over one whole 8-bit block, with 8-bit tangent rows when ``rows``."""
    call = Call()
    blk = 256
    call.p, call.g = torch.randn(blk), torch.randn(blk)
    call.row.update(param=call.p.data_ptr(), grad=call.g.data_ptr(), numel=blk)
    call.state = [torch.zeros(blk, dtype=torch.uint8) for _ in range(4)]
    call.scales = [torch.ones(1) for _ in range(4)]
    call.tangents = torch.zeros(2, blk, dtype=torch.uint8 if rows else torch.float32)
    call.tan_scales = torch.ones(2, 1)
    call.fixed.update(state_dtype=abi.STATE_8BIT, state=[t.data_ptr() for t in call.state], state_numel=blk,
                      scales=[t.data_ptr() for t in call.scales], tangents=call.tangents.data_ptr(), tan_stride=blk)
    if rows:
        call.fixed.update(tangent_dtype=abi.STATE_8BIT, tan_scales=call.tan_scales.data_ptr(), tan_scale_stride=1)
    return call


@pytest.mark.parametrize("name", ["_C_cuda", "_C_cuda_on_cpu"])
def test_the_cuda_planner_refuses_8bit_tangent_rows_by_name(name):
    ext = _ext(name)
    call = _q8_call(rows=True)
    before = call.snapshot()
    with pytest.raises(ValueError, match="do not store 8-bit tangent rows"):
        ext.plan_info(call.packed())
    assert all(torch.equal(a, b) for a, b in zip(call.snapshot(), before))


@pytest.mark.parametrize("case, why", [("tan_scales", "need their block scales"),
                                       ("tan_scale_stride", "need their block scales"),
                                       ("tan_stride", "whole 256-element blocks")])
def test_8bit_tangent_rows_without_their_scales_are_refused(case, why):
    ext = _ext("_C_cpu")
    call = _q8_call(rows=True)
    call.fixed[case] = 0 if case != "tan_stride" else 257
    call.tangents = torch.zeros(2, 257, dtype=torch.uint8)[:, :256]
    call.fixed["tangents"] = call.tangents.data_ptr()
    before = call.snapshot()
    with pytest.raises(ValueError, match=why):
        ext.run(call.packed())
    assert all(torch.equal(a, b) for a, b in zip(call.snapshot(), before))
