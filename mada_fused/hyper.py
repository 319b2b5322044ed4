"""MADA's coefficients and their hyper-gradient descent (docs/spec.md section 2).

The coefficients, the last hyper-gradient and the count of successful steps
live on the device; the hyper-update is a handful of tiny tensor ops, so it
never waits for the host and is shared by every backend.

A hyper-gradient that is not finite (one element's gradient or tangent was
NaN or infinite) moves no coefficient and is not recorded: one bad element
would otherwise turn all six coefficients NaN, and with them every parameter.
While such an element stays in the state (its moments stay NaN, as in Adam),
the coefficients stay where they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from . import _checks
from .coefficients import COEFFICIENTS, HIGHEST

DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "beta1": (0.0, 0.999),
    "beta2": (0.5, 0.9999),
    "beta3": (0.0, 0.99),
    "rho": (0.0, 1.0),
    "c": (0.0, 1.0),
    "gamma": (0.0, 1.0),
}
# The authors' GPT-2 boxes.
PAPER_BOUNDS: dict[str, tuple[float, float]] = {
    **DEFAULT_BOUNDS,
    "beta1": (0.01, 0.99),
    "beta2": (0.501, 0.99),
    "beta3": (0.0, 0.99),
}
DEFAULT_HYPER_LR: dict[str, float] = {
    "beta1": 5e-4,
    "beta2": 5e-4,
    "beta3": 1e-1,
    "rho": 1e-1,
    "c": 1e-1,
    "gamma": 1e-1,
}


def _names(arg: str, names) -> None:
    unknown = [n for n in names if n not in COEFFICIENTS]
    if unknown:
        raise ValueError(f"unknown coefficient name(s) {unknown} in {arg}; known: {COEFFICIENTS}")


@dataclass(frozen=True)
class HyperConfig:
    """Validated, host-side description of what is learned and how."""

    learn: tuple[str, ...]  # canonical order
    hyper_lr: dict[str, float]
    bounds: dict[str, tuple[float, float]]
    clip: float  # math.inf = no clip
    warmup: int

    @classmethod
    def build(
        cls,
        learn,
        hyper_lr: Mapping[str, float] | None,
        bounds: Mapping[str, tuple[float, float]] | str | None,
        clip: float | None,
        warmup: int,
    ) -> "HyperConfig":
        if isinstance(learn, str) or not isinstance(learn, (tuple, list, set, frozenset)):
            raise TypeError(f"learn must be a tuple of coefficient names, got {learn!r}")
        _names("learn", learn)
        if len(set(learn)) != len(learn):
            raise ValueError(f"learn names a coefficient twice: {learn!r}")
        learn = tuple(n for n in COEFFICIENTS if n in set(learn))

        rates = dict(DEFAULT_HYPER_LR)
        if hyper_lr is not None:
            if not isinstance(hyper_lr, Mapping):
                raise TypeError("hyper_lr must be a dict name -> float or None")
            _names("hyper_lr", hyper_lr)
            for n, r in hyper_lr.items():
                rates[n] = _checks.non_negative(f"hyper_lr[{n!r}]", r)

        if bounds is None:
            box = dict(DEFAULT_BOUNDS)
        elif isinstance(bounds, str):
            if bounds != "paper":
                raise ValueError(f"bounds must be a dict, None or 'paper', got {bounds!r}")
            box = dict(PAPER_BOUNDS)
        elif isinstance(bounds, Mapping):
            _names("bounds", bounds)
            box = dict(DEFAULT_BOUNDS)
            for n, pair in bounds.items():
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise TypeError(f"bounds[{n!r}] must be a (low, high) pair")
                lo = _checks.real_number(f"bounds[{n!r}][0]", pair[0])
                hi = _checks.real_number(f"bounds[{n!r}][1]", pair[1])
                if lo > hi:
                    raise ValueError(f"bounds[{n!r}] is empty: {lo} > {hi}")
                box[n] = (lo, hi)
        else:
            raise TypeError("bounds must be a dict, None or 'paper'")
        for n, (lo, hi) in box.items():
            if lo < 0.0 or hi > HIGHEST[n]:
                raise ValueError(f"bounds[{n!r}] = {(lo, hi)} leaves [0, {HIGHEST[n]}]")

        if clip is None:
            clip = math.inf
        elif not (isinstance(clip, (int, float)) and not isinstance(clip, bool)):
            raise TypeError("hyper_clip must be a positive number or None")
        elif math.isnan(clip) or clip <= 0:
            raise ValueError(f"hyper_clip must be > 0 (or None for no clip), got {clip}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"hyper_warmup must be a non-negative int, got {warmup!r}")
        return cls(learn, rates, box, float(clip), warmup)

    def check_values(self, values: Mapping[str, float]) -> None:
        """Learned coefficients start inside their box (fixed ones are only range-checked)."""
        for n in self.learn:
            x = values[n]
            lo, hi = self.bounds[n]
            if not lo <= x <= hi:
                raise ValueError(f"{n}={x} lies outside its box [{lo}, {hi}]")

    @property
    def learn_index(self) -> tuple[int, ...]:
        return tuple(COEFFICIENTS.index(n) for n in self.learn)


class HyperState:
    """Device-resident coefficients and hyper-gradient bookkeeping."""

    def __init__(self, cfg: HyperConfig, values: Mapping[str, float], device: torch.device):
        self.cfg = cfg
        f64 = dict(dtype=torch.float64, device=device)
        self.coef = torch.tensor([values[n] for n in COEFFICIENTS], **f64)
        self._fixed = {i: values[n] for i, n in enumerate(COEFFICIENTS) if n not in cfg.learn}
        self.hypergrad = torch.zeros(len(COEFFICIENTS), **f64)
        self.steps = torch.zeros((), **f64)  # successful steps, for the warmup
        self._idx = torch.tensor(cfg.learn_index, dtype=torch.long, device=device)
        self._rate = torch.tensor([cfg.hyper_lr[n] for n in cfg.learn], **f64)
        self._lo = torch.tensor([cfg.bounds[n][0] for n in cfg.learn], **f64)
        self._hi = torch.tensor([cfg.bounds[n][1] for n in cfg.learn], **f64)

    @property
    def device(self) -> torch.device:
        return self.coef.device

    def count_step(self, ok: torch.Tensor | None) -> None:
        if self.cfg.learn:  # only the warm-up reads it
            self.steps.add_(1.0 if ok is None else ok)

    def update(self, dot: torch.Tensor | None, ok: torch.Tensor | None) -> None:
        """Apply one hyper-update from ``dot = sum(g_next * du/dk)`` (learned rows).

        Call after :meth:`count_step` for the same step. ``ok`` is 1.0 for a
        step that counts and 0.0 for one GradScaler skipped. A non-finite
        ``dot`` changes nothing (decided on the device: no host sync).
        """
        if dot is None or not self.cfg.learn:
            return
        h = -dot
        take = torch.isfinite(h).all()
        if ok is not None:
            take = take & (ok > 0)
        self.hypergrad[self._idx] = torch.where(take, h, self.hypergrad[self._idx])
        live = take & (self.steps > self.cfg.warmup)
        k = self.coef[self._idx]
        moved = torch.clamp(k - self._rate * h.clamp(-self.cfg.clip, self.cfg.clip), self._lo, self._hi)
        self.coef[self._idx] = torch.where(live, moved, k)

    def state_dict(self) -> dict:
        return {"coef": self.coef.clone(), "hypergrad": self.hypergrad.clone(), "steps": self.steps.clone()}

    def check_state_dict(self, sd: Mapping) -> None:
        for key, dst in (("coef", self.coef), ("hypergrad", self.hypergrad), ("steps", self.steps)):
            src = sd.get(key) if isinstance(sd, Mapping) else None
            if not isinstance(src, torch.Tensor) or src.shape != dst.shape or not src.is_floating_point():
                raise ValueError(f"state_dict['mada'][{key!r}] must be a float tensor of shape {tuple(dst.shape)}")
            if not torch.isfinite(src).all():
                raise ValueError(f"state_dict['mada'][{key!r}] holds non-finite values")
        if float(sd["steps"]) < 0:
            raise ValueError("state_dict['mada']['steps'] is negative")
        coef = sd["coef"].to(torch.float64)
        self.cfg.check_values({n: float(coef[i]) for i, n in enumerate(COEFFICIENTS)})
        for i, value in self._fixed.items():  # a fixed coefficient never moves
            if float(coef[i]) != value:
                raise ValueError(f"state_dict['mada']['coef'] holds {COEFFICIENTS[i]}={float(coef[i])}, "
                                 f"but this optimizer keeps it fixed at {value}")

    def load_state_dict(self, sd: Mapping) -> None:
        """Copy a state checked by :meth:`check_state_dict` in place."""
        self.coef.copy_(sd["coef"])
        self.hypergrad.copy_(sd["hypergrad"])
        self.steps.copy_(sd["steps"])
