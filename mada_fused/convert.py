"""Switch a run between ``torch.optim.Adam``/``AdamW`` and a mada-fused optimizer
mid-training, keeping its moments.

:func:`from_adam` turns an Adam/AdamW ``state_dict`` into one that
``load_state_dict`` of a :class:`~mada_fused.MADA`, :class:`~mada_fused.AVGrad`,
:class:`~mada_fused.AdaMod` or :class:`~mada_fused.DiffMod` built on the same
parameters accepts; :func:`to_adamw` goes the other way::

    adam_sd = adamw.state_dict()
    opt = AVGrad(model.parameters(), lr=1e-3)      # the same parameters, in the same groups
    opt.load_state_dict(from_adam(adam_sd, opt))

    adamw = torch.optim.AdamW(model.parameters())  # the same groups as opt
    adamw.load_state_dict(to_adamw(opt))

What carries over, per parameter: ``exp_avg`` <-> ``m``, ``exp_avg_sq`` <-> ``v``
and ``step`` <-> ``step``. The step count means the same on both sides (the
number of steps taken; the next step is ``t = step + 1``), so Adam's bias
corrections ``1 - beta^t`` continue where they were. MADA at Adam's corner
(``beta3=0, rho=1, c=1, gamma=1, mod_beta=0, learn=()``, docs/spec.md section
1.3) is AdamW, so a run switched to it, or from it, continues as the same
AdamW run would, to rounding. AVGrad, AdaMod and DiffMod read the same
``m``, ``v`` and bias corrections, each in its own update (AdaMod folds the
corrections into its step size, with ``eps`` outside: docs/spec.md section 3).
Per parameter group, ``lr`` and ``weight_decay`` carry over both ways.

What Adam does not have, and so starts fresh in the mada-fused optimizer:

- ``vb``, AVGrad's running mean of ``v`` (MADA with ``rho < 1``): set to the
  current ``v``. It is the mean over every step so far, weighted by the step
  count, so a zero would count as ``step`` steps of zero ``v`` and inflate the
  next steps by up to ``sqrt(step)``; the present ``v`` is the estimate that
  treats the past as like the present.
- ``s``, AdaMod's (and MADA's ``mod_beta``) long-term step-size average: 0, as
  in a fresh optimizer, so the cap on the step size warms up again.
- ``g_prev``, the previous gradient (DiffMod, MADA's Adan term), and ``n``,
  ``l`` (MADA's Adan and Lion momenta): 0. The first step after the switch sees
  ``g - g_prev = g``, as DiffMod's own first step does.
- ``tangents`` (MADA): 0, and the first step after the switch computes no
  hyper-gradient, as a fresh optimizer's first step. MADA's coefficients and
  hyper-gradient state stay those the target optimizer has.

AdamW has no counterpart of those, so :func:`to_adamw` drops them; it exports
``m``, ``v``, ``step`` of any of the four (AdaMod's are Adam's moments too).

Settings that mada-fused keeps for the whole optimizer rather than per group
(``betas``, ``eps``, ``maximize``) must agree between the two: the target is
built with Adam's values, or :func:`from_adam` raises ``ValueError``. So does a
``state_dict`` of AMSGrad (its ``max_exp_avg_sq`` has no counterpart) or of
``torch.optim.Adam`` with an L2 ``weight_decay`` (mada-fused decays decoupled,
as AdamW).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from . import _checks
from .mada import MADA
from .optimizer import FusedOptimizer, _by_key

# Adam's per-parameter state and ours: the same moments under other names.
_MOMENTS = {"exp_avg": "m", "exp_avg_sq": "v"}
# Settings that a group carries in torch.optim.Adam; mada-fused may keep them global.
_SHARED = ("betas", "eps", "maximize")


def from_adam(adam_state_dict: Mapping[str, Any], optimizer: FusedOptimizer) -> dict[str, Any]:
    """A ``state_dict`` for ``optimizer`` holding the moments of ``adam_state_dict``.

    ``adam_state_dict`` comes from ``torch.optim.Adam`` or ``AdamW`` over the
    same parameters, in the same groups, as ``optimizer``. The result shares
    Adam's moment tensors (``load_state_dict`` copies them). Raises
    ``ValueError`` when the two do not fit; nothing is changed then.
    """
    def bad(why: str) -> ValueError:
        return ValueError(f"cannot convert this Adam state_dict for {type(optimizer).__name__}: {why}")

    if not isinstance(adam_state_dict, Mapping) or not {"state", "param_groups"} <= set(adam_state_dict):
        raise bad("it needs the keys 'state' and 'param_groups'")
    groups = adam_state_dict["param_groups"]
    live = optimizer.param_groups
    if len(groups) != len(live) or any(len(s["params"]) != len(g["params"]) for s, g in zip(groups, live)):
        raise bad("its parameter groups differ in number or size from this optimizer's")
    for i, (group, mine) in enumerate(zip(groups, live)):
        if group.get("amsgrad", False):
            raise bad(f"param_groups[{i}] is AMSGrad's: its max_exp_avg_sq has no counterpart here")
        if group.get("weight_decay", 0.0) and group.get("decoupled_weight_decay") is False:
            raise bad(f"param_groups[{i}] is torch.optim.Adam's with an L2 weight_decay; mada-fused decays "
                      "decoupled, as AdamW: set that group's weight_decay to 0 (or convert from AdamW)")
        for key in _SHARED:
            if key in group and not _per_group(optimizer, key) and not _same(group[key], _setting(optimizer, mine, key)):
                raise bad(f"param_groups[{i}] has {key}={group[key]!r} but this optimizer has "
                          f"{_setting(optimizer, mine, key)!r}: build it with {key}={group[key]!r}")

    sd = optimizer.state_dict()
    params = optimizer._param_list()
    # Adam's ids map to parameters by position, as in torch.optim.
    pos = {pid: k for k, pid in enumerate(pid for g in groups for pid in g["params"])}
    state: dict[int, dict[str, Any]] = {}
    for pid, adam in adam_state_dict["state"].items():
        if isinstance(adam, Mapping) and not adam:  # an unstepped parameter's empty entry
            continue
        if pid not in pos:
            raise bad(f"its state has an entry for parameter id {pid!r}, which no group lists")
        k = pos[pid]
        if not isinstance(adam, Mapping) or not {"step", *_MOMENTS} <= set(adam):
            got = sorted(adam) if isinstance(adam, Mapping) else type(adam).__name__
            raise bad(f"state of parameter {k} has entries {got}, expected at least {sorted({'step', *_MOMENTS})}")
        state[k] = _fresh_state(optimizer, adam)
    for group, adam in zip(sd["param_groups"], groups):
        for key in ("lr", "weight_decay", *_SHARED):
            if key in adam and key in group and (key not in _SHARED or _per_group(optimizer, key)):
                group[key] = adam[key]
    sd["state"] = state
    extra = sd["mada"]
    stepped = [params[k] for k in sorted(state)]
    index = {id(p): k for k, p in enumerate(params)}
    extra["buckets"] = [[index[id(p)] for p in ps] for ps in _by_key(stepped)]
    if "has_tangents" in extra:  # MADA: the zero tangents are no previous step's
        extra["has_tangents"] = False
    return sd


def to_adamw(optimizer: FusedOptimizer) -> dict[str, Any]:
    """A ``torch.optim.AdamW`` ``state_dict`` holding ``optimizer``'s moments.

    Load it into an AdamW built over the same parameters, in the same groups.
    Its tensors are copies (AdamW's ``load_state_dict`` would otherwise step
    ``optimizer``'s own buffers). ``betas``, ``eps`` and ``maximize`` are
    ``optimizer``'s (MADA's ``betas``: its current ``beta1``, ``beta2``).
    """
    params = optimizer._param_list()
    # AdamW's own defaults for what mada-fused has no setting of (amsgrad, foreach, fused, ...).
    defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
    # torch's rule for where a non-capturable Adam keeps its step (optimizer._get_scalar_dtype).
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, p in enumerate(params):
        ours = optimizer.state.get(p)
        if not ours:
            continue
        state[k] = {"step": torch.tensor(float(ours["step"]), dtype=step_dtype)}
        for adam_name, name in _MOMENTS.items():
            state[k][adam_name] = ours[name].to(dtype=p.dtype, copy=True)
    groups = []
    start = 0
    for group in optimizer.param_groups:
        n = len(group["params"])
        out = {**defaults, **{key: _setting(optimizer, group, key) for key in _SHARED}}
        out.update({key: group[key] for key in ("lr", "weight_decay")})
        out.update({key: group[key] for key in _checks.GROUP_KEYS - {"params"} if key in group})
        out["betas"] = tuple(out["betas"])
        out["params"] = list(range(start, start + n))
        groups.append(out)
        start += n
    return {"state": state, "param_groups": groups}


def _per_group(optimizer: FusedOptimizer, key: str) -> bool:
    """Whether ``optimizer`` takes ``key`` per group (MADA's groups only show its starting betas)."""
    return key in type(optimizer)._GROUP_OPTIONS


def _setting(optimizer: FusedOptimizer, group: Mapping[str, Any], key: str) -> Any:
    """``betas``, ``eps`` or ``maximize`` as ``optimizer`` applies it to ``group``."""
    if _per_group(optimizer, key):
        return group[key]
    cfg = optimizer._kcfg
    if key == "betas":
        if isinstance(optimizer, MADA):
            k = optimizer.coefficients
            return (k["beta1"], k["beta2"])
        return (cfg.beta1, cfg.beta2)
    if key == "eps":
        return cfg.eps
    return getattr(cfg, "maximize", False)


def _same(a: Any, b: Any) -> bool:
    """Equal settings: numbers (or pairs of them) to float64 rounding, flags exactly."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)


def _fresh_state(optimizer: FusedOptimizer, adam: Mapping[str, Any]) -> dict[str, Any]:
    """One parameter's state: Adam's moments and step, the rest as the module docstring says."""
    m, v = adam["exp_avg"], adam["exp_avg_sq"]
    out: dict[str, Any] = {"step": adam["step"], "m": m, "v": v}
    for name in optimizer._state_names():
        if name not in out:
            out[name] = v if name == "vb" else torch.zeros_like(m)
    if optimizer._num_tangents():
        out["tangents"] = m.new_zeros((optimizer._num_tangents(), *m.shape))
    return out
