"""The CUDA backend's kernels on the CPU, for tests: ``backend="cuda_on_cpu"``.

``mada_fused._C_cuda_on_cpu`` is csrc/cuda/ (the planner, the launcher, every
step kernel and the slot reduction) compiled by the host C++ compiler through
csrc/cuda/cuda_on_cpu.h: each block's 128 threads run as real host threads
with real barriers, block after block, so the CUDA code paths run where no GPU
is. Host memory stands in for device memory (CPU tensors), launches are
synchronous on "stream 0", and the call is the one :class:`.cuda.CudaBackend`
makes. It is slow (a thread switch per barrier) and never picked by
``backend="auto"``; built only with ``MADA_BUILD_CUDA_ON_CPU=1``.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import BackendUnavailable
from .native import DTYPE_CODES, NativeBackend


class CudaOnCpuBackend(NativeBackend):
    name = "cuda_on_cpu"

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return torch.device(device).type == "cpu" and dtype in DTYPE_CODES

    def _per_step(self, device: torch.device) -> tuple[int, int]:
        return 0, 0  # stream 0; the thread count is the CPU backend's, unused here

    def _alloc(self, device: torch.device) -> Callable[[int], torch.Tensor]:
        return lambda n: torch.empty(n, dtype=torch.float64)


def load() -> CudaOnCpuBackend:
    try:
        from .. import _C_cuda_on_cpu
    except ImportError as e:
        raise BackendUnavailable(
            f"the CUDA-on-CPU test build is not there ({e}); build with MADA_BUILD_CUDA_ON_CPU=1"
        ) from None
    return CudaOnCpuBackend(_C_cuda_on_cpu)
