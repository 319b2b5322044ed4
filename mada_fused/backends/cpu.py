"""The fused CPU backend: one multi-threaded pass per bucket, in C++.

The per-element math is csrc/mada_math.h, the same header the CUDA kernels
compile, so CPU CI exercises the GPU's arithmetic. The extension
``mada_fused._C_cpu`` takes the packed call of csrc/abi.h (addresses, counts
and codes; it does not link libtorch), built by :mod:`.native`, which this
backend shares with ``cuda``. What is the CPU's own: the device, and the thread
count (torch's, read at every step).

Results are bitwise deterministic for any thread count (fixed 64K-element
chunks, hyper-gradient partial sums reduced in chunk order) and independent
of the instruction set the CPU has (the kernels are compiled without FMA
contraction).
"""
from __future__ import annotations

import torch

from ..flat_state import STATE_8BIT
from . import BackendUnavailable
from .native import DTYPE_CODES, NativeBackend


class CpuBackend(NativeBackend):
    name = "cpu"
    # 8-bit state and tangent rows (docs/spec.md 5.4, 5.5): kernels.cpp's q8_blocks.
    state_dtypes = NativeBackend.state_dtypes | {STATE_8BIT}
    tangent_dtypes = NativeBackend.tangent_dtypes | {STATE_8BIT}

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return torch.device(device).type == "cpu" and dtype in DTYPE_CODES

    def _per_step(self, device: torch.device) -> tuple[int, int]:
        return 0, torch.get_num_threads()


def load() -> CpuBackend:
    try:
        from .. import _C_cpu
    except ImportError as e:
        raise BackendUnavailable(
            f"the C++ CPU extension is not built ({e}); run `pip install -e .` in the mada-fused "
            "checkout (needs a C++17 compiler with OpenMP) or use backend='reference'"
        ) from None
    return CpuBackend(_C_cpu)
