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
import operator
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
        # Per bucket: facts checked once (its buffers and the optimizer's scalar
        # tables never change identity) and the kernel arguments per config.
        self._known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in _segments.DTYPE_CODES

    def _common(self, bucket: Bucket, seg: Segments, sc: DeviceScalars) -> tuple[array.array, list[int], dict]:
        """The segment table (keep it alive during the call), the common header
        and the bucket's cache of per-config kernel arguments."""
        known = self._check(bucket, sc)
        _check("grad_scale", sc.grad_scale, torch.float32, 1)
        _check("found_inf", sc.found_inf, torch.float32, 1)
        table = _segments.pack(seg)
        common = [
            table.buffer_info()[0],
            len(seg.params),
            *known["header"],
            _segments.address(sc.grad_scale),
            _segments.address(sc.found_inf),
            torch.get_num_threads(),
        ]
        return table, common, known["per_cfg"]

    def _check(self, bucket: Bucket, sc: DeviceScalars) -> dict:
        """Checks what the extension reads by address, once per tensor identity
        (a wrong dtype or size there would be a wild memory access)."""
        tensors = bucket.tensors()
        known = self._known.get(bucket)
        if known is None or known["tensors"] != list(map(id, tensors)):
            _check("steps", bucket.steps, torch.float64, len(bucket.params))
            for name, buf in bucket.buffers.items():
                _check(f"state {name!r}", buf, bucket.state_dtype, bucket.numel)
            if bucket.tangents is not None:
                _segments.check_rows("cpu", "tangents", bucket.tangents, _CPU, bucket.state_dtype, bucket.numel)
            known = self._known[bucket] = {"tensors": list(map(id, tensors)), "scalars": None, "per_cfg": {}}
        scalars = (sc.lr, sc.weight_decay, sc.coef)
        if known["scalars"] is None or any(map(operator.is_not, known["scalars"], scalars)):
            _check("lr", sc.lr, torch.float64)
            _check("weight_decay", sc.weight_decay, torch.float64, sc.lr.numel())
            _check("coef", sc.coef, torch.float64, 6)
            known["scalars"] = scalars  # held, so no other tensor can take their ids
            # The middle of the call header (cpu_calls.h, Common): fixed while these tensors are.
            known["header"] = (
                _segments.DTYPE_CODES[bucket.dtype],
                bucket.numel,
                sc.lr.numel(),
                len(bucket.params),
                sc.lr.data_ptr(),
                sc.weight_decay.data_ptr(),
                bucket.steps.data_ptr(),
            )
        return known

    def _mada(self, bucket, seg, sc, cfg: MadaKernelConfig, dot_out, step: bool) -> None:
        table, common, per_cfg = self._common(bucket, seg, sc)  # `table` lives until the call returns
        if sc.coef is None:
            raise ValueError("cpu backend: a MADA pass needs the coefficients")
        if dot_out is not None:
            if dot_out.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"cpu backend: dot_out must be float32 or float64, got {dot_out.dtype}")
            _check("dot_out", dot_out, dot_out.dtype, len(cfg.learn))
        cached = per_cfg.get(cfg)
        if cached is None:
            # The kernel variant follows from which state is passed: exactly what cfg says exists.
            optional = {"n": cfg.has_beta3, "g_prev": cfg.has_beta3, "vb": cfg.has_vbar, "l": cfg.has_lion,
                        "s": cfg.has_mod}
            buffers = {k: t for k, t in bucket.buffers.items() if optional.get(k, True)}
            tangents = bucket.tangents if cfg.learn else None
            cached = per_cfg[cfg] = (
                (
                    _segments.addresses(buffers, _segments.MADA_STATE),
                    _segments.address(tangents),
                    bucket.tangent_stride,
                    list(cfg.learn),
                ),
                [cfg.eps, cfg.mod_beta, *cfg.lion_betas],
            )
        fixed, consts = cached
        self._ext.mada(
            common,
            *fixed,
            _segments.address(dot_out),
            dot_out is not None and dot_out.dtype == torch.float64,
            step,
            sc.coef.data_ptr(),
            consts,
            cfg.vbar_detach,
            cfg.maximize,
        )

    def mada_step(self, bucket, seg, scalars, cfg, dot_out) -> None:
        self._mada(bucket, seg, scalars, cfg, dot_out, step=True)

    def mada_dot(self, bucket, seg, scalars, cfg, dot_out) -> None:
        self._mada(bucket, seg, scalars, cfg, dot_out, step=False)

    def adamod_step(self, bucket, seg, scalars, cfg: AdamodKernelConfig) -> None:
        table, common, per_cfg = self._common(bucket, seg, scalars)  # `table` lives until the call returns
        state = per_cfg.get(cfg)
        if state is None:
            buffers = {k: t for k, t in bucket.buffers.items() if k != "g_prev" or cfg.diff}
            state = per_cfg[cfg] = _segments.addresses(buffers, _segments.ADAMOD_STATE)
        self._ext.adamod(common, state, [cfg.beta1, cfg.beta2, cfg.beta3, cfg.eps])


def load() -> CpuBackend:
    try:
        from .. import _C_cpu
    except ImportError as e:
        raise BackendUnavailable(
            f"the C++ CPU extension is not built ({e}); run `pip install -e .` in the mada-fused "
            "checkout (needs a C++17 compiler with OpenMP) or use backend='reference'"
        ) from None
    return CpuBackend(_C_cpu)
