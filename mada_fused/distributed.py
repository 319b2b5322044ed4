"""torch.distributed support: DTensor (FSDP2) parameters, the hyper-gradient
all-reduce, and checkpointing with torch.distributed.checkpoint (DCP).

- DDP: every rank holds the whole parameter and the same averaged gradient,
  so every rank computes the same hyper-gradient. Nothing to do here.
- FSDP2 / DTensor: the optimizer steps each rank's local shard. Its state
  lives in flat buffers of local shards; ``optimizer.state[p]`` re-wraps those
  as DTensors with the parameter's mesh and placements, so DCP saves and
  reshards them like the parameters. MADA's hyper-gradient is a sum over all
  elements, so each rank's partial sum is all-reduced (:class:`ShardSum`).
- 8-bit state: blocks are per local shard, so the scales are plain per-rank
  tensors; DCP gets the codes decoded to bf16 DTensors instead (:func:`_dcp_form`).

Nothing here imports ``torch.distributed.tensor`` eagerly (it costs seconds);
a DTensor can only exist once someone else has imported it.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch


_DTENSOR: list[type] = []  # the class, once someone has imported it


def _dtensor_type() -> type | None:
    if _DTENSOR:  # checked on every parameter of every step: keep it a lookup
        return _DTENSOR[0]
    # torch >= 2.5 exports DTensor from torch.distributed.tensor, 2.4 from ._tensor.
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None:
            _DTENSOR.append(cls)
            return cls
    return None


# Exactly these types are never DTensors (an nn.Parameter made from a DTensor
# keeps the DTensor type): the common case skips the isinstance below.
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def is_dtensor(t: Any) -> bool:
    if type(t) in _PLAIN:
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (same storage, so in-place writes land in it); else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def local_shape(t: torch.Tensor) -> torch.Size:
    return local_tensor(t).shape


def _is_shard(placement: Any) -> bool:
    # Shard and FSDP2's _StridedShard split a tensor dimension; Replicate and Partial do not.
    return hasattr(placement, "dim") and not placement.is_replicate() and not placement.is_partial()


def local_pair(p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The local shards of ``p`` and ``grad``, ``grad`` checked to be sharded
    exactly like ``p``; plain tensors as they are."""
    if type(p) in _PLAIN and type(grad) in _PLAIN:  # per parameter per step: one test
        return p, grad
    if not (is_dtensor(p) or is_dtensor(grad)):
        return p, grad
    if not (is_dtensor(p) and is_dtensor(grad)) or (
        (grad.device_mesh, tuple(grad.placements)) != (p.device_mesh, tuple(p.placements))
    ):
        where = lambda t: tuple(t.placements) if is_dtensor(t) else "a plain tensor"  # noqa: E731
        raise ValueError(
            f"a DTensor parameter needs a gradient with the same mesh and placements; "
            f"parameter {where(p)}, gradient {where(grad)}"
        )
    return p.to_local(), grad.to_local()


def _shifted(placement: Any) -> Any:
    """The placement of a state tensor with one leading dimension added (tangents)."""
    if not _is_shard(placement):
        return placement
    kwargs = {"split_factor": placement.split_factor} if hasattr(placement, "split_factor") else {}
    return type(placement)(placement.dim + 1, **kwargs)


