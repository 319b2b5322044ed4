"""The fused CPU backend: one multi-threaded pass per bucket, in C++.

The per-element math is csrc/mada_math.h, the same header the CUDA kernels
compile, so CPU CI exercises the GPU's arithmetic. The extension
``mada_fused._C_cpu`` takes addresses, counts and dtype codes only (it does
not link libtorch); this module turns the optimizer's tensors into those and
checks the tensor-side facts the extension cannot see.

Results are bitwise deterministic for any thread count (fixed 64K-element
chunks, hyper-gradient partial sums reduced in chunk order) and independent
of the instruction set the CPU has (the kernels are compiled without FMA
contraction).
"""
from __future__ import annotations

import array
import weakref

import torch

from .. import _segments
from ..flat_state import Bucket
from . import BackendUnavailable
from .base import AdamodKernelConfig, DeviceScalars, MadaKernelConfig, Segments

_CPU = torch.device("cpu")


def _check(name: str, t: torch.Tensor | None, dtype: torch.dtype, numel: int | None = None) -> None:
    _segments.check_tensor("cpu", name, t, _CPU, dtype, numel)


class CpuBackend:
    name = "cpu"

    def __init__(self, ext) -> None:
        self._ext = ext
        self._checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in _segments.DTYPE_CODES

    def _common(self, bucket: Bucket, seg: Segments, sc: DeviceScalars) -> tuple[array.array, list[int]]:
        """The segment table (keep it alive during the call) and the common header."""
        self._check_bucket(bucket)
        groups = sc.lr.numel()
        _check("lr", sc.lr, torch.float64)
        _check("weight_decay", sc.weight_decay, torch.float64, groups)
        _check("grad_scale", sc.grad_scale, torch.float32, 1)
        _check("found_inf", sc.found_inf, torch.float32, 1)
        table = _segments.pack(seg)
        common = [
            table.buffer_info()[0],
            len(seg.params),
            _segments.DTYPE_CODES[bucket.dtype],
            bucket.numel,
            groups,
            len(bucket.params),
            sc.lr.data_ptr(),
            sc.weight_decay.data_ptr(),
            bucket.steps.data_ptr(),
            _segments.address(sc.grad_scale),
            _segments.address(sc.found_inf),
            torch.get_num_threads(),
        ]
        return table, common

    def _check_bucket(self, bucket: Bucket) -> None:
        """A bucket's buffers never change identity: check them once, not every step."""
        key = tuple(map(id, bucket.tensors()))
        if self._checked.get(bucket) == key:
            return
        _check("steps", bucket.steps, torch.float64, len(bucket.params))
        for name, buf in bucket.buffers.items():
            _check(f"state {name!r}", buf, bucket.state_dtype, bucket.numel)
        if bucket.tangents is not None:
            _check("tangents", bucket.tangents, bucket.state_dtype)
        self._checked[bucket] = key

    def _mada(self, bucket, seg, sc, cfg: MadaKernelConfig, dot_out, step: bool) -> None:
        table, common = self._common(bucket, seg, sc)  # `table` lives until the call returns
        _check("coef", sc.coef, torch.float64, 6)
        learn = list(cfg.learn)
        if dot_out is not None:
            if dot_out.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"cpu backend: dot_out must be float32 or float64, got {dot_out.dtype}")
            _check("dot_out", dot_out, dot_out.dtype, len(learn))
        tangents = bucket.tangents if learn else None
        # The kernel variant follows from which state is passed: exactly what cfg says exists.
        optional = {"n": cfg.has_beta3, "g_prev": cfg.has_beta3, "vb": cfg.has_vbar, "l": cfg.has_lion,
                    "s": cfg.has_mod}
        state = {k: t for k, t in bucket.buffers.items() if optional.get(k, True)}
        self._ext.mada(
            common,
            _segments.addresses(state, _segments.MADA_STATE),
            _segments.address(tangents),
            bucket.numel if tangents is None else tangents.stride(0),
            learn,
            _segments.address(dot_out),
            dot_out is not None and dot_out.dtype == torch.float64,
            step,
            sc.coef.data_ptr(),
            [cfg.eps, cfg.mod_beta, *cfg.lion_betas],
            cfg.vbar_detach,
            cfg.maximize,
        )

    def mada_step(self, bucket, seg, scalars, cfg, dot_out) -> None:
        self._mada(bucket, seg, scalars, cfg, dot_out, step=True)

    def mada_dot(self, bucket, seg, scalars, cfg, dot_out) -> None:
        self._mada(bucket, seg, scalars, cfg, dot_out, step=False)

    def adamod_step(self, bucket, seg, scalars, cfg: AdamodKernelConfig) -> None:
        table, common = self._common(bucket, seg, scalars)  # `table` lives until the call returns
        state = {k: t for k, t in bucket.buffers.items() if k != "g_prev" or cfg.diff}
        self._ext.adamod(
            common,
            _segments.addresses(state, _segments.ADAMOD_STATE),
            [cfg.beta1, cfg.beta2, cfg.beta3, cfg.eps],
        )


def load() -> CpuBackend:
    try:
        from .. import _C_cpu
    except ImportError as e:
        raise BackendUnavailable(
            f"the C++ CPU extension is not built ({e}); run `pip install -e .` in the mada-fused "
            "checkout (needs a C++17 compiler with OpenMP) or use backend='reference'"
        ) from None
    return CpuBackend(_C_cpu)
