"""MADA, the meta-adaptive optimizer, and AVGrad, one of its corners."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import _checks
from ._lru import LruCache
from .backends.base import DeviceScalars, MadaKernelConfig
from .coefficients import COEFFICIENTS
from .distributed import ShardSum
from .hyper import HyperConfig, HyperState
from .optimizer import CONFIG_CACHE_SIZE, FusedOptimizer, Work


@dataclass(frozen=True)
class _GroupConfig:
    """A group's kernel configuration, and for AVGrad its own (beta1, beta2)
    where they differ from the optimizer's (None: the shared coefficients)."""

    kernel: MadaKernelConfig
    betas: tuple[float, float] | None = None


def _same_pair(a: Any, b: Any) -> bool:
    return isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and tuple(a) == tuple(b)


class _LearnedBetas(dict):
    """A MADA param group. It shows ``betas``, the starting (beta1, beta2), so
    torch's schedulers see a momentum; setting it to another value is refused,
    naming what to do instead: one set of coefficients serves all groups."""

    def __setitem__(self, key: Any, value: Any) -> None:
        if key == "betas" and key in self and not _same_pair(value, self[key]):
            raise ValueError(
                f"MADA learns beta1 and beta2 (one set of coefficients for all parameter groups), so a param "
                f"group's 'betas' cannot be set (to {value!r}); with torch.optim.lr_scheduler.OneCycleLR or "
                "CyclicLR pass cycle_momentum=False, or use AVGrad or AdaMod, whose groups take betas"
            )
        super().__setitem__(key, value)


