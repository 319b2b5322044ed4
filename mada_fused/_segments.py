"""Packs a step's :class:`~mada_fused.backends.base.Segments` into the flat
int64 table the native extensions read (CPU now; the CUDA backend may reuse it).

One row per active parameter, six int64 columns (see csrc/cpu/cpu_calls.h,
``SegRow``)::

    param address, grad address, state offset, numel, group index, param index

Addresses come from ``data_ptr()``; the caller keeps ``seg`` alive while a
kernel reads the table. State names give the order in which a backend passes
the bucket's state buffers (absent state -> address 0).
"""
from __future__ import annotations

import array

import torch

from .backends.base import Segments

COLUMNS: tuple[str, ...] = ("param", "grad", "offset", "numel", "group", "param_index")
MADA_STATE: tuple[str, ...] = ("m", "v", "n", "g_prev", "l", "vb", "s")
ADAMOD_STATE: tuple[str, ...] = ("m", "v", "s", "g_prev")
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
}


def pack(seg: Segments) -> array.array:
    """The step's table as ``array('q')``, six int64 per segment, in host memory.

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
                f"segment {len(flat) // 6}: param and grad must be contiguous with {n} elements, "
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
