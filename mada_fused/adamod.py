"""AdaMod (docs/spec.md section 3) and DiffMod (section 4)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import _checks
from .backends.base import AdamodKernelConfig
from .optimizer import FusedOptimizer, Work


class AdaMod(FusedOptimizer):
    r"""Adam whose per-element step size is capped by its own long-term EMA.

    AdaMod as its authors released it (PyPI package ``adamod``); docs/spec.md
    section 3.

    .. math::
       \begin{aligned}
            &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
                v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                     \\
            &\eta_t \leftarrow \text{lr} \, \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
                \Big/ \big(\sqrt{v_t} + \epsilon\big)                                   \\
            &s_t \leftarrow \beta_3 s_{t-1} + (1 - \beta_3) \eta_t                          \\
            &\theta_t \leftarrow \theta_{t-1} (1 - \text{lr} \, \lambda)
                - \min(\eta_t, s_t) \, m_t
       \end{aligned}

    with :math:`m_0 = v_0 = s_0 = 0` (no bias correction of ``s``) and decoupled
    weight decay :math:`\lambda`. Defaults: lr 1e-3, betas (0.9, 0.999), beta3
    0.999, eps 1e-8, weight_decay 0. ``maximize=True`` negates :math:`g_t`.
    ``state_dtype``, ``sr_seed``, ``kahan_sum`` and ``bf16_stochastic_round`` as
    :class:`MADA`'s (``torch.bfloat16`` stores the state in bf16 with stochastic
    rounding; the last two keep bf16 parameters moving without fp32 master weights).

    As in torch.optim.AdamW, ``lr`` may be a float or a 1-element tensor, and
    each parameter group may set its own ``lr``, ``betas``, ``beta3``, ``eps``,
    ``weight_decay`` and ``maximize`` (a scheduler may change them between
    steps). ``fused``, ``foreach``, ``capturable``, ``differentiable`` and
    ``amsgrad`` are AdamW's switches, with the meaning README.md's "Drop-in for
    torch.optim.AdamW" gives them.
    """

    _GROUP_OPTIONS = ("betas", "beta3", "eps", "maximize")
    _MEMORY = "beta3"  # the option that sets the clip's memory (DiffMod: len_memory)
    _DIFF = False  # DiffMod's friction term (and its state g_prev)

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        backend: str = "auto",
        *,
        maximize: bool = False,
        state_dtype: torch.dtype = torch.float32,
        sr_seed: int = 0,
        kahan_sum: bool = False,
        bf16_stochastic_round: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        amsgrad: bool = False,
    ) -> None:
        # DiffMod passes its len_memory as ``beta3``: the value of its _MEMORY option.
        defaults = {"lr": lr, "betas": _checks.host_pair("betas", betas), self._MEMORY: beta3, "eps": eps,
                    "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults, backend, state_dtype=state_dtype, sr_seed=sr_seed, kahan_sum=kahan_sum,
                         bf16_stochastic_round=bf16_stochastic_round, foreach=foreach, capturable=capturable,
                         differentiable=differentiable, fused=fused, amsgrad=amsgrad)

    def _memory(self, group: Mapping[str, Any]) -> float:
        """beta3, the memory of the clip on the step size."""
        return _checks.beta("beta3", group["beta3"])

    def _group_config(self, group: Mapping[str, Any]) -> AdamodKernelConfig:
        beta1, beta2 = _checks.beta_pair("betas", group["betas"])
        return AdamodKernelConfig(beta1, beta2, self._memory(group), _checks.non_negative("eps", group["eps"]),
                                  diff=self._DIFF, maximize=_checks.flag("maximize", group["maximize"]))

    def _state_names(self) -> tuple[str, ...]:
        return ("m", "v", "s") + (("g_prev",) if self._DIFF else ())

    def _config(self) -> dict[str, Any]:
        return {"optimizer": type(self).__name__}

    def _run(self, work: list[Work], ok: dict[torch.device, torch.Tensor | None]) -> None:
        for w in work:
            w.backend.adamod_step(w.bucket, w.seg, w.scalars, w.config)


class DiffMod(AdaMod):
    r"""AdaMod with diffGrad's friction: steps shrink where the gradient barely changes.

    :class:`AdaMod` with :math:`\beta_3 = 1 - 1 / \text{len\_memory}` (default
    ``len_memory`` 1000), whose applied step uses
    :math:`\xi_t m_t` with :math:`\xi_t = \mathrm{sigmoid}(|g_{t-1} - g_t|)` and
    :math:`g_0 = 0`:

    .. math::
       \theta_t \leftarrow \theta_{t-1} (1 - \text{lr} \, \lambda)
           - \min(\eta_t, s_t) \, \xi_t \, m_t

    The stored :math:`m_t` does not include :math:`\xi_t`. docs/spec.md section 4.
    Param groups may set ``len_memory`` in place of AdaMod's ``beta3``.
    """

    _GROUP_OPTIONS = ("betas", "len_memory", "eps", "maximize")
    _MEMORY = "len_memory"
    _DIFF = True

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        len_memory: float = 1000,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        backend: str = "auto",
        *,
        maximize: bool = False,
        state_dtype: torch.dtype = torch.float32,
        sr_seed: int = 0,
        kahan_sum: bool = False,
        bf16_stochastic_round: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, len_memory, eps, weight_decay, backend, maximize=maximize,
                         state_dtype=state_dtype, sr_seed=sr_seed, kahan_sum=kahan_sum,
                         bf16_stochastic_round=bf16_stochastic_round, foreach=foreach, capturable=capturable,
                         differentiable=differentiable, fused=fused, amsgrad=amsgrad)

    def _memory(self, group: Mapping[str, Any]) -> float:
        len_memory = _checks.real_number("len_memory", group["len_memory"])
        if len_memory < 1:
            raise ValueError(f"len_memory must be >= 1, got {len_memory}")
        return 1.0 - 1.0 / len_memory
