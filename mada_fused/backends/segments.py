"""The tensor side of a native call: the packed segment table and the checks
of the tensors an extension will read by address.

:func:`pack` turns a step's :class:`~mada_fused.backends.base.Segments` into
the flat int64 table of ``SegRow``s (csrc/abi.h; the column order is
:data:`mada_fused.backends.abi.SEG_ROW`)::

    param address, grad address, state offset, numel, group index, param index

Addresses come from ``data_ptr()``; the caller keeps the table alive while a
kernel reads it.
"""
from __future__ import annotations

import array

import torch

from . import abi
from .base import Segments

_COLUMNS = len(abi.SEG_ROW)


def pack(seg: Segments) -> array.array:
    """The step's table as ``array('q')``, one row of six int64 per segment, in host memory.

    Its address is ``table.buffer_info()[0]``; ``torch.frombuffer(table,
    dtype=torch.int64)`` views it as a tensor (e.g. to copy it to a GPU).

    Checks what would let a kernel read or write past a tensor: each param and
    grad must be contiguous with the segment's numel. Dtype, device and shape
    agreement are the optimizer's checks (``_checks.grad_of``); offsets are
    checked against the flat state by the extension.
    """
    flat: list[int] = []
    for p, g, off, n, grp, idx in zip(
        seg.params, seg.grads, seg.offsets, seg.numels, seg.groups, seg.param_index
    ):
        if p.numel() != n or g.numel() != n or not p.is_contiguous() or not g.is_contiguous():
            raise ValueError(
                f"segment {len(flat) // _COLUMNS}: param and grad must be contiguous with {n} elements, "
                f"got {tuple(p.shape)} and {tuple(g.shape)}"
            )
        flat += (p.data_ptr(), g.data_ptr(), off, n, grp, idx)
    return array.array("q", flat)


def addresses(tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> list[int]:
    """``data_ptr()`` of each named buffer, 0 where the bucket has none."""
    return [tensors[n].data_ptr() if n in tensors else 0 for n in names]


def address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def check_rows(backend: str, name: str, t: torch.Tensor | None, device: torch.device,
                dtype: torch.dtype, numel: int) -> None:
    """:func:`check_tensor` for a 2-D buffer read row by row at its row stride
    (the tangents): contiguous rows of ``numel`` elements, none overlapping."""
    if t is None:
        return
    if t.dim() != 2 or t.shape[1] != numel or t.stride(1) != 1 or t.stride(0) < numel:
        raise ValueError(
            f"{backend} backend: {name} must be 2-D with contiguous rows of {numel} elements, "
            f"got shape {tuple(t.shape)} and strides {t.stride()}"
        )
    check_tensor(backend, name, t[0], device, dtype, numel)


def check_tensor(backend: str, name: str, t: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype, numel: int | None = None) -> None:
    """A native backend's check of one tensor it will read by address (None passes).

    A wrong device, dtype, layout or size would be a wild memory access, so it is an error.
    """
    if t is None:
        return
    if t.device != device or t.dtype != dtype or not t.is_contiguous() or (numel is not None and t.numel() != numel):
        raise ValueError(
            f"{backend} backend: {name} must be a contiguous {dtype} tensor on {device}"
            + ("" if numel is None else f" of {numel} elements")
            + f", got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
