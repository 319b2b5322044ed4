"""Flat optimizer state: one buffer per state name for a (device, dtype) bucket.

Fused kernels want a few long buffers; users, checkpoints and LR tooling want
per-parameter tensors. A bucket gives both: ``optimizer.state[p][name]`` is a
view into the bucket's flat buffer, so state_dict sees per-parameter tensors
and load_state_dict writes straight into the buffers the kernels read.
"""
from __future__ import annotations

import torch

from . import quant8
from ._lru import LruCache
from .distributed import local_shape


# How a bucket marks 8-bit blockwise state (``state_dtype="8bit"``, docs/spec.md 5.4) and
# 8-bit tangent rows (``tangent_dtype="8bit"``, 5.5): uint8 codes, with fp32 scales beside them.
STATE_8BIT = torch.uint8
# What the optimizers' ``state_dtype`` and MADA's ``tangent_dtype`` may ask for
# (docs/spec.md sections 5.1 and 5.3; both also STATE_8BIT, 5.4 and 5.5).
STATE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)


def state_dtype_name(state_dtype: torch.dtype) -> str:
    """A state dtype as users spell it (error messages)."""
    return "'8bit'" if state_dtype == STATE_8BIT else str(state_dtype)


def bucket_state_dtype(param: torch.Tensor, requested: torch.dtype) -> torch.dtype:
    """The state dtype of ``param``'s bucket: 8-bit state leaves parameters under
    quant8.MIN_NUMEL elements in fp32, as bitsandbytes does. A DTensor counts its
    global elements, so every rank (and a single process) decides alike for one
    parameter, whatever the sharding (docs/spec.md 5.4)."""
    dtype = state_dtype_for(param.dtype, requested)
    if dtype == STATE_8BIT and param.numel() < quant8.MIN_NUMEL:
        return torch.float32
    return dtype


def state_dtype_for(param_dtype: torch.dtype, requested: torch.dtype = torch.float32) -> torch.dtype:
    # fp64 params (the test oracle) keep fp64 state and tangents whatever was asked;
    # the others store them in the requested dtype (fp32 by default, whatever the param's).
    return torch.float64 if param_dtype == torch.float64 else requested


def tangent_dtype_for(param: torch.Tensor, requested: torch.dtype, state_dtype: torch.dtype) -> torch.dtype:
    """The tangent dtype of a bucket whose state dtype is ``state_dtype`` (its own, after
    bucket_state_dtype): 8-bit rows share 8-bit state's blocks, so a bucket that keeps fp32
    state (a parameter under quant8.MIN_NUMEL elements) keeps fp32 rows (docs/spec.md 5.5)."""
    dtype = state_dtype_for(param.dtype, requested)
    return torch.float32 if dtype == STATE_8BIT and state_dtype != STATE_8BIT else dtype


def compute_dtype_for(state_dtype: torch.dtype) -> torch.dtype:
    # bf16 or 8-bit state and bf16 tangents are storage only: the arithmetic stays fp32.
    return torch.float64 if state_dtype == torch.float64 else torch.float32


# How a step stores a bf16 parameter's new value (docs/spec.md section 5.2; abi.PARAM_ROUNDS).
PARAM_ROUNDS: tuple[str, ...] = ("nearest", "stochastic", "kahan")
# The state entry of Kahan summation's compensation (optimi's name).
KAHAN_COMP = "kahan_comp"


def param_round_for(param_dtype: torch.dtype, requested: str = "nearest") -> str:
    # Stochastic rounding and Kahan summation are for bf16 parameters; the others
    # (fp32, fp64, fp16) store their new values as without them, as in torchao and optimi.
    return requested if param_dtype == torch.bfloat16 else "nearest"


# Host buffers: where each stream starts within a 4 KiB page. Large allocations
# are page-aligned, so a bucket's state buffers (and tangent rows a page multiple
# apart) would all start at the same page offset, and the fused CPU pass, which
# walks up to 15 streams in step, would have them compete for the same L1 sets
# and make loads wait on stores to other streams (4K aliasing). Starting each
# in its own 256-byte slot (one 64-element fp32 block) made full MADA's step
# 19 % faster at 16M elements on the 2-core Zen 3 VM (bench/RESULTS.md). Slots
# 0-1 are left to the parameters and gradients, which torch's allocator puts
# near a page start.
_PAGE = 4096
_SLOT = 256
_FIRST_SLOT = 2