# 8-bit codes' scales are the entry ``name + _SCALE`` beside the codes ``name`` (quant8).
_SCALE = "_scale"


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def param_state(p: torch.Tensor, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``optimizer.state[p]`` shows: the bucket's views, as DTensors for a DTensor ``p``.

    The DTensors wrap the very same local views (no copy), so DCP's in-place load
    writes straight into the flat buffers. ``step`` stays a plain 0-d tensor, as
    in torch.optim: it is the same on every rank (replicated). ``tangents`` has
    shape ``(L, *p.shape)``, so a shard of dim ``d`` of ``p`` is one of its dim ``d + 1``.
    8-bit codes are DTensors like the values they stand for; their ``{name}_scale``
    stay plain tensors, this rank's: blocks are per local shard and no placement
    describes them (DCP sees the codes decoded instead, :func:`get_optimizer_state_dict`).
    """
    if not is_dtensor(p):
        return views
    dtensor = _dtensor_type()
    mesh, placements = p.device_mesh, tuple(p.placements)
    out = {}
    for name, view in views.items():
        if name == "step" or name.endswith(_SCALE):
            out[name] = view
            continue
        shape, where = tuple(p.shape), placements
        if name == "tangents":
            shape, where = (view.shape[0], *shape), tuple(_shifted(x) for x in placements)
        out[name] = dtensor.from_local(
            view, mesh, where, run_check=False, shape=torch.Size(shape), stride=_contiguous_stride(shape)
        )
    return out


# -- the hyper-gradient all-reduce ------------------------------------------------

def _as_group(group: Any) -> Any:
    """A user's ``process_group``: a ProcessGroup or a 1-D DeviceMesh."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("process_group was given but torch.distributed is not available")
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"process_group must be a 1-D DeviceMesh (the dimension the parameters are "
                f"sharded over, e.g. mesh['shard']), got {group.ndim} dimensions"
            )
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a ProcessGroup or a DeviceMesh, got {type(group).__name__}")
    return group


