"""The ``torch.optim.Optimizer`` machinery every mada-fused optimizer shares.

What lives here: grouping parameters into flat state buckets, checking every
input before anything changes, staging grads and parameters for the kernels,
the device-resident per-group scalars, GradScaler's grad_scale/found_inf
hand-off, and state_dict with a layout that resumes bit-exactly. What does not:
the optimizer math (backends) and MADA's hyper-gradient descent (hyper.py).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import _checkpoint, _checks, backends
from .backends.base import Backend, DeviceScalars, Segments
from .distributed import local_pair, local_tensor, param_state
from ._lru import LruCache
from .flat_state import Bucket, bucket_state_dtype, param_round_for, state_dtype_for

@dataclass(frozen=True)
class Work:
    """One backend call: a bucket's active segments of one group configuration,
    the backend that steps them, the step's scalars on the bucket's device and
    that configuration (the subclass's :meth:`FusedOptimizer._group_config`)."""

    backend: Backend
    bucket: Bucket
    seg: Segments
    scalars: DeviceScalars
    config: Hashable


def _capturing(devices: Iterable[torch.device]) -> bool:
    """Whether this step is being captured into a CUDA graph."""
    return any(d.type == "cuda" for d in devices) and torch.cuda.is_current_stream_capturing()


def _home_of(buckets: list[Bucket]) -> dict[int, tuple[Bucket, int, tuple]]:
    return {id(p): (b, i, b.built_for[i]) for b in buckets for i, p in enumerate(b.params)}


def _frozen(value: Any) -> Hashable:
    """A group option's value as a cache key: lists as tuples, each value with
    its type (as plain keys True, 1 and 1.0 are one, but maximize=1 is an error)."""
    if isinstance(value, (tuple, list)):
        return tuple(map(_frozen, value))
    return (type(value), value)


# Distinct group configurations whose checked kernel configuration is kept: a
# scheduler cycling betas (OneCycleLR) makes a new one every step.
CONFIG_CACHE_SIZE = 64


def _by_key(params: list[torch.Tensor], state_dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    """``params`` grouped by (device, dtype, bucket state dtype), in order of first
    appearance (8-bit state keeps small parameters apart, in fp32)."""
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype, bucket_state_dtype(p, state_dtype)), []).append(p)
    return list(groups.values())


def _add_own_state(optimizer: FusedOptimizer, sd: dict[str, Any]) -> None:
    # A module-level function, not a bound method: the hook dict is pickled with the optimizer.
    sd["mada"] = optimizer._own_state()


class FusedOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses define the state they allocate and :meth:`_run`."""

    # GradScaler then hands us grad_scale/found_inf instead of unscaling itself.
    _step_supports_amp_scaling = True
    # The per-group values every optimizer reads from the device table, each step.
    _PER_GROUP = ("lr", "weight_decay")
    # The other options a group may set (``defaults`` holds each): host constants
    # of the kernel configuration, which :meth:`_group_config` builds.
    _GROUP_OPTIONS: tuple[str, ...] = ()
    # Why an option outside these is global (add_param_group's refusal says it).
    _GLOBAL_WHY = ""

    def __init__(self, params: Iterable, defaults: dict[str, Any], backend: str, *,
                 state_dtype: torch.dtype = torch.float32, sr_seed: int = 0, kahan_sum: bool = False,
                 bf16_stochastic_round: bool = False, tangent_dtype: torch.dtype = torch.float32,
                 **switches: Any) -> None:
        """``defaults``: lr, weight_decay and the _GROUP_OPTIONS; ``state_dtype``,
        ``tangent_dtype`` and ``sr_seed``: how the state and the tangent rows are
        stored, and the seed of their stochastic rounding (docs/spec.md 5.1, 5.3);
        ``kahan_sum``, ``bf16_stochastic_round``: how bf16 parameters store their
        new values (docs/spec.md 5.2); ``switches``: torch.optim.AdamW's fused,
        foreach, capturable, differentiable, amsgrad."""
        _checks.learning_rate("lr", defaults["lr"], read_tensor=True)
        _checks.non_negative("weight_decay", defaults["weight_decay"])
        self._state_dtype = _checks.state_dtype(state_dtype)
        self._sr_seed = _checks.sr_seed(sr_seed)
        self._param_round = _checks.param_round(kahan_sum, bf16_stochastic_round)
        tangent_dtype = _checks.tangent_dtype(tangent_dtype, self._state_dtype)
        # Without learned coefficients there are no tangent rows to store: no backend is refused for them.
        self._tangent_dtype = tangent_dtype if self._num_tangents() else torch.float32
        request, self._fused_only = _checks.adamw_switches(backend, **switches)
        self._backend_request = backends.check_name(request)
        if self._fused_only and self._backend_request == "reference":  # from the environment
            raise ValueError(f"fused=True, but {backends.ENV_VAR}=reference asks for the unfused backend")
        backends.check_state_dtype(self._backend_request, self._state_dtype, self._tangent_dtype)
        backends.check_param_round(self._backend_request, self._param_round)
        # Checked group configurations, by their option values (_configs).
        self._config_cache: LruCache[Hashable] = LruCache(CONFIG_CACHE_SIZE)
        self._group_config(defaults)
        self._buckets: list[Bucket] = []
        # id(p) -> (its bucket, its index there, the (dtype, device, shape) its
        # state was built for). Keyed by id: a Tensor's __hash__ is a Python
        # call, and this is read per parameter per step.
        self._home: dict[int, tuple[Bucket, int, tuple]] = {}
        self._scalars: dict[torch.device, tuple] = {}
        self._backend_for: dict[tuple[torch.device, torch.dtype], Backend] = {}
        super().__init__(params, defaults)
        # First of the state_dict post hooks, so a user's hook sees the whole state_dict.
        self.register_state_dict_post_hook(_add_own_state, prepend=True)
        if self._fused_only:  # fail here, not at the first step
            for key in {(p.device, p.dtype) for p in self._param_list()}:
                self._backend(*key)

    # -- what subclasses provide ---------------------------------------------
    def _state_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _num_tangents(self) -> int:
        return 0

    def _coefficients(self, device: torch.device) -> torch.Tensor | None:
        """MADA's coefficients on ``device`` (DeviceScalars.coef)."""
        return None

    def _config(self) -> dict[str, Any]:
        """Everything that must match for a state_dict to load."""
        raise NotImplementedError

    def _run(self, work: list[Work], ok: dict[torch.device, torch.Tensor | None]) -> None:
        raise NotImplementedError

    def _group_config(self, group: Mapping[str, Any]) -> Hashable:
        """The kernel configuration of a group's _GROUP_OPTIONS values; raises
        TypeError or ValueError for a bad value."""
        raise NotImplementedError

    def _work_scalars(self, scalars: DeviceScalars, config: Hashable, capturing: bool) -> DeviceScalars:
        """The scalars a call of this configuration reads (MADA: per-group coefficients)."""
        return scalars

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        _checks.param_group(group, index)
        self._configs([group], index)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _check_extra_state(self, extra: Mapping[str, Any]) -> None:
        pass

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        pass

    # -- torch.optim.Optimizer protocol ---------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        options = set(param_group) - _checks.GROUP_KEYS - set(self._PER_GROUP) - set(self._GROUP_OPTIONS)
        if options:
            raise ValueError(
                f"{type(self).__name__} options {sorted(options)} are global, not per group{self._GLOBAL_WHY}; "
                f"param groups may set only {self._PER_GROUP + self._GROUP_OPTIONS}"
            )
        super().add_param_group(param_group)  # torch's checks, then it appends the group
        try:
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
        except BaseException:
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        # torch's version keeps only defaults/state/param_groups; deepcopy and
        # pickle need the buckets and the device scalars too. Backends hold
        # extension modules, which do not pickle: a copy resolves them again.
        # The id-keyed index is rebuilt for the copy's own tensors.
        return {**self.__dict__, "_backend_for": {}, "_home": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._home = _home_of(self._buckets)

    # torch.compile does not trace the step: a compiled caller breaks its graph
    # once, at this call, and the step (closure included; compile the closure
    # itself to have it compiled) runs as it runs uncompiled. Traced, the step
    # broke the graph 8 or 9 times inside and guarded on every float lr. A graph
    # cannot hold it either: the native backends write the state buffers they
    # hold by address, while a graph mutates functionalized copies.
    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._eager_step()
        return loss

    @torch.no_grad()
    def _eager_step(self) -> None:
        # GradScaler hands its scale and found_inf over as attributes and removes
        # them once step() returns. After a step that raised they would stay and
        # skip (or rescale) every later step, so such a step removes them itself.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        try:
            self._step(grad_scale, found_inf)
        except BaseException:
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

    def _step(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        for i, group in enumerate(self.param_groups):
            _checks.group_lr(group, i)
        configs = self._configs(self.param_groups)
        _checks.amp_scalars(grad_scale, found_inf)
        active, fresh, moved = self._gather()
        if not active:
            return
        keys = {(p.device, p.dtype) for p in fresh + moved} | {(b.device, b.dtype) for b in self._buckets}
        for key in keys:
            self._backend(*key)
        devices = {d for d, _ in keys}
        capturing = _capturing(devices)
        if capturing:
            _checks.capturable(self.param_groups, fresh + moved)
        scalars, ok = self._device_scalars(devices, grad_scale, found_inf)
        # Everything below mutates; everything above only checked. (_plan may
        # still refuse a capture, but a captured step allocates and moves nothing.)
        if moved:
            self._move(moved)
        if fresh:
            self._allocate(fresh)
        work, staged, counts = self._plan(active, scalars, configs, capturing)
        for bucket, index in counts:
            okd = ok[bucket.device]
            if index is None:
                bucket.steps.add_(1.0 if okd is None else okd)
            else:
                idx, ones = index
                bucket.steps.index_add_(0, idx, ones if okd is None else ones * okd)
        self._run(work, ok)
        for param, tmp in staged:
            param.copy_(tmp)

    def _backend(self, device: torch.device, dtype: torch.dtype) -> Backend:
        """The backend of a (device, dtype) bucket, resolved once: every step would ask again."""
        backend = self._backend_for.get((device, dtype))
        if backend is None:
            state_dtype = state_dtype_for(dtype, self._state_dtype)
            param_round = param_round_for(dtype, self._param_round)
            tangent_dtype = state_dtype_for(dtype, self._tangent_dtype)
            backend = backends.resolve(self._backend_request, device, dtype, state_dtype, param_round, tangent_dtype)
            if self._fused_only and backend.name == "reference":
                raise ValueError(f"fused=True, but no fused backend can step {dtype} parameters with "
                                 f"{state_dtype} state and {tangent_dtype} tangents on {device} "
                                 f"here (loaded: {backends.available()}); drop fused=True to use the reference one")
            self._backend_for[device, dtype] = backend
        return backend

    def _configs(self, groups: list[Mapping[str, Any]], first: int = 0) -> list[Hashable]:
        """Each group's kernel configuration, from its option values now (a
        scheduler may change them between steps), checked; nothing changes."""
        out = []
        for i, group in enumerate(groups, first):
            key = tuple(_frozen(group[name]) for name in self._GROUP_OPTIONS)
            out.append(self._config_cache.get_or_make(key, lambda: self._checked_config(group, i)))
        return out

    def _checked_config(self, group: Mapping[str, Any], index: int) -> Hashable:
        try:
            return self._group_config(group)
        except (TypeError, ValueError) as e:
            raise type(e)(f"param_groups[{index}]: {e}") from None

    def _gather(self) -> tuple[dict[int, tuple], list[torch.Tensor], list[torch.Tensor]]:
        """Every parameter with a grad, checked; nothing changes here.

        Returns ``{id(p): (group index, p's local tensor, the contiguous data to
        step, its local grad)}``, the parameters without state yet and those
        whose dtype or device changed since their state was made.
        """
        active: dict[int, tuple] = {}
        fresh: list[torch.Tensor] = []
        moved: list[torch.Tensor] = []
        home = self._home
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                at = home.get(id(p))
                if at is None or not _checks.fits(p, g, at[2]):
                    g = _checks.grad_of(p)  # raises with the reason when the grad is at fault
                    if p.device.type == "meta":
                        raise ValueError("a parameter on the meta device has no data to step; "
                                         "materialize it first (e.g. module.to_empty(device=...))")
                    if at is not None:
                        _checks.same_shape(p, at[2][2])
                    (fresh if at is None else moved).append(p)
                local, lg = local_pair(p, g)  # a DTensor's local shard
                if at is not None and lg is not g and lg.shape != at[0].shapes[at[1]]:
                    raise ValueError(f"a DTensor parameter's local shard changed shape from "
                                     f"{tuple(at[0].shapes[at[1]])} to {tuple(lg.shape)} (resharded?) "
                                     "after the optimizer made its state")
                data = local
                if not local.is_contiguous():
                    if _checks.overlaps(local):
                        raise ValueError(f"a parameter has elements that share memory (shape {tuple(local.shape)}, "
                                         f"strides {local.stride()}, e.g. from expand()): it cannot be stepped")
                    data = local.contiguous()  # stepped, then copied back
                active[id(p)] = (gi, local, data, lg)
        return active, fresh, moved

    def _device_scalars(self, devices, grad_scale, found_inf) -> tuple[dict, dict]:
        """Per device: the step's :class:`DeviceScalars` and ``ok`` (1.0 for a step
        that counts, 0.0 for one GradScaler skips; None without a GradScaler)."""
        scalars, ok = {}, {}
        for d in devices:
            lr, weight_decay = self._group_scalars(d)
            fi = None if found_inf is None else found_inf.to(d)
            ok[d] = None if fi is None else (fi.reshape(()) == 0).to(torch.float64)
            scalars[d] = DeviceScalars(
                coef=self._coefficients(d),
                lr=lr,
                weight_decay=weight_decay,
                grad_scale=None if grad_scale is None else grad_scale.to(d),
                found_inf=fi,
                sr_seed=self._sr_seed,
            )
        return scalars, ok

    # -- buckets ----------------------------------------------------------------
    def _new_bucket(self, params: list[torch.Tensor]) -> Bucket:
        return Bucket(params, self._state_names(), self._num_tangents(), self._state_dtype, self._param_round,
                      self._tangent_dtype)

    def _install(self, buckets: list[Bucket]) -> None:
        """Make ``buckets`` the optimizer's state (each built and filled beforehand)."""
        self._buckets = buckets
        self._home = _home_of(buckets)
        for b in buckets:
            for i, p in enumerate(b.params):
                self.state[p] = param_state(p, b.views(i))

    def _allocate(self, params: list[torch.Tensor]) -> None:
        """Give parameters that have no state yet their own bucket per (device, dtype)."""
        self._install(self._buckets + [self._new_bucket(ps) for ps in _by_key(params, self._state_dtype)])

    def _move(self, moved: list[torch.Tensor]) -> None:
        """Parameters whose dtype or device changed (``model.half()``, ``.to()``)
        take their state into a bucket of their new (device, dtype), converted
        as load_state_dict converts; their old buckets are rebuilt without them."""
        going = {id(p) for p in moved}
        layout: list[Bucket | list[torch.Tensor]] = []
        for b in self._buckets:
            stay = [p for p in b.params if id(p) not in going]
            if len(stay) == len(b.params):
                layout.append(b)
            elif stay:
                layout.append(stay)
        layout += _by_key(moved, self._state_dtype)
        buckets = []
        for entry in layout:
            if isinstance(entry, list):
                bucket = self._new_bucket(entry)
                for i, p in enumerate(entry):
                    bucket.copy_state(i, *self._home[id(p)][:2])
                entry = bucket
            buckets.append(entry)
        self._install(buckets)

    def _plan(self, active: dict[int, tuple], scalars: dict, configs: list[Hashable],
              capturing: bool) -> tuple[list[Work], list, list]:
        """The backend calls (one per bucket and group configuration present in
        it), the staged copies of non-contiguous parameters, and per bucket the
        parameters whose step counts go up."""
        work: list[Work] = []
        staged = []
        counts = []
        distinct: dict[Hashable, int] = {}  # hashed once per group, not per parameter
        slot_of_group = [distinct.setdefault(c, len(distinct)) for c in configs]
        config_of_slot = list(distinct)
        for bucket in self._buckets:
            segs: dict[int, Segments] = {}  # by config slot, in order of first appearance
            stepped = []
            for i, p in enumerate(bucket.params):
                entry = active.get(id(p))
                if entry is None:
                    continue
                gi, local, data, grad = entry
                stepped.append(i)
                if data is not local:
                    staged.append((local, data))
                n = data.numel()
                if not n:  # nothing for a backend to do, but its step still counts
                    continue
                seg = segs.get(slot_of_group[gi])
                if seg is None:
                    seg = segs[slot_of_group[gi]] = Segments([], [], [], [], [], [])
                seg.params.append(data)
                seg.grads.append(grad.contiguous())
                seg.offsets.append(bucket.offsets[i])
                seg.numels.append(n)
                seg.groups.append(gi)
                seg.param_index.append(i)
            if not stepped:
                continue
            counts.append((bucket, self._step_index(bucket, stepped, capturing)))
            backend = self._backend_for[bucket.device, bucket.dtype]
            for slot, seg in segs.items():
                config = config_of_slot[slot]
                sc = self._work_scalars(scalars[bucket.device], config, capturing)
                work.append(Work(backend, bucket, seg, sc, config))
        return work, staged, counts

    @staticmethod
    def _step_index(bucket: Bucket, index: list[int], capturing: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices, ones) on the device for a step where only some of the bucket's
        parameters have grads; None when all have. Built once per pattern (kept
        for the flat_state.INDEX_CACHE_SIZE last used): no per-step host-to-device copy."""
        if len(index) == len(bucket.params):
            return None
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            if capturing:
                raise RuntimeError(
                    "step() under CUDA graph capture met a new pattern of parameters without grads, "
                    "whose index needs a host-to-device copy: take a step with that pattern before capturing"
                )
            ones = torch.ones(len(index), dtype=torch.float64, device=bucket.device)
            return torch.tensor(index, device=bucket.device), ones

        return bucket.index_cache.get_or_make(tuple(index), make)

    def _group_scalars(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_groups,) float64 lr and weight_decay on ``device``, refreshed without a sync.

        A tensor lr (for CUDA graphs) is copied on the device each step; a
        Python float is written only when it changed, as a fill, so a step
        never waits for a host-to-device copy.
        """
        n = len(self.param_groups)
        table, seen, lr, weight_decay = self._scalars.get(device, (None,) * 4)
        if table is None or table.shape[1] != n:
            table = torch.zeros(2, n, dtype=torch.float64, device=device)
            seen = [[None] * n, [None] * n]
            lr, weight_decay = table[0], table[1]  # views: backends see the same tensors each step
            self._scalars[device] = (table, seen, lr, weight_decay)
        for gi, group in enumerate(self.param_groups):
            for row, key in enumerate(self._PER_GROUP):
                value = group[key]
                if isinstance(value, torch.Tensor):
                    table[row, gi].copy_(value.reshape(()))
                elif seen[row][gi] != value:
                    table[row, gi].fill_(value)
                    seen[row][gi] = value
        return lr, weight_decay

    # -- state_dict -------------------------------------------------------------
    def _param_list(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _own_state(self) -> dict[str, Any]:
        """What ``state_dict()["mada"]`` holds: the config, the bucket layout, subclass state."""
        index = {p: i for i, p in enumerate(self._param_list())}
        return {
            "config": self._config(),
            "buckets": [[index[p] for p in b.params] for b in self._buckets],
            "sr_seed": self._sr_seed,
            **self._extra_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        params = self._param_list()
        layout, saved_state = _checkpoint.check(self, state_dict, params)
        buckets = []
        for members in layout:  # built aside: a copy that fails leaves the optimizer as it was
            # A saved bucket may need splitting: 8-bit state keeps small parameters apart.
            at = {id(params[i]): i for i in members}
            for part in _by_key([params[i] for i in members], self._state_dtype):
                bucket = self._new_bucket(part)
                for j, p in enumerate(part):
                    bucket.load(j, {name: local_tensor(t) for name, t in saved_state[at[id(p)]].items()})
                buckets.append(bucket)
        # From here on nothing can fail half-way.
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for key, value in saved.items():
                if key != "params":  # past a group's guard on options it shows but does not take
                    dict.__setitem__(group, key, value)
        self.state.clear()
        self._install(buckets)
        # Absent from checkpoints made before bf16 state: the seed stays.
        self._sr_seed = state_dict["mada"].get("sr_seed", self._sr_seed)
        self._load_extra_state(state_dict["mada"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