class MADA(FusedOptimizer):
    r"""Implements MADA, the meta-adaptive optimizer.

    One update that moves between Adam, AVGrad, Yogi, Adan and Lion through six
    coefficients :math:`k = (\beta_1, \beta_2, \beta_3, \rho, c, \gamma)`, learned while
    training by hyper-gradient descent. Every equation, special case and rounding
    rule is in docs/spec.md (sections 1 and 2).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                          \\
            &\textbf{input}: \text{lr}, \lambda \text{ (weight\_decay)}, \epsilon \text{ (eps)},
                k = (\beta_1, \beta_2 \text{ (betas)}, \beta_3, \rho, c, \gamma),          \\
            &\hspace{13mm} \beta_{L1}, \beta_{L2} \text{ (lion\_betas)},
                \beta_M \text{ (mod\_beta)}, \: \textit{maximize}                         \\
            &\textbf{initialize}: m_0, v_0, n_0, l_0, \bar{v}_0, s_0 \leftarrow 0         \\
            &\rule{110mm}{0.4pt}                                                          \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                  \\
            &\hspace{5mm} g_t \leftarrow \nabla_{\theta} f_t(\theta_{t-1})
                \text{ (negated if maximize)}                                             \\
            &\hspace{5mm} d_t \leftarrow g_t - g_{t-1} \text{ (} d_1 = 0 \text{)},
                \quad \hat{g}_t \leftarrow g_t + \beta_3 d_t,
                \quad \sigma_t \leftarrow \mathrm{sign}(\hat{g}_t^2 - v_{t-1})             \\
            &\hspace{5mm} G_t \leftarrow c \hat{g}_t^2
                + (1 - c)(v_{t-1} + \sigma_t \hat{g}_t^2)
                \text{ (} c = 1 \text{: Adam, } c = 0 \text{: Yogi)}                       \\
            &\hspace{5mm} m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t,
                \quad v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) G_t                   \\
            &\hspace{5mm} n_t \leftarrow \beta_3 n_{t-1} + (1 - \beta_3) d_t
                \text{ (Adan)}                                                            \\
            &\hspace{5mm} u^L_t \leftarrow \beta_{L1} l_{t-1} + (1 - \beta_{L1}) g_t,
                \quad l_t \leftarrow \beta_{L2} l_{t-1} + (1 - \beta_{L2}) g_t
                \text{ (Lion)}                                                            \\
            &\hspace{5mm} \bar{v}_t \leftarrow \big((t - 1) \bar{v}_{t-1} + v_t\big) / t
                \text{ (AVGrad)}                                                          \\
            &\hspace{5mm} \widehat{v_t} \leftarrow
                \big(\rho v_t + (1 - \rho) \bar{v}_t\big) / (1 - \beta_2^t),
                \quad A_t \leftarrow m_t / (1 - \beta_1^t) + \beta_3 n_t                   \\
            &\hspace{5mm} \eta_t \leftarrow \text{lr} / \big(\sqrt{\widehat{v_t}} + \epsilon\big) \\
            &\hspace{5mm} \textbf{if} \: \beta_M > 0 \textbf{:} \: s_t \leftarrow
                \beta_M s_{t-1} + (1 - \beta_M) \eta_t,
                \quad \hat{\eta}_t \leftarrow \min(\eta_t, s_t)
                \quad \textbf{else} \: \hat{\eta}_t \leftarrow \eta_t                      \\
            &\hspace{5mm} u_t \leftarrow \gamma \hat{\eta}_t A_t
                + (1 - \gamma) \, \text{lr} \, \mathrm{sign}(u^L_t)                        \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} (1 - \text{lr} \, \lambda) - u_t \\
            &\hspace{5mm} \textbf{if} \: t > 1 \textbf{:} \: h \leftarrow
                -\textstyle\sum_{\text{all params}} g_t \, \partial u_{t-1} / \partial k   \\
            &\hspace{10mm} k \leftarrow \Pi_{\text{bounds}}\big(k - \text{hyper\_lr}
                \cdot \mathrm{clamp}(h, \pm \text{hyper\_clip})\big)
                \text{ (learned } k \text{, after hyper\_warmup steps)}                    \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \: \theta_t                                                      \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    :math:`\partial u / \partial k` is the one-step truncated derivative (the previous
    state held constant), in closed form (docs/spec.md section 2.2); each step stores
    it as ``state[p]["tangents"]``, one row per learned coefficient. With
    ``hyper_order="exact"`` the hyper-update runs before step ``t``'s update, which
    then uses the new ``k`` (two passes over memory); with ``"lagged"`` (default) it
    runs in the same pass, after it, so ``k`` moves one step later
    (docs/spec.md section 2.4). State a configuration never reads is not allocated
    (docs/spec.md section 1.4): at Adam's corner only ``m`` and ``v``.

    Args:
        params: parameters or parameter groups; groups may set ``lr``,
            ``weight_decay`` and ``eps`` only: the coefficients, and the options
            of their hyper-gradient descent, are shared by all groups because
            they are learned jointly. Groups show ``betas`` (the starting beta1,
            beta2) read-only, so torch's OneCycleLR/CyclicLR with
            ``cycle_momentum=True`` meet a ValueError that says to pass
            ``cycle_momentum=False``.
        lr, weight_decay: per-group learning rate (a float or a 1-element
            tensor) and decoupled weight decay.
        betas, beta3, rho, c, gamma: the starting coefficients (default: Adam's
            corner ``(0.9, 0.999), 0, 1, 1, 1``). ``beta3 = 0, rho = 1, c = 1,
            gamma = 1`` with ``learn=()`` is AdamW; ``rho = 0`` AVGrad; ``gamma = 0``
            Lion.
        eps: added to the root of the second moment (default: 1e-8); per group.
        mod_beta: memory of the AdaMod clip on the step size; 0 (default) is off.
        lion_betas: Lion's two momentum constants (default: (0.95, 0.98)).
        learn: names of the coefficients that move (default: all six); ``()``
            gives a fixed interpolated optimizer.
        hyper_lr: per-coefficient hyper learning rates (default: 5e-4 for beta1
            and beta2, 0.1 for the rest). hyper_clip: bound on ``|h|`` before the
            update (default: 10; None: no clip). hyper_warmup: successful steps
            before the coefficients move (default: 50).
        bounds: per-coefficient ``(low, high)`` boxes, or ``"paper"`` for the
            authors' GPT-2 boxes; an initial value outside its box is an error.
        vbar: ``"full"`` (default) differentiates through the running mean
            :math:`\bar{v}`; ``"detach"`` treats it as a constant, as the authors'
            code does.
        hyper_order: ``"lagged"`` (default) or ``"exact"``, see above.
        maximize: maximize the objective instead of minimizing it (global: the
            hyper-gradient is that of one objective).
        fused, foreach, capturable, differentiable, amsgrad: torch.optim.AdamW's
            switches, with the meaning README.md's "Drop-in for
            torch.optim.AdamW" gives them.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.
        process_group: a ProcessGroup or 1-D DeviceMesh over which the
            hyper-gradient's per-rank partial sums are summed. By default it is
            found from the parameters: none for plain tensors (DDP), the shard
            dimensions of the mesh for sharded DTensors (FSDP2).
        state_dtype: how the state buffers are stored: ``torch.float32`` (default)
            or ``torch.bfloat16``, written with stochastic rounding (docs/spec.md
            section 5.1), or ``"8bit"``: blockwise 8-bit codes with an fp32 scale
            per 256 elements (section 5.4; parameters under 4,096 elements keep
            fp32 state); arithmetic stays fp32, and fp64 parameters keep fp64
            state.
        tangent_dtype: how the tangent rows (one per learned coefficient) are
            stored: ``torch.float32`` (default), ``torch.bfloat16``, written
            with stochastic rounding (docs/spec.md section 5.3), or ``"8bit"``
            (with ``state_dtype="8bit"`` only, section 5.5): each row's blocks
            as 8-bit codes with an fp32 scale per 256 elements, like the state
            (parameters under 4,096 elements keep fp32 rows). fp64 parameters
            keep fp64 tangents. Full MADA keeps 48 bytes per parameter in fp32,
            24 with bf16 state and tangents, 12.2 with 8-bit state and tangents.
        sr_seed: seed of that rounding's random bits (default 0, so runs repeat
            bit for bit); saved in the state_dict.
        kahan_sum: for bf16 parameters trained without fp32 master weights: keep
            each new value's rounding error in a bf16 compensation buffer
            (``state[p]["kahan_comp"]``, as optimi) and add it back at the next
            step (docs/spec.md section 5.2). bf16_stochastic_round: store each
            new bf16 parameter value with stochastic rounding instead (as
            torchao), seeded by ``sr_seed``. Not both; either is a no-op for
            parameters of other dtypes.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.0,
        rho: float = 1.0,
        c: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mod_beta: float = 0.0,
        lion_betas: tuple[float, float] = (0.95, 0.98),
        learn: Iterable[str] = COEFFICIENTS,
        hyper_lr: Mapping[str, float] | None = None,
        hyper_clip: float | None = 10.0,
        hyper_warmup: int = 50,
        bounds: Mapping[str, tuple[float, float]] | str | None = None,
        vbar: str = "full",
        hyper_order: str = "lagged",
        maximize: bool = False,
        backend: str = "auto",
        process_group: Any = None,
        *,
        state_dtype: torch.dtype = torch.float32,
        tangent_dtype: torch.dtype = torch.float32,
        sr_seed: int = 0,
        kahan_sum: bool = False,
        bf16_stochastic_round: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        amsgrad: bool = False,
    ) -> None:
        beta1, beta2 = _checks.beta_pair("betas", _checks.host_pair("betas", betas))
        values = {
            "beta1": beta1,
            "beta2": beta2,
            "beta3": _checks.beta("beta3", beta3),
            "rho": _checks.in_range("rho", rho, 0.0, 1.0),
            "c": _checks.in_range("c", c, 0.0, 1.0),
            "gamma": _checks.in_range("gamma", gamma, 0.0, 1.0),
        }
        hyper = HyperConfig.build(learn, hyper_lr, bounds, hyper_clip, hyper_warmup)
        hyper.check_values(values)
        if vbar not in ("full", "detach"):
            raise ValueError(f"vbar must be 'full' or 'detach', got {vbar!r}")
        if hyper_order not in ("lagged", "exact"):
            raise ValueError(f"hyper_order must be 'lagged' or 'exact', got {hyper_order!r}")
        self._kcfg = MadaKernelConfig(
            learn=hyper.learn_index,
            has_beta3=values["beta3"] != 0.0 or "beta3" in hyper.learn,
            has_vbar=values["rho"] != 1.0 or "rho" in hyper.learn,
            has_lion=values["gamma"] != 1.0 or "gamma" in hyper.learn,
            has_mod=_checks.beta("mod_beta", mod_beta) > 0.0,
            eps=_checks.non_negative("eps", eps),
            mod_beta=float(mod_beta),
            lion_betas=_checks.beta_pair("lion_betas", lion_betas),
            vbar_detach=vbar == "detach",
            maximize=_checks.flag("maximize", maximize),
        )
        self._exact = hyper_order == "exact"
        self._fixed = {n: v for n, v in values.items() if n not in hyper.learn}
        # Before super(): add_param_group reads it. Without learning there is no sum.
        self._shard_sum = ShardSum(process_group, needed=bool(hyper.learn))
        self._group_coef: LruCache[torch.Tensor] = LruCache(CONFIG_CACHE_SIZE)  # AVGrad's per-group betas
        defaults = dict(lr=lr, weight_decay=weight_decay, eps=eps, betas=(beta1, beta2), maximize=maximize)
        super().__init__(params, {k: defaults[k] for k in self._DEFAULTS}, backend, state_dtype=state_dtype,
                         sr_seed=sr_seed, kahan_sum=kahan_sum, bf16_stochastic_round=bf16_stochastic_round,
                         tangent_dtype=tangent_dtype, foreach=foreach, capturable=capturable,
                         differentiable=differentiable, fused=fused, amsgrad=amsgrad)
        device = self.param_groups[0]["params"][0].device
        self._hyper = HyperState(hyper, values, device)
        self._has_tangents = False  # host-side: no tangents before the first step
        self._h_valid = False  # host-side: a hyper-gradient has been computed
        # While grad_release steps an iteration parameter by parameter: each
        # step's ((bucket, first index), partial sums), until the iteration ends.
        self._released: list | None = None

    # -- public read-outs (these sync the host; step() never does) -------------
    @property
    def coefficients(self) -> dict[str, float]:
        return dict(zip(COEFFICIENTS, self._hyper.coef.tolist()))

    @property
    def hypergradients(self) -> dict[str, float]:
        if not self._h_valid:
            return {}
        h = self._hyper.hypergrad.tolist()
        return {n: h[COEFFICIENTS.index(n)] for n in self._hyper.cfg.learn}

    # -- FusedOptimizer hooks -----------------------------------------------------
    _GROUP_OPTIONS = ("eps",)
    _GLOBAL_WHY = (": MADA's coefficients (betas, beta3, rho, c, gamma), the options of their hyper-gradient "
                   "descent and maximize are shared by all groups, because the coefficients are learned jointly "
                   "from one hyper-gradient over every parameter (AVGrad and AdaMod take per-group betas)")
    _DEFAULTS = ("lr", "weight_decay", "eps", "betas")  # betas: shown, read-only (_LearnedBetas)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "betas" not in self._GROUP_OPTIONS and isinstance(param_group, dict):
            param_group = _LearnedBetas(param_group)
        super().add_param_group(param_group)

    def _group_config(self, group: Mapping[str, Any]) -> _GroupConfig:
        return _GroupConfig(replace(self._kcfg, eps=_checks.non_negative("eps", group["eps"])))

    def _work_scalars(self, scalars: DeviceScalars, config: _GroupConfig, capturing: bool) -> DeviceScalars:
        """AVGrad's groups with betas of their own read coefficients of their own:
        one constant tensor per (device, betas), made once (nothing is learned)."""
        if config.betas is None:
            return scalars
        device = scalars.lr.device

        def make() -> torch.Tensor:
            if capturing:
                raise RuntimeError("step() under CUDA graph capture met a param group with new betas, whose "
                                   "coefficients need a host-to-device copy: step with them before capturing")
            values = {**self._fixed, "beta1": config.betas[0], "beta2": config.betas[1]}
            return torch.tensor([values[n] for n in COEFFICIENTS], dtype=torch.float64).to(device)

        coef = self._group_coef.get_or_make((device, config.betas), make)
        return replace(scalars, coef=coef)

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        super()._check_group(group, index)
        self._shard_sum.add(group["params"])  # last: it takes the group in when it does not raise

    def _coefficients(self, device: torch.device) -> torch.Tensor:
        coef = self._hyper.coef
        return coef if device == coef.device else coef.to(device)

    def _state_names(self) -> tuple[str, ...]:
        k = self._kcfg
        return (
            ("m", "v")
            + (("n", "g_prev") if k.has_beta3 else ())
            + (("l",) if k.has_lion else ())
            + (("vb",) if k.has_vbar else ())
            + (("s",) if k.has_mod else ())
        )

    def _num_tangents(self) -> int:
        return len(self._kcfg.learn)

    def _config(self) -> dict[str, Any]:
        k = self._kcfg
        return {
            "optimizer": type(self).__name__,
            "learn": [COEFFICIENTS[i] for i in k.learn],
            "fixed": dict(self._fixed),
            "mod_beta": k.mod_beta,
            "lion_betas": list(k.lion_betas),
        }

    def _extra_state(self) -> dict[str, Any]:
        return {
            "hyper": self._hyper.state_dict(),
            "has_tangents": self._has_tangents,
            "hypergradients_valid": self._h_valid,
        }

    def _check_extra_state(self, extra: Mapping[str, Any]) -> None:
        self._hyper.check_state_dict(extra.get("hyper"))
        for key in ("has_tangents", "hypergradients_valid"):
            if not isinstance(extra.get(key), bool):
                raise ValueError(f"state_dict['mada'][{key!r}] must be a bool")

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        self._hyper.load_state_dict(extra["hyper"])
        self._has_tangents = extra["has_tangents"]
        self._h_valid = extra["hypergradients_valid"]

    def _run(self, work: list[Work], ok: dict[torch.device, torch.Tensor | None]) -> None:
        hyper, cfg = self._hyper, self._kcfg
        if self._released is not None:  # one parameter of a released iteration: k moves at its end
            # Keep where the sums come from, not the work: it holds the grads.
            where = (work[0].bucket, work[0].seg.param_index[0]) if work else None
            self._released.append((where, self._pass(work)))
            return
        ok_any = next(iter(ok.values()))
        ok_home = None if ok_any is None else ok_any.to(hyper.device)
        hyper.count_step(ok_home)
        want_dot = bool(cfg.learn) and self._has_tangents

        if want_dot and self._exact:  # reduce, update k, then step with the new k
            dots = self._dots(work)
            for w in work:
                w.backend.mada_dot(w.bucket, w.seg, w.scalars, w.config.kernel, dots[w.bucket.device])
            hyper.update(self._reduce(dots), ok_home)
            for sc in {id(w.scalars): w.scalars for w in work}.values():
                if sc.coef is not hyper.coef:  # a copy on another device
                    sc.coef.copy_(hyper.coef)
        self._finish(self._pass(work), ok_home)

    def _pass(self, work: list[Work]) -> dict[torch.device, torch.Tensor] | None:
        """The step's one pass over memory; with the lagged order it also sums
        ``g * du/dk`` (returned, per device) while it reads the old tangents."""
        lagged = bool(self._kcfg.learn) and self._has_tangents and not self._exact
        dots = self._dots(work) if lagged else None
        for w in work:
            w.backend.mada_step(w.bucket, w.seg, w.scalars, w.config.kernel,
                                None if dots is None else dots[w.bucket.device])
        return dots

    def _finish(self, dots: dict[torch.device, torch.Tensor] | None, ok_home: torch.Tensor | None) -> None:
        """After the pass: the lagged hyper-update (k moves after the pass that read it)."""
        if dots is not None:
            self._hyper.update(self._reduce(dots), ok_home)
        want_dot = bool(self._kcfg.learn) and self._has_tangents
        self._has_tangents = self._has_tangents or bool(self._kcfg.learn)
        self._h_valid = self._h_valid or want_dot

    # -- gradient release (grad_release.py): one iteration, stepped per parameter --
    def _open_release(self) -> None:
        self._released = []

    def _close_release(self) -> None:
        """Move k once for the iteration: the per-parameter partial sums added per
        device in bucket order, the order one whole step adds them in."""
        parts, self._released = self._released, None
        if not parts:
            return
        self._hyper.count_step(None)
        dots = None
        if parts[0][1] is not None:  # sums were taken (not in the first iteration)
            rank = {id(b): i for i, b in enumerate(self._buckets)}
            dots = {}
            for _, part in sorted(((w, d) for w, d in parts if w is not None),
                                  key=lambda wd: (rank.get(id(wd[0][0]), len(rank)), wd[0][1])):
                for device, d in part.items():
                    dots[device] = d if device not in dots else dots[device] + d
        self._finish(dots, None)

    def _dots(self, work: list[Work]) -> dict[torch.device, torch.Tensor]:
        """Zeroed per-device accumulators that backends add their partial sums into."""
        n = len(self._kcfg.learn)
        devices = {w.bucket.device for w in work}
        return {d: torch.zeros(n, dtype=torch.float64, device=d) for d in devices}

    def _reduce(self, dots: dict[torch.device, torch.Tensor]) -> torch.Tensor:
        """The global sum(g_next * du/dk), on the coefficients' device."""
        home = self._hyper.device
        total = None
        for d in dots.values():
            total = d.to(home) if total is None else total + d.to(home)
        if total is None:  # nothing here had elements; other ranks still sum with this one
            total = torch.zeros(len(self._kcfg.learn), dtype=torch.float64, device=home)
        return self._shard_sum(total)  # sharded parameters: sum over the ranks too


