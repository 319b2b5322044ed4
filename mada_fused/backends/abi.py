"""The Python mirror of csrc/abi.h: the one call interface of the native extensions.

Codes, variant bits, state-slot orders, the learned-coefficient mask and the
byte layouts of ``SegRow`` (one active segment) and ``Call`` (one pass), as
``struct`` formats. Both extensions take the same ``run(call, alloc)``, where
``call`` is the bytes of :func:`pack_fixed` + :func:`pack_step`. Each extension
reports what it was compiled with (``ext.abi()``); tests/test_abi.py checks that
it equals :func:`report`. Plain data, no torch: like the header.
"""
from __future__ import annotations

import struct
from typing import Iterable, Sequence

# 2: Call.maximize applies to ADAMOD_STEP too; 3: Call.state_dtype, Call.sr_seed;
# 4 (purebf16): Call.param_round, Call.comp; 5: Call.tangent_dtype, in the place of 4's reserved field;
# 6: STATE_8BIT, Call.scales; 7: STATE_8BIT tangent rows, Call.tan_scales, Call.tan_scale_stride.
VERSION = 7

DTYPES: dict[str, int] = {"float32": 0, "float64": 1, "bfloat16": 2, "float16": 3}
# How a bf16 parameter's new value is stored (Call.param_round, docs/spec.md 5.2).
PARAM_ROUNDS: dict[str, int] = {"nearest": 0, "stochastic": 1, "kahan": 2}
# Call.state_dtype and Call.tangent_dtype only: 8-bit codes with fp32 block scales in Call.scales
# (docs/spec.md 5.4) and Call.tan_scales (5.5; 8-bit rows need 8-bit state).
STATE_8BIT = 4
MADA_STEP, MADA_DOT, ADAMOD_STEP = 0, 1, 2
OPS: dict[str, int] = {"mada_step": MADA_STEP, "mada_dot": MADA_DOT, "adamod_step": ADAMOD_STEP}
# Variant bits of a MADA step (optional state, and whether tangent rows are written) and of AdaMod.
MADA_BITS: dict[str, int] = {"beta3": 1, "vbar": 2, "lion": 4, "mod": 8, "tangents": 16}
ADAMOD_BITS: dict[str, int] = {"diff": 1}
# Order of Call.state; absent state is address 0.
MADA_STATE: tuple[str, ...] = ("m", "v", "n", "g_prev", "l", "vb", "s")
ADAMOD_STATE: tuple[str, ...] = ("m", "v", "s", "g_prev")
MAX_SLOTS = len(MADA_STATE)
# Order of Call.consts.
MADA_CONSTS: tuple[str, ...] = ("eps", "mod_beta", "lion_beta1", "lion_beta2")
ADAMOD_CONSTS: tuple[str, ...] = ("beta1", "beta2", "beta3", "eps")
NUM_CONSTS = 4
NUM_COEF = 6  # bits of the learn mask: beta1 beta2 beta3 rho c gamma (canonical order)

# (field, struct code), in memory order. Addresses are "Q", counts "q".
SEG_ROW: tuple[tuple[str, str], ...] = (
    ("param", "q"), ("grad", "q"), ("offset", "q"), ("numel", "q"), ("group", "q"), ("pindex", "q"),
)
# The part of a Call that is fixed for a (bucket, configuration, pass) ...
CALL_FIXED: tuple[tuple[str, str], ...] = (
    ("op", "i"), ("variant", "I"), ("dtype", "i"), ("learn_mask", "I"), ("maximize", "i"),
    ("vbar_detach", "i"), ("state_dtype", "i"), ("sr_seed", "I"), ("param_round", "i"),
    ("tangent_dtype", "i"), ("device", "q"), ("state_numel", "q"),
    ("num_groups", "q"), ("num_params", "q"),
    ("lr", "Q"), ("wd", "Q"), ("steps", "Q"), ("state", f"{MAX_SLOTS}Q"), ("comp", "Q"),
    ("scales", f"{MAX_SLOTS}Q"), ("tangents", "Q"),
    ("tan_stride", "q"), ("tan_scales", "Q"), ("tan_scale_stride", "q"), ("consts", f"{NUM_CONSTS}d"),
)
# ... and the part that changes from step to step.
CALL_STEP: tuple[tuple[str, str], ...] = (
    ("rows", "Q"), ("n_rows", "q"), ("coef", "Q"), ("grad_scale", "Q"), ("found_inf", "Q"),
    ("dot_out", "Q"), ("stream", "Q"), ("num_threads", "q"),
)

