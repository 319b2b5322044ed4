"""What a state_dict must hold for a mada-fused optimizer to load it.

Everything is checked before anything is copied, on the host: loading is not
a hot path, and a checkpoint that loads must not give NaN parameters on the
next step.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import _checks, quant8
from .distributed import local_shape, local_tensor
from .flat_state import KAHAN_COMP, param_round_for

if TYPE_CHECKING:
    from .optimizer import FusedOptimizer

# Second moments and their running mean: a negative or NaN value is corruption.
_NON_NEGATIVE = ("v", "vb")


def check(opt: FusedOptimizer, sd: Mapping[str, Any], params: list[torch.Tensor]) -> tuple[list[list[int]], dict[int, Mapping]]:
    """The saved bucket layout and per-parameter state, keyed by parameter position."""
    def bad(why: str) -> ValueError:
        return ValueError(f"cannot load this state_dict into {type(opt).__name__}: {why}")

    if not isinstance(sd, Mapping) or not {"state", "param_groups", "mada"} <= set(sd):
        raise bad(
            "it needs the keys 'state', 'param_groups' and 'mada' (torch.distributed.checkpoint's "
            "state_dict helpers drop 'mada': use those in mada_fused.distributed)"
        )
    extra = sd["mada"]
    if not isinstance(extra, Mapping) or extra.get("config") != opt._config():
        got = extra.get("config") if isinstance(extra, Mapping) else extra
        raise bad(f"it comes from another configuration ({got} != {opt._config()})")
    groups = sd["param_groups"]
    if len(groups) != len(opt.param_groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(groups, opt.param_groups)
    ):
        raise bad("its parameter groups differ in number or size from this optimizer's")
    for i, (group, live) in enumerate(zip(groups, opt.param_groups)):
        unknown = set(group) - _checks.GROUP_KEYS - set(opt._PER_GROUP) - set(opt.defaults) - set(live)
        if unknown:
            raise bad(f"param_groups[{i}] has keys {sorted(unknown)} that {type(opt).__name__} does not know")
        _checks.group_lr(group, i, read_tensor=True)
        opt._configs([{**live, **group}], i)  # the options it would set (betas, eps, ...)
    # Saved ids map to parameters by position, as in torch.optim.
    ids = [pid for g in groups for pid in g["params"]]
    pos = {pid: k for k, pid in enumerate(ids)}
    layout = extra.get("buckets")
    if not isinstance(layout, list):
        raise bad("'mada' has no bucket layout")
    layout = [[pos.get(i, -1) for i in b] if isinstance(b, list) else None for b in layout]
    flat = [i for b in layout if b is not None for i in b]
    if None in layout or -1 in flat or len(set(flat)) != len(flat) or any(not b for b in layout):
        raise bad("its bucket layout does not match its parameter groups")
    # Reading optimizer.state[p] of a parameter that never stepped leaves an
    # empty entry behind (it is a defaultdict); that is no state at all.
    state = {pos.get(k, -1): v for k, v in sd["state"].items() if not (isinstance(v, Mapping) and not v)}
    if set(state) != set(flat):
        raise bad("its per-parameter state does not match its bucket layout")
    for members in layout:
        first = params[members[0]]
        for i in members:
            p = params[i]
            if (p.device, p.dtype) != (first.device, first.dtype):
                raise bad("a saved bucket mixes devices or dtypes in this optimizer")
            state[i] = _param_state(opt, state[i], p, i)
    if "sr_seed" in extra:
        _checks.sr_seed(extra["sr_seed"])
    opt._check_extra_state(extra)
    return layout, state


def _param_state(opt: FusedOptimizer, st: Any, p: torch.Tensor, i: int) -> Mapping[str, Any]:
    """Parameter ``i``'s saved state, checked, with ``step`` as a tensor. A buffer, and the
    tangent rows, are values (any float dtype) or 8-bit codes with their ``{name}_scale``
    (docs/spec.md 5.4, 5.5), whatever this optimizer's state and tangent dtypes: loading
    converts."""
    expected = {"step": ()} | {n: tuple(p.shape) for n in opt._state_names()}
    coded = set(opt._state_names())
    if opt._num_tangents():
        expected["tangents"] = (opt._num_tangents(), *p.shape)
        coded.add("tangents")
    # Kahan summation's compensation may be there or not, whatever this optimizer keeps:
    # absent, it starts at 0; kept by the checkpoint only, it is dropped (docs/spec.md 5.2).
    given = set(st) - {KAHAN_COMP} if isinstance(st, Mapping) else set()
    # Blocks are per local shard: a DTensor parameter's scales are its rank's, a plain tensor.
    blocks = quant8.num_blocks(local_shape(p).numel())
    for n in sorted(coded):
        if isinstance(st, Mapping) and isinstance(st.get(n), torch.Tensor) and st[n].dtype == quant8.CODE_DTYPE:
            expected[f"{n}_scale"] = expected[n][: len(expected[n]) - p.dim()] + (blocks,)
    if not isinstance(st, Mapping) or given != set(expected):
        got = sorted(st) if isinstance(st, Mapping) else type(st).__name__
        raise ValueError(f"state of parameter {i} has entries {got}, expected {sorted(expected)}")
    keep = KAHAN_COMP in st and param_round_for(p.dtype, opt._param_round) == "kahan"
    if keep:
        expected[KAHAN_COMP] = tuple(p.shape)
    st = {k: v for k, v in st.items() if k != KAHAN_COMP or keep}
    st["step"] = _step_tensor(st["step"], i)
    for name, shape in expected.items():
        t = st[name]
        codes = isinstance(t, torch.Tensor) and name in coded and t.dtype == quant8.CODE_DTYPE
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not (t.is_floating_point() or codes):
            raise ValueError(f"state[{i}][{name!r}] must be a float tensor (or, for a state buffer or the "
                             f"tangent rows, 8-bit codes) of shape {shape}")
        if name.endswith("_scale"):
            _scales(name, t, i)
            continue
        # A sharded parameter needs its state sharded the same way (DCP does that).
        local = shape[: len(shape) - p.dim()] + tuple(local_shape(p))
        if name != "step" and tuple(local_shape(t)) != local:
            raise ValueError(f"state[{i}][{name!r}] is not sharded like its parameter ({local} here)")
        if not codes:
            _values(name, local_tensor(t), i)
    return st


def _scales(name: str, t: torch.Tensor, i: int) -> None:
    """8-bit block scales are fp32 powers of two, at least 2^-126 (quant8.q8_scale); a NaN
    one (a block lost to an inf or NaN) is a diverged run, not a checkpoint to resume."""
    if t.dtype != torch.float32 or t.device.type == "meta":
        raise ValueError(f"state[{i}][{name!r}] must be an fp32 tensor with data")
    bits = t.detach().cpu().view(torch.int32)
    if not bool(((bits & 0x7FFFFF == 0) & (bits >= 1 << 23) & (bits < 0x7F800000)).all()):
        raise ValueError(f"state[{i}][{name!r}] holds values that are not 8-bit block scales "
                         "(finite powers of two >= 2^-126): the checkpoint is corrupt")


def _step_tensor(step: Any, i: int) -> Any:
    """A saved step count as the float tensor the buckets hold.

    torch.optim kept ``step`` as a Python number before torch 1.12, and some
    hand-written checkpoints still do; a whole number is the same count either
    way, and so is an integer tensor. Whether the value is a valid count is
    :func:`_values`'s check.
    """
    if isinstance(step, torch.Tensor):
        integer = not (step.is_floating_point() or step.is_complex() or step.dtype == torch.bool)
        return step.to(torch.float64) if integer else step  # a bool or complex one is refused later
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise ValueError(f"state[{i}]['step'] must be a number or a 0-dim tensor, got {type(step).__name__}")
    try:
        return torch.tensor(float(step), dtype=torch.float64)
    except OverflowError:  # an int beyond float64's range
        raise ValueError(f"state[{i}]['step'] = {step} is too large to be a step count") from None


def _values(name: str, t: torch.Tensor, i: int) -> None:
    if t.device.type == "meta":
        raise ValueError(f"state[{i}][{name!r}] is on the meta device: it holds no values")
    if name == "step":
        step = float(t)
        if not (math.isfinite(step) and step >= 0 and step == math.floor(step)):
            raise ValueError(f"state[{i}]['step'] must be a whole number >= 0, got {step}")
    elif name in _NON_NEGATIVE and not bool((t >= 0).all()):
        raise ValueError(f"state[{i}][{name!r}] holds negative or NaN values: the checkpoint is corrupt")
    elif name == KAHAN_COMP and not bool(t.isfinite().all()):
        raise ValueError(f"state[{i}][{name!r}] holds inf or NaN values: the checkpoint is corrupt")
