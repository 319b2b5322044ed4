"""The fused CUDA backend: one kernel launch steps a whole (device, dtype) bucket.

The extension ``mada_fused._C_cuda`` (csrc/cuda/) takes addresses, counts and
dtype codes only: it does not link libtorch, and it links the CUDA runtime
statically. This module turns the optimizer's tensors into those, checks the
tensor-side facts the extension cannot see, and hands it torch's current
stream, so a step is ordered like any torch op and can be captured in a CUDA
graph: nothing here reads a device value, copies to the device or syncs.

Per call: the step kernel (one launch per 600 segments), plus, when a
hyper-gradient is taken, one tiny kernel that sums the per-block partial sums
in a fixed order into ``dot_out`` (bitwise reproducible, no float atomics).
"""
from __future__ import annotations

import warnings

import torch

from .. import _segments
from ..build_info import cuda_ext_supports, warn_no_cuda_code
from ..flat_state import Bucket
from . import BackendUnavailable
from .base import AdamodKernelConfig, DeviceScalars, MadaKernelConfig, Segments

# Pass codes and MADA variant bits (csrc/cuda/launch.h: Op, MadaBits).
_MADA_STEP, _MADA_DOT, _ADAMOD_STEP = 0, 1, 2
_BETA3, _VBAR, _LION, _MOD, _TANGENTS = 1, 2, 4, 8, 16
_F32, _F64 = torch.float32, torch.float64


def _check(name: str, t: torch.Tensor | None, device: torch.device, dtype: torch.dtype, numel: int | None = None):
    _segments.check_tensor("cuda", name, t, device, dtype, numel)  # a mismatch would be a wild GPU access


class CudaBackend:
    name = "cuda"

    def __init__(self, ext) -> None:
        self._ext = ext
        self._ok: dict[int, bool] = {}  # device index -> this build runs there

    # -- registry ---------------------------------------------------------------
    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        device = torch.device(device)
        if device.type != "cuda" or dtype not in _segments.DTYPE_CODES:
            return False
        index = torch.cuda.current_device() if device.index is None else device.index
        ok = self._ok.get(index)
        if ok is None:  # asked once per device (warm-up), never inside a graph capture
            ok = self._ok[index] = self._runs_on(index)
        return ok

    def _runs_on(self, index: int) -> bool:
        """The build has code for this GPU (arch list) and our CUDA runtime can drive it."""
        if not cuda_ext_supports(index):
            warn_no_cuda_code(index)
            return False
        ok, why = self._ext.device_ok(index)  # e.g. a driver older than the static runtime
        if not ok:
            warnings.warn(f"mada_fused: the CUDA extension cannot run on cuda:{index} ({why}); "
                          "backend='auto' uses another backend", RuntimeWarning, stacklevel=4)
        return bool(ok)

    # -- the call ---------------------------------------------------------------
    @staticmethod
    def _target(dev: torch.device) -> tuple[int, int]:
        """(device index, raw handle of torch's current stream there): we run in torch's order."""
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return index, torch.cuda.current_stream(dev).cuda_stream

    def _run(self, op: int, variant: int, bucket: Bucket, seg: Segments, sc: DeviceScalars,
             bufs: list[int], learn: tuple[int, ...], consts: list[float], maximize: bool,
             dot_out: torch.Tensor | None) -> None:
        dev = bucket.device
        sd = bucket.state_dtype
        groups = sc.lr.numel()
        _check("lr", sc.lr, dev, _F64)
        _check("weight_decay", sc.weight_decay, dev, _F64, groups)
        _check("steps", bucket.steps, dev, _F64, len(bucket.params))
        _check("coef", sc.coef, dev, _F64, 6)
        _check("grad_scale", sc.grad_scale, dev, _F32, 1)
        _check("found_inf", sc.found_inf, dev, _F32, 1)
        for name, buf in bucket.buffers.items():
            _check(f"state {name!r}", buf, dev, sd, bucket.numel)
        tangents = bucket.tangents if learn else None
        if tangents is not None:
            _segments.check_rows("cuda", "tangents", tangents, dev, sd, bucket.numel)
        _check("dot_out", dot_out, dev, _F64, len(learn))
        if max(seg.groups, default=0) >= groups:
            raise ValueError("cuda backend: a segment names a parameter group with no lr")
        table = _segments.pack(seg)  # host memory, read during the call only
        self._ext.run(
            [op, variant, _segments.DTYPE_CODES[bucket.dtype], *self._target(dev)],
            [table.buffer_info()[0], len(table) // len(_segments.COLUMNS), bucket.numel],
            [_segments.address(t) for t in (sc.coef, sc.lr, sc.weight_decay, bucket.steps,
                                            sc.grad_scale, sc.found_inf)],
            bufs,
            _segments.address(tangents),
            bucket.tangent_stride,
            sum(1 << j for j in learn),
            consts,
            maximize,
            _segments.address(dot_out),
            # Per-block partial sums; allocated on the current stream, so reuse
            # is ordered after our kernels, also inside a captured graph.
            lambda n: torch.empty(n, dtype=_F64, device=dev),
        )
        del table

    def _mada(self, op: int, bucket, seg, sc, cfg: MadaKernelConfig, dot_out) -> None:
        variant = ((_BETA3 if cfg.has_beta3 else 0) | (_VBAR if cfg.has_vbar else 0)
                   | (_LION if cfg.has_lion else 0) | (_MOD if cfg.has_mod else 0)
                   | (_TANGENTS if cfg.learn else 0))
        consts = [cfg.eps, cfg.mod_beta, *cfg.lion_betas, 1.0 if cfg.vbar_detach else 0.0]
        bufs = _segments.addresses(bucket.buffers, _segments.MADA_STATE)
        self._run(op, variant, bucket, seg, sc, bufs, tuple(cfg.learn), consts, cfg.maximize, dot_out)

    def mada_step(self, bucket, seg, scalars, cfg: MadaKernelConfig, dot_out) -> None:
        self._mada(_MADA_STEP, bucket, seg, scalars, cfg, dot_out)

    def mada_dot(self, bucket, seg, scalars, cfg: MadaKernelConfig, dot_out) -> None:
        self._mada(_MADA_DOT, bucket, seg, scalars, cfg, dot_out)

    def adamod_step(self, bucket, seg, scalars, cfg: AdamodKernelConfig) -> None:
        # The extension reads g_prev only for DiffMod (csrc/cuda/launch.h: adamod_buffers).
        bufs = _segments.addresses(bucket.buffers, _segments.ADAMOD_STATE) + [0] * 3
        consts = [cfg.beta1, cfg.beta2, cfg.beta3, cfg.eps, 0.0]
        self._run(_ADAMOD_STEP, int(cfg.diff), bucket, seg, scalars, bufs, (), consts, False, None)


def load() -> CudaBackend:
    try:
        from .. import _C_cuda
    except ImportError as e:
        raise BackendUnavailable(
            f"the CUDA extension is not built ({e}); install mada-fused with nvcc on PATH "
            "(MADA_BUILD_CUDA=1 makes a missing toolkit an error) or use backend='triton'/'reference'"
        ) from None
    if not torch.cuda.is_available():
        how = ("this PyTorch is a CPU-only build: install a CUDA build of PyTorch"
               if torch.version.cuda is None else "check the NVIDIA driver and CUDA_VISIBLE_DEVICES")
        raise BackendUnavailable(f"the CUDA extension is built, but torch sees no CUDA device ({how}); "
                                 "or use backend='cpu' or 'reference'")
    return CudaBackend(_C_cuda)
