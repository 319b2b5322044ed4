"""The Triton backend: the whole step of a bucket in one kernel launch (kernels in triton_kernels/).

Triton is optional. Without it, or with a broken install, :func:`load` raises
BackendUnavailable with the reason. Parameters on CUDA run compiled kernels;
CPU parameters run under Triton's interpreter, and only when
TRITON_INTERPRET=1 is set, so ``backend="auto"`` never picks a slow
interpreted pass for CPU training but tests can check the kernels without a GPU.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import BackendUnavailable
from .base import AdamodKernelConfig, DeviceScalars, MadaKernelConfig, Segments
from ..flat_state import PARAM_ROUNDS, STATE_8BIT, Bucket

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_PKG = "mada_fused.triton_kernels"


def _import_kernels():
    # One import path: the folder triton_kernels/ is installed as this package
    # (setup.py package_dir; `pip install -e .` maps it for a source checkout).
    try:
        return importlib.import_module(_PKG)
    except ModuleNotFoundError as e:
        if e.name != _PKG:
            raise
        raise ModuleNotFoundError(f"{_PKG} is not installed (in a source checkout: `pip install -e .`)",
                                  name=_PKG) from None


class TritonBackend:
    name = "triton"
    # 8-bit state and tangent rows (docs/spec.md 5.4, 5.5): kernels.py's _get and _put.
    tangent_dtypes = frozenset((torch.float32, torch.float64, torch.bfloat16, STATE_8BIT))
    state_dtypes = tangent_dtypes
    param_rounds = frozenset(PARAM_ROUNDS)

    def __init__(self, kernels) -> None:
        self._k = kernels

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        if dtype not in _DTYPES:
            return False
        if device.type == "cuda":
            return torch.cuda.is_available()
        # Read per call, not at import: a test can switch the interpreter on for itself.
        return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

    def mada_step(self, bucket: Bucket, seg: Segments, scalars: DeviceScalars, cfg: MadaKernelConfig,
                  dot_out: torch.Tensor | None) -> None:
        self._k.mada(bucket, seg, scalars, cfg, dot_out, step=True)

    def mada_dot(self, bucket: Bucket, seg: Segments, scalars: DeviceScalars, cfg: MadaKernelConfig,
                 dot_out: torch.Tensor) -> None:
        self._k.mada(bucket, seg, scalars, cfg, dot_out, step=False)

    def adamod_step(self, bucket: Bucket, seg: Segments, scalars: DeviceScalars, cfg: AdamodKernelConfig) -> None:
        self._k.adamod(bucket, seg, scalars, cfg)


def load() -> TritonBackend:
    try:
        import triton
    except ImportError as e:
        raise BackendUnavailable(f"Triton is not installed ({e}); `pip install triton` to use backend='triton'") from e
    # What the kernels use that older releases lack (developed and tested with Triton 3.9).
    if not (hasattr(triton, "knobs") and hasattr(triton, "constexpr_function")):
        raise BackendUnavailable(f"Triton {triton.__version__} is too old for backend='triton'; `pip install -U triton`")
    try:
        kernels = _import_kernels()
    except Exception as e:  # a Triton too old for these kernels, or a broken install
        raise BackendUnavailable(f"the Triton kernels failed to import: {type(e).__name__}: {e}") from e
    return TritonBackend(kernels)