class ShardSum:
    """Sums MADA's per-rank hyper-gradient partial sums over the ranks that shard the parameters.

    With ``process_group`` given, it sums over that group (for sharding this
    module cannot see, e.g. plain tensors split by hand). Otherwise it looks
    at the parameters: plain tensors or replicated DTensors (DDP) need no sum;
    DTensors sharded over some mesh dimensions are summed over exactly those
    (for HSDP, the shard dimension and not the replicate one). Parameters that
    mix the two would count the replicated ones once per rank, so that is an error.
    ``needed=False`` (nothing is learned) turns it all off.
    """

    def __init__(self, process_group: Any = None, needed: bool = True) -> None:
        group = None if process_group is None else _as_group(process_group)
        self.groups: tuple = (group,) if group is not None and needed else ()
        self._explicit = process_group is not None or not needed
        self._sharding: tuple | None = None  # (mesh, shard dims) of the sharded params seen
        self._replicated = False  # a parameter that is whole on every rank was seen

    def add(self, params: Iterable[torch.Tensor]) -> None:
        """Take in a new parameter group's parameters (raises before changing anything)."""
        if self._explicit:
            return
        sharding, replicated = self._sharding, self._replicated
        for p in params:
            dims = tuple(i for i, x in enumerate(p.placements) if _is_shard(x)) if is_dtensor(p) else ()
            if not dims:
                replicated = True
                continue
            if sharding is not None and (sharding[0] != p.device_mesh or sharding[1] != dims):
                raise ValueError(
                    "MADA's parameters are sharded over different device meshes or mesh dimensions; "
                    "its hyper-gradient needs one sharding group (give them to separate optimizers)"
                )
            sharding = (p.device_mesh, dims)
        if sharding is not None and replicated:
            raise ValueError(
                "MADA got both sharded DTensor parameters and whole ones (plain tensors or replicated "
                "DTensors): summing the hyper-gradient over the shards would count the whole ones once "
                "per rank. Shard them all (fully_shard the root module too) or use separate optimizers."
            )
        self._sharding, self._replicated = sharding, replicated
        if sharding is not None:
            mesh, dims = sharding
            self.groups = tuple(mesh.get_group(d) for d in dims)

    def __call__(self, total: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place. Every rank gets the same bits, so the coefficients
        stay identical; with NCCL the collective is queued on the stream, no host sync."""
        import torch.distributed as dist

        for group in self.groups:  # one per sharded mesh dimension: nested sums
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total


# -- DCP ---------------------------------------------------------------------------

def get_optimizer_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, options: Any = None
) -> dict[str, Any]:
    """``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` that keeps
    mada-fused's global state (key ``'mada'``), which torch's version drops.

    Per-parameter state comes keyed by parameter name, DTensors for sharded
    parameters; the ``'mada'`` entries (coefficients, bucket layout) are the same on
    every rank, so DCP saves them once. Save it with ``dcp.save`` and restore with
    :func:`set_optimizer_state_dict`. 8-bit state comes decoded, as bf16 values
    (:func:`_dcp_form`), so that it reshards like any other state.
    """
    from torch.distributed.checkpoint import state_dict as dsd

    handle = optimizer.register_state_dict_post_hook(_dcp_form)
    try:
        osd = dsd.get_optimizer_state_dict(model, optimizer, options=options)
    finally:
        handle.remove()
    # Asked after torch's call, which may have allocated the state (a zero-grad
    # step with lr 0 on a fresh optimizer). Only the small 'mada' part is kept.
    extra = optimizer.state_dict().get("mada")
    if extra is None:
        raise TypeError(f"{type(optimizer).__name__} is not a mada-fused optimizer")
    if options is not None and getattr(options, "cpu_offload", False):
        extra = _to_cpu(extra)
    return {**osd, "mada": extra}


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.cpu()
    return {k: _to_cpu(v) for k, v in x.items()} if isinstance(x, Mapping) else x


def set_optimizer_state_dict(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    optim_state_dict: Mapping[str, Any],
    *,
    options: Any = None,
) -> None:
    """Load a state dict from :func:`get_optimizer_state_dict` (e.g. after ``dcp.load``)."""
    from torch.distributed.checkpoint import state_dict as dsd

    if not isinstance(optim_state_dict, Mapping) or "mada" not in optim_state_dict:
        raise ValueError(
            "this state dict has no 'mada' entry: save it with mada_fused.distributed.get_optimizer_state_dict"
        )
    extra = optim_state_dict["mada"]

    def restore(opt: torch.optim.Optimizer, sd: dict) -> dict:
        # The saved bucket layout holds positions in the parameter list (our own
        # state_dict's ids); torch hands us names in the same order: map to those.
        # Anything malformed goes through as it is, for load_state_dict to reject.
        if not (isinstance(extra, Mapping) and isinstance(extra.get("buckets"), list)):
            return {**sd, "mada": extra}
        ids = [pid for group in sd["param_groups"] for pid in group["params"]]
        layout = [[ids[i] if isinstance(i, int) and 0 <= i < len(ids) else None for i in b]
                  if isinstance(b, list) else b for b in extra["buckets"]]
        return {**sd, "mada": {**extra, "buckets": layout}}

    handles = [optimizer.register_load_state_dict_pre_hook(restore),
               # torch reads the optimizer's own state_dict while loading (to allocate or
               # distribute the state): it must see the form it saved.
               optimizer.register_state_dict_post_hook(_dcp_form)]
    try:
        rest = {k: v for k, v in optim_state_dict.items() if k != "mada"}
        dsd.set_optimizer_state_dict(model, optimizer, rest, options=options)
    finally:
        for handle in handles:
            handle.remove()


def _dcp_form(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any] | None:
    """A state_dict post hook: ``sd`` with every 8-bit entry (state buffers and tangent
    rows: codes with their ``{name}_scale``) replaced by its decoded values, bf16 tensors
    or DTensors like the codes (docs/spec.md 5.4, 5.5). The scales are per local shard:
    no placement describes them, and DCP could not reshard them; values reshard like
    parameters. bf16 loses nothing: a code's value has 4 significant bits and is 0 or at
    least 2^-126, and encoding it again under the same blocks gives the same code and
    scale. The per-parameter dicts are the optimizer's own (torch.optim packs them as
    they are): replaced, never changed."""
    from . import quant8

    state = {}
    for key, st in sd["state"].items():
        coded = [n for n, t in st.items() if isinstance(n, str) and n + _SCALE in st
                 and isinstance(t, torch.Tensor) and t.dtype == quant8.CODE_DTYPE]
        if coded:
            st = dict(st)
            for n in coded:
                st[n] = _decoded(n, st[n], st.pop(n + _SCALE))
        state[key] = st
    return {**sd, "state": state}


def _decoded(name: str, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bf16 values of 8-bit ``codes`` (a DTensor: its local shard, re-wrapped alike)."""
    from .quant8 import decode_entry

    local = local_tensor(codes)
    values = decode_entry(name, local, scale).to(torch.bfloat16).view(local.shape)
    if not is_dtensor(codes):
        return values
    return _dtensor_type().from_local(values, codes.device_mesh, codes.placements, run_check=False,
                                      shape=codes.shape, stride=codes.stride())
