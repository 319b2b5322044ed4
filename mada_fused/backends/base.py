"""The contract between the optimizer classes and a compute backend.

The optimizer owns all bookkeeping: flat state buckets, validation, AMP
plumbing, step counters and the hyper-update. A backend only runs the
per-element pass over one bucket. Every scalar that changes between steps (lr,
weight decay, coefficients, step counts, grad scale, found_inf) is a tensor on
the bucket's device, so a backend never needs the host to know a value and a
step can be captured in a CUDA graph.

Per call, a backend must, for every active segment i (elements
``offsets[i] : offsets[i] + numels[i]`` of the flat state):

1. If ``scalars.found_inf`` is set (non-zero), change nothing at all.
2. Form ``g = grad / grad_scale`` (when given), negated when ``maximize``.
3. ``mada_step``: when ``dot_out`` is given, first add ``sum(g * T)`` over the
   stored tangent rows ``T`` (the previous step's du/dk) into
   ``dot_out[j]``, in a fixed order so the result is bitwise deterministic;
   then run the docs/spec.md section 1 update with ``t = steps[param_index[i]]``
   (already incremented by the optimizer), write params and state, and, when
   ``cfg.learn`` is non-empty, overwrite the tangent rows with this step's
   du/dk. ``mada_dot`` does only the first part (``hyper_order="exact"``).
4. ``adamod_step``: docs/spec.md sections 3 and 4.

Arithmetic is float64 for float64 params and float32 otherwise. The state is
stored in ``bucket.state_dtype``: the compute dtype, or bfloat16, which a
backend rounds stochastically (docs/spec.md section 5.1) and lists in its
``state_dtypes``; likewise the tangent rows in ``bucket.tangent_dtype``
(section 5.3, ``tangent_dtypes``). Parameters of lower precision are read, updated in the
compute dtype and rounded once on the way back: to nearest, or, for bf16
parameters, as ``bucket.param_round`` says (docs/spec.md section 5.2:
stochastically, or with Kahan summation into ``bucket.comp``), which a backend
lists in its ``param_rounds``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..flat_state import Bucket


@dataclass(frozen=True)
class MadaKernelConfig:
    """Host constants of a MADA pass, per parameter group (eps and, for AVGrad,
    maximize may differ between groups; the rest is the optimizer's)."""

    learn: tuple[int, ...]  # canonical indices (into coefficients.COEFFICIENTS) of learned coefficients
    has_beta3: bool  # state n, g_prev
    has_vbar: bool  # state vb
    has_lion: bool  # state l
    has_mod: bool  # state s
    eps: float
    mod_beta: float
    lion_betas: tuple[float, float]
    vbar_detach: bool
    maximize: bool


@dataclass(frozen=True)
class AdamodKernelConfig:
    """Host constants of an AdaMod/DiffMod pass, per parameter group."""

    beta1: float
    beta2: float
    beta3: float
    eps: float
    diff: bool  # DiffMod's friction term (state g_prev)
    maximize: bool


@dataclass(frozen=True)
class DeviceScalars:
    """Per-step scalars, all on the bucket's device (one set per device, shared by its buckets)."""

    coef: torch.Tensor | None  # (6,) float64, canonical order; None for AdaMod/DiffMod
    lr: torch.Tensor  # (num_groups,) float64
    weight_decay: torch.Tensor  # (num_groups,) float64
    grad_scale: torch.Tensor | None  # 1-element float32, GradScaler's scale
    found_inf: torch.Tensor | None  # 1-element float32, non-zero = skip the step
    sr_seed: int = 0  # host uint32: the optimizer's seed of bf16 state's rounding (docs/spec.md 5.1)


@dataclass
class Segments:
    """The active part of a bucket for one step: parameters whose grad is set.

    ``params[i]`` and ``grads[i]`` are contiguous, of the bucket's dtype and
    device. The tables are in bucket order.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    offsets: list[int]  # element offset into the flat state
    numels: list[int]
    groups: list[int]  # param-group index (into DeviceScalars.lr / weight_decay)
    param_index: list[int]  # index into Bucket.steps


class Backend(Protocol):
    name: str
    state_dtypes: frozenset[torch.dtype]  # the bucket state dtypes it can store
    tangent_dtypes: frozenset[torch.dtype]  # the bucket tangent dtypes it can store
    param_rounds: frozenset[str]  # how it can store bf16 parameters (flat_state.PARAM_ROUNDS)

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend can step a bucket of this device and dtype."""

    def mada_step(
        self,
        bucket: Bucket,
        seg: Segments,
        scalars: DeviceScalars,
        cfg: MadaKernelConfig,
        dot_out: torch.Tensor | None,
    ) -> None: ...

    def mada_dot(
        self,
        bucket: Bucket,
        seg: Segments,
        scalars: DeviceScalars,
        cfg: MadaKernelConfig,
        dot_out: torch.Tensor,
    ) -> None: ...

    def adamod_step(
        self,
        bucket: Bucket,
        seg: Segments,
        scalars: DeviceScalars,
        cfg: AdamodKernelConfig,
    ) -> None: ...