class AVGrad(MADA):
    r"""Adam with a running mean of v in place of AMSGrad's max (MADA at rho = 0).

    .. math::
       \begin{aligned}
            &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
                v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                     \\
            &\bar{v}_t \leftarrow \big((t - 1) \bar{v}_{t-1} + v_t\big) / t
                \text{ (AMSGrad: } \max(v^{max}_{t-1}, v_t) \text{)}                     \\
            &\theta_t \leftarrow \theta_{t-1} (1 - \text{lr} \, \lambda)
                - \text{lr} \, \frac{m_t / (1 - \beta_1^t)}
                {\sqrt{\bar{v}_t / (1 - \beta_2^t)} + \epsilon}
       \end{aligned}

    with :math:`m_0 = v_0 = \bar{v}_0 = 0`. Exactly :class:`MADA` with ``rho=0`` and
    nothing learned (docs/spec.md section 1.3); arguments as :class:`MADA`'s. Nothing
    is learned, so, as in torch.optim.AdamW, each parameter group may set its own
    ``lr``, ``betas``, ``eps``, ``weight_decay`` and ``maximize``; there are no tangent
    rows, so ``tangent_dtype`` stores nothing (``"8bit"`` still needs
    ``state_dtype="8bit"``, as for :class:`MADA`).
    """

    _GROUP_OPTIONS = ("betas", "eps", "maximize")
    _GLOBAL_WHY = ""
    _DEFAULTS = ("lr", "weight_decay", "eps", "betas", "maximize")

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        backend: str = "auto",
        *,
        maximize: bool = False,
        state_dtype: torch.dtype = torch.float32,
        tangent_dtype: torch.dtype = torch.float32,
        sr_seed: int = 0,
        kahan_sum: bool = False,
        bf16_stochastic_round: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, rho=0.0, eps=eps, weight_decay=weight_decay,
            learn=(), maximize=maximize, backend=backend, state_dtype=state_dtype, sr_seed=sr_seed,
            kahan_sum=kahan_sum, bf16_stochastic_round=bf16_stochastic_round, tangent_dtype=tangent_dtype,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused, amsgrad=amsgrad,
        )

    def _group_config(self, group: Mapping[str, Any]) -> _GroupConfig:
        betas = _checks.beta_pair("betas", group["betas"])
        kernel = replace(self._kcfg, eps=_checks.non_negative("eps", group["eps"]),
                         maximize=_checks.flag("maximize", group["maximize"]))
        own = betas != (self._fixed["beta1"], self._fixed["beta2"])
        return _GroupConfig(kernel, betas if own else None)
