"""The Triton backend: the whole step of a bucket in one kernel launch (kernels in triton_kernels/).

Triton is optional. Without it, or with a broken install, :func:`load` raises
BackendUnavailable with the reason. Parameters on CUDA run compiled kernels;
CPU parameters run under Triton's interpreter, and only when
TRITON_INTERPRET=1 is set, so ``backend="auto"`` never picks a slow
interpreted pass for CPU training but tests can check the kernels without a GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

from . import BackendUnavailable
from .base import AdamodKernelConfig, DeviceScalars, MadaKernelConfig, Segments
from ..flat_state import Bucket

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_PKG = "mada_fused.triton_kernels"


def _import_kernels():
    try:
        return importlib.import_module(_PKG)
    except ModuleNotFoundError as e:
        if e.name != _PKG:
            raise
    # A source checkout run without installing: the folder sits beside the
    # package. Loaded under its installed name, so it is the same module either way.
    init = os.path.join(os.path.dirname(__file__), "..", "..", "triton_kernels", "__init__.py")
    if not os.path.exists(init):
        raise ModuleNotFoundError(f"{_PKG} is not installed", name=_PKG)
    spec = importlib.util.spec_from_file_location(_PKG, init, submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_PKG] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[_PKG]
        raise
    return mod


class TritonBackend:
    name = "triton"

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
