"""The ``torch.optim.Optimizer`` machinery every mada-fused optimizer shares.

What lives here: grouping parameters into flat state buckets, checking every
input before anything changes, staging grads and parameters for the kernels,
the device-resident per-group scalars, GradScaler's grad_scale/found_inf
hand-off, and state_dict with a layout that resumes bit-exactly. What does not:
the optimizer math (backends) and MADA's hyper-gradient descent (hyper.py).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import _checks, backends
from .backends.base import Backend, DeviceScalars, Segments
from .distributed import local_grad, local_shape, local_tensor, param_state
from .flat_state import Bucket

# One unit of work: a bucket's active segments and the backend that steps them.
Work = tuple[Backend, Bucket, Segments, DeviceScalars]


class FusedOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses define the state they allocate and :meth:`_run`."""

    # GradScaler then hands us grad_scale/found_inf instead of unscaling itself.
    _step_supports_amp_scaling = True
    _PER_GROUP = ("lr", "weight_decay")

    def __init__(self, params: Iterable, lr: float, weight_decay: float, backend: str) -> None:
        _checks.non_negative("lr", lr)
        _checks.non_negative("weight_decay", weight_decay)
        self._backend_request = backends.check_name(backend)
        self._buckets: list[Bucket] = []
        self._bucket_of: dict[torch.Tensor, Bucket] = {}
        self._scalars: dict[torch.device, tuple] = {}
        self._backend_for: dict[tuple[torch.device, torch.dtype], Backend] = {}
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    # -- what subclasses provide ---------------------------------------------
    def _state_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _num_tangents(self) -> int:
        return 0

    def _config(self) -> dict[str, Any]:
        """Everything that must match for a state_dict to load."""
        raise NotImplementedError

    def _run(self, work: list[Work], ok: dict[torch.device, torch.Tensor | None]) -> None:
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _check_extra_state(self, extra: Mapping[str, Any]) -> None:
        pass

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        pass

    # -- torch.optim.Optimizer protocol ---------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        options = set(param_group) - {"params", "param_names", "initial_lr", *self._PER_GROUP}
        if options:
            raise ValueError(
                f"{type(self).__name__} options {sorted(options)} are global, not per group; "
                f"param groups may set only {self._PER_GROUP}"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.is_complex():
                raise TypeError("complex parameters are not supported")
        _checks.group_lr(group, len(self.param_groups) - 1)

    def __getstate__(self) -> dict[str, Any]:
        # torch's version keeps only defaults/state/param_groups; deepcopy and
        # pickle need the buckets and the device scalars too. Backends hold
        # extension modules, which do not pickle: a copy resolves them again.
        return {**self.__dict__, "_backend_for": {}}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            _checks.group_lr(group, i)
        active = [
            (gi, p, local_grad(p, _checks.grad_of(p)))  # a DTensor's local shard
            for gi, group in enumerate(self.param_groups)
            for p in group["params"]
            if p.grad is not None
        ]
        if not active:
            return loss
        for key in {(p.device, p.dtype) for _, p, _ in active}:
            if key not in self._backend_for:  # resolved once: every step would ask again
                self._backend_for[key] = backends.resolve(self._backend_request, *key)
        # Everything below mutates; everything above only checked.
        self._allocate([p for _, p, _ in active])
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        work, staged, ok = self._plan(active, grad_scale, found_inf)
        self._run(work, ok)
        for param, tmp in staged:
            param.copy_(tmp)
        return loss

    # -- buckets ----------------------------------------------------------------
    def _allocate(self, params: list[torch.Tensor]) -> None:
        """Give parameters that have no state yet their own bucket per (device, dtype)."""
        fresh: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            if p not in self._bucket_of:
                fresh.setdefault((p.device, p.dtype), []).append(p)
        for group in fresh.values():
            self._add_bucket(group)

    def _add_bucket(self, params: list[torch.Tensor]) -> Bucket:
        bucket = Bucket(params, self._state_names(), self._num_tangents())
        self._buckets.append(bucket)
        for i, p in enumerate(params):
            self._bucket_of[p] = bucket
            self.state[p] = param_state(p, bucket.views(i))
        return bucket

    def _plan(self, active, grad_scale, found_inf) -> tuple[list[Work], list, dict]:
        # Keyed by id: a Tensor's __hash__ is a Python call, and this runs per parameter per step.
        active_by_id = {id(p): (gi, g) for gi, p, g in active}
        devices = {b.device for b in self._buckets}
        ok = {d: None if found_inf is None else (found_inf.to(d).reshape(()) == 0).to(torch.float64) for d in devices}
        work: list[Work] = []
        staged = []
        for bucket in self._buckets:
            seg = Segments([], [], [], [], [], [])
            for i, p in enumerate(bucket.params):
                entry = active_by_id.get(id(p))
                if entry is None:
                    continue
                data = local = local_tensor(p)  # FSDP2: step this rank's shard
                if not local.is_contiguous():
                    data = local.contiguous()
                    staged.append((local, data))
                seg.params.append(data)
                seg.grads.append(entry[1].contiguous())
                seg.offsets.append(bucket.offsets[i])
                seg.numels.append(data.numel())
                seg.groups.append(entry[0])
                seg.param_index.append(i)
            if not seg.params:
                continue
            self._count_steps(bucket, seg.param_index, ok[bucket.device])
            lr, weight_decay = self._group_scalars(bucket.device)
            scalars = DeviceScalars(
                coef=None,  # MADA fills in its coefficients
                lr=lr,
                weight_decay=weight_decay,
                grad_scale=None if grad_scale is None else grad_scale.to(bucket.device),
                found_inf=None if found_inf is None else found_inf.to(bucket.device),
            )
            work.append((self._backend_for[bucket.device, bucket.dtype], bucket, seg, scalars))
        return work, staged, ok

    def _count_steps(self, bucket: Bucket, index: list[int], ok: torch.Tensor | None) -> None:
        if len(index) == len(bucket.params):
            bucket.steps.add_(1.0 if ok is None else ok)
            return
        key = tuple(index)
        cached = bucket.index_cache.get(key)
        if cached is None:  # built once per pattern of missing grads: no per-step copy
            ones = torch.ones(len(index), dtype=torch.float64, device=bucket.device)
            cached = bucket.index_cache[key] = (torch.tensor(index, device=bucket.device), ones)
        idx, ones = cached
        bucket.steps.index_add_(0, idx, ones if ok is None else ones * ok)

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

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        index = {p: i for i, p in enumerate(self._param_list())}
        sd["mada"] = {
            "config": self._config(),
            "buckets": [[index[p] for p in b.params] for b in self._buckets],
            **self._extra_state(),
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        params = self._param_list()
        layout, saved_state = self._check_state_dict(state_dict, params)
        # Checked: from here on nothing can fail half-way.
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
        self._buckets, self._bucket_of = [], {}
        self.state.clear()
        for members in layout:
            bucket = self._add_bucket([params[i] for i in members])
            for j, i in enumerate(members):
                for name, dst in bucket.views(j).items():
                    dst.copy_(local_tensor(saved_state[i][name]))
        self._load_extra_state(state_dict["mada"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_state_dict(
        self, sd: Mapping[str, Any], params: list[torch.Tensor]
    ) -> tuple[list[list[int]], dict[int, Mapping]]:
        """The saved bucket layout and per-parameter state, keyed by parameter position."""
        def bad(why: str) -> ValueError:
            return ValueError(f"cannot load this state_dict into {type(self).__name__}: {why}")

        if not isinstance(sd, Mapping) or not {"state", "param_groups", "mada"} <= set(sd):
            raise bad(
                "it needs the keys 'state', 'param_groups' and 'mada' (torch.distributed.checkpoint's "
                "state_dict helpers drop 'mada': use those in mada_fused.distributed)"
            )
        extra = sd["mada"]
        if not isinstance(extra, Mapping) or extra.get("config") != self._config():
            raise bad(f"it comes from another configuration ({extra.get('config') if isinstance(extra, Mapping) else extra} != {self._config()})")
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(groups, self.param_groups)
        ):
            raise bad("its parameter groups differ in number or size from this optimizer's")
        for i, group in enumerate(groups):
            _checks.group_lr(group, i)
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
                self._check_param_state(state[i], p, i)
        self._check_extra_state(extra)
        return layout, state

    def _check_param_state(self, st: Any, p: torch.Tensor, i: int) -> None:
        expected = {"step": ()} | {n: tuple(p.shape) for n in self._state_names()}
        if self._num_tangents():
            expected["tangents"] = (self._num_tangents(), *p.shape)
        if not isinstance(st, Mapping) or set(st) != set(expected):
            got = sorted(st) if isinstance(st, Mapping) else type(st).__name__
            raise ValueError(f"state of parameter {i} has entries {got}, expected {sorted(expected)}")
        for name, shape in expected.items():
            t = st[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
                raise ValueError(f"state[{i}][{name!r}] must be a float tensor of shape {shape}")
            # A sharded parameter needs its state sharded the same way (DCP does that).
            local = shape[: len(shape) - p.dim()] + tuple(local_shape(p))
            if name != "step" and tuple(local_shape(t)) != local:
                raise ValueError(f"state[{i}][{name!r}] is not sharded like its parameter ({local} here)")