_FIXED = struct.Struct("<" + "".join(code for _, code in CALL_FIXED))
_STEP = struct.Struct("<" + "".join(code for _, code in CALL_STEP))
CALL_SIZE = _FIXED.size + _STEP.size


def layout(fields: Sequence[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    """name -> (byte offset, byte size) of packed ``fields`` (no padding: the header has none)."""
    out, offset = {}, 0
    for name, code in fields:
        size = struct.calcsize("<" + code)
        out[name] = (offset, size)
        offset += size
    return out


def report() -> dict:
    """What ``ext.abi()`` must return for an extension built from the matching abi.h."""
    return {
        "version": VERSION,
        "dtypes": dict(DTYPES),
        "param_rounds": dict(PARAM_ROUNDS),
        "ops": dict(OPS),
        "mada_bits": dict(MADA_BITS),
        "adamod_bits": dict(ADAMOD_BITS),
        "mada_slots": {name: i for i, name in enumerate(MADA_STATE)},
        "adamod_slots": {name: i for i, name in enumerate(ADAMOD_STATE)},
        "mada_consts": {name: i for i, name in enumerate(MADA_CONSTS)},
        "adamod_consts": {name: i for i, name in enumerate(ADAMOD_CONSTS)},
        "num_coef": NUM_COEF,
        "state_8bit": STATE_8BIT,
        "seg_row": {"size": struct.calcsize("<" + "".join(c for _, c in SEG_ROW)), "fields": layout(SEG_ROW)},
        "call": {"size": CALL_SIZE, "fields": layout(CALL_FIXED + CALL_STEP)},
    }


def mask_of(learn: Iterable[int]) -> int:
    """The mask of learned coefficients (canonical indices); tangent row r is the r-th set bit."""
    mask = 0
    for j in learn:
        if not 0 <= j < NUM_COEF:
            raise ValueError(f"coefficient index {j} out of range")
        mask |= 1 << j
    return mask


def pack_fixed(*, op: int, variant: int, dtype: int, state_dtype: int, sr_seed: int, learn_mask: int,
               maximize: bool, vbar_detach: bool, device: int, state_numel: int, num_groups: int,
               num_params: int, lr: int, wd: int, steps: int, state: Sequence[int], tangents: int, tan_stride: int,
               consts: Sequence[float], param_round: int = PARAM_ROUNDS["nearest"], comp: int = 0,
               tangent_dtype: int = DTYPES["float32"], scales: Sequence[int] = (), tan_scales: int = 0,
               tan_scale_stride: int = 0) -> bytes:
    """The fixed part of a Call; ``state`` (and, for 8-bit state, ``scales``) is in MADA_STATE or
    ADAMOD_STATE order, shorter lists padded with 0; ``tan_scales``: 8-bit rows' block scales."""
    if len(state) > MAX_SLOTS or len(scales) > MAX_SLOTS or len(consts) != NUM_CONSTS:
        raise ValueError(f"a call holds at most {MAX_SLOTS} state addresses and exactly {NUM_CONSTS} constants")
    return _FIXED.pack(op, variant, dtype, learn_mask, int(maximize), int(vbar_detach), state_dtype, sr_seed,
                       param_round, tangent_dtype, device, state_numel, num_groups, num_params, lr, wd, steps,
                       *state, *[0] * (MAX_SLOTS - len(state)), comp, *scales, *[0] * (MAX_SLOTS - len(scales)),
                       tangents, tan_stride, tan_scales, tan_scale_stride, *consts)


def pack_step(*, rows: int, n_rows: int, coef: int, grad_scale: int, found_inf: int, dot_out: int,
              stream: int, num_threads: int) -> bytes:
    """The per-step part of a Call; ``pack_fixed(...) + pack_step(...)`` is the whole call."""
    return _STEP.pack(rows, n_rows, coef, grad_scale, found_inf, dot_out, stream, num_threads)