# Every parameter's state starts on a 16-byte boundary, and a bucket's length (so a
# device tangent row's stride, which is that length) is a whole number of 16 bytes: the
# CUDA planner (csrc/cuda/plan.cpp) and the Triton launcher give a segment vector
# accesses only when every stream it touches starts 16-byte aligned, and with dense
# offsets one odd-sized parameter (a 50,257-row embedding, a 3-element bias) put every
# later one on the scalar path. One rule for every bucket, host ones too, so the CUDA
# code run on the CPU (cuda_on_cpu) sees CUDA's layout: it costs at most 15 bytes per
# parameter. The pad elements stay zero (kernels step each segment's true numel) and
# per-parameter views keep them out of state_dict, whose format does not change.
ALIGN = 16

# Patterns of missing grads whose step-count index stays on the device. Layer
# drop or MoE routing can make every step's pattern new: least recently used go.
INDEX_CACHE_SIZE = 64


def host_layout(device: torch.device) -> bool:
    """Whether a bucket on ``device`` places its buffers apart in pages (a CPU cache
    effect, above); GPU buffers stay plain allocations (unmeasured there)."""
    return device.type == "cpu"


def _placed(numel: int, slot: int, opts: dict) -> torch.Tensor:
    """A zeroed 1-D buffer whose data starts ``slot`` slots into a page."""
    size = opts["dtype"].itemsize
    raw = torch.zeros(numel + _PAGE // size, **opts)
    skip = (slot % (_PAGE // _SLOT) * _SLOT - raw.data_ptr()) % _PAGE // size
    return raw[skip : skip + numel]


def _placed_rows(rows: int, numel: int, slot: int, opts: dict) -> torch.Tensor:
    """A zeroed ``(rows, numel)`` buffer whose rows start in consecutive slots
    (row stride: ``numel`` rounded up to whole pages, plus one slot)."""
    size = opts["dtype"].itemsize
    stride = -(-numel * size // _PAGE) * (_PAGE // size) + _SLOT // size
    return _placed(rows * stride, slot, opts).view(rows, stride)[:, :numel]


class Bucket:
    """State of all parameters of one device and dtype that joined together.

    ``buffers[name]`` is a 1-D buffer of ``numel`` elements; parameter ``i``
    owns elements ``offsets[i] : offsets[i] + params[i].numel()``, each offset
    and ``numel`` a multiple of 16 bytes (the elements between are zero
    padding, see ALIGN). Tangents are one ``(num_learned, numel)`` buffer of
    ``tangent_dtype`` (fp32, bf16 or 8-bit codes, as asked; fp64 for fp64
    parameters, fp32 for a bucket without 8-bit state) whose rows are
    contiguous (on the host they are padded further apart: its row stride is
    ``tangents.stride(0)``, a whole number of quant8.BLOCK for 8-bit rows);
    8-bit rows have ``tangent_scales``, (num_learned, numel / quant8.BLOCK)
    fp32, each row's block scales (else None).
    ``comp`` is Kahan summation's bf16 compensation, one element per state
    element (``param_round == "kahan"`` only, else None).
    With 8-bit state (``state_dtype`` STATE_8BIT) the buffers hold uint8 codes,
    ``scales[name]`` one fp32 scale per quant8.BLOCK elements, and every offset
    is a multiple of quant8.BLOCK, so no block holds two parameters (nor two
    FSDP2 shards: a bucket holds local shards).
    ``steps[i]`` counts parameter ``i``'s successful steps. ``built_for[i]``
    is the (dtype, device, shape) parameter ``i`` had when its state was made:
    the optimizer checks every step that it still has them.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        state_names: tuple[str, ...],
        num_tangents: int,
        state_dtype: torch.dtype = torch.float32,
        param_round: str = "nearest",
        tangent_dtype: torch.dtype = torch.float32,
    ) -> None:
        first = params[0]
        self.device = first.device
        self.dtype = first.dtype
        self.state_dtype = bucket_state_dtype(first, state_dtype)
        self.param_round = param_round_for(first.dtype, param_round)
        self.tangent_dtype = tangent_dtype_for(first, tangent_dtype, self.state_dtype)
        self.params = list(params)
        self.built_for = [(p.dtype, p.device, p.shape) for p in self.params]
        # A DTensor parameter (FSDP2) keeps state for its local shard only.
        self.shapes = [local_shape(p) for p in self.params]
        self.offsets: list[int] = []
        # The narrowest stream sets the alignment unit (a Kahan compensation is bf16).
        narrowest = min(self.state_dtype.itemsize, self.tangent_dtype.itemsize,
                        torch.bfloat16.itemsize if self.param_round == "kahan" else 8)
        vec = ALIGN // narrowest
        if self.quantized:
            vec = quant8.BLOCK
        total = 0
        for shape in self.shapes:
            self.offsets.append(total)
            total = -(-(total + shape.numel()) // vec) * vec
        self.numel = total
        opts = dict(device=self.device, dtype=self.state_dtype)
        host = host_layout(self.device)
        self.buffers = {
            name: _placed(total, _FIRST_SLOT + k, opts) if host else torch.zeros(total, **opts)
            for k, name in enumerate(state_names)
        }
        self.comp = None
        if self.param_round == "kahan":
            opts_c = dict(opts, dtype=torch.bfloat16)
            slot = _FIRST_SLOT + len(state_names)
            self.comp = _placed(total, slot, opts_c) if host else torch.zeros(total, **opts_c)
        self.scales = {
            name: torch.zeros(total // quant8.BLOCK, device=self.device, dtype=torch.float32)
            for name in (state_names if self.quantized else ())
        }
        self.tangents = self.tangent_scales = None
        if num_tangents and self.tangent_dtype == STATE_8BIT:
            self.tangent_scales = torch.zeros(num_tangents, total // quant8.BLOCK, device=self.device,
                                              dtype=torch.float32)
        if num_tangents:
            slot = _FIRST_SLOT + len(state_names) + (self.comp is not None)
            opts = dict(opts, dtype=self.tangent_dtype)
            self.tangents = (_placed_rows(num_tangents, total, slot, opts) if host
                             else torch.zeros(num_tangents, total, **opts))
        self.steps = torch.zeros(len(self.params), device=self.device, dtype=torch.float64)
        # (indices, ones) on the device for steps where only some parameters have grads.
        self.index_cache: LruCache[tuple[torch.Tensor, torch.Tensor]] = LruCache(INDEX_CACHE_SIZE)

    def views(self, i: int) -> dict[str, torch.Tensor]:
        """Per-parameter state of parameter ``i``: views, never copies."""
        shape, lo = self.shapes[i], self.offsets[i]
        hi = lo + shape.numel()
        out = {"step": self.steps[i]}
        for name, buf in self.buffers.items():
            out[name] = buf[lo:hi].view(shape)
        for name, buf in self.scales.items():
            out[f"{name}_scale"] = buf[quant8.blocks_of(lo, hi)]
        if self.comp is not None:
            out[KAHAN_COMP] = self.comp[lo:hi].view(shape)
        if self.tangents is not None:
            out["tangents"] = self.tangents[:, lo:hi].view(len(self.tangents), *shape)
        if self.tangent_scales is not None:
            out["tangents_scale"] = self.tangent_scales[:, quant8.blocks_of(lo, hi)]
        return out

    @property
    def quantized(self) -> bool:
        return self.state_dtype == STATE_8BIT

    def copy_state(self, i: int, src: "Bucket", j: int) -> None:
        """Parameter ``i``'s state := parameter ``j``'s in ``src``, converted to this
        bucket's state dtype and device (as load_state_dict converts). A Kahan
        compensation only one side keeps starts at 0, or is dropped."""
        self.load(i, src.views(j))

    def load(self, i: int, saved: dict[str, torch.Tensor]) -> None:
        """Parameter ``i``'s state := ``saved`` (views' names; a buffer or the tangent rows
        either as values or as 8-bit codes with ``{name}_scale``), converted (docs/spec.md
        5.1, 5.3-5.5): 8-bit codes to and from other dtypes through fp32 values, and 8-bit
        to 8-bit as the very same codes and scales. An entry only one side has (a Kahan
        compensation) is left at 0, or dropped."""
        mine = self.views(i)
        for name, t in saved.items():
            if name.endswith("_scale") or name not in mine:
                continue
            scale_name = f"{name}_scale"
            if t.dtype == STATE_8BIT:
                scale = saved[scale_name]
                if scale_name in mine:
                    mine[name].copy_(t)
                    mine[scale_name].copy_(scale)
                    continue
                t = quant8.decode_entry(name, t.to(self.device), scale.to(self.device))
            if scale_name in mine:
                codes, scale = quant8.encode_entry(name, t.to(self.device, torch.float32))
                mine[name].copy_(codes.view(mine[name].shape))
                mine[scale_name].copy_(scale)
            else:
                mine[name].copy_(t.reshape(mine[name].shape))

    @property
    def tangent_stride(self) -> int:
        """Elements from one tangent row to the next (what kernels index rows by)."""
        return self.numel if self.tangents is None else self.tangents.stride(0)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the bucket owns (for snapshot/restore)."""
        out = list(self.buffers.values()) + list(self.scales.values()) + [self.steps]
        if self.comp is not None:
            out.append(self.comp)
        if self.tangents is not None:
            out.append(self.tangents)
        if self.tangent_scales is not None:
            out.append(self.tangent_scales)
        return out

