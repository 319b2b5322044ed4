"""The fused CUDA backend: one kernel launch steps a whole (device, dtype) bucket.

The extension ``mada_fused._C_cuda`` (csrc/cuda/) takes the packed call of
csrc/abi.h, built by :mod:`.native` (shared with ``cpu``): it does not link
libtorch, and it links the CUDA runtime statically. What is CUDA's own here:
which GPUs the build has code for, torch's current stream (so a step is
ordered like any torch op and can be captured in a CUDA graph: nothing here
reads a device value, copies to the device or syncs), and the allocator of the
reduction scratch.

Per call: the step kernel (one launch per 600 segments), plus, when a
hyper-gradient is taken, one tiny kernel that sums the per-block partial sums
in a fixed order into ``dot_out`` (bitwise reproducible, no float atomics).
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import re
import warnings
from typing import Callable, Iterable

import torch

from . import BackendUnavailable
from .native import DTYPE_CODES, NativeBackend

# sm_XY[a|f] (SASS) or compute_XY[a|f] (PTX), as the build records them.
_ARCH = re.compile(r"(sm|compute)_(\d+)([af]?)")


@functools.lru_cache(maxsize=None)
def cuda_archs() -> tuple[str, ...]:
    """GPU targets in the CUDA extension, e.g. ('sm_80', ..., 'compute_90'); () if not built.

    Read from the binary itself (the build compiles a ``mada_fused_cuda_archs()``
    C function into it), so it always describes what is installed.
    """
    try:
        ext = importlib.import_module("mada_fused._C_cuda")
        fn = ctypes.CDLL(ext.__file__).mada_fused_cuda_archs
    except (ImportError, OSError, AttributeError):
        return ()
    fn.restype = ctypes.c_char_p
    return tuple(a for a in fn().decode().split(";") if a)


def archs_run_on(archs: Iterable[str], capability: tuple[int, int]) -> bool:
    """Whether a fatbinary with these targets has code for a GPU of this capability.

    SASS sm_XY runs on the same major version with minor >= Y ('a' targets only
    on exactly XY); PTX compute_XY is JIT-compiled by the driver for any GPU of
    capability >= XY ('a' PTX only on XY).
    """
    major, minor = capability
    cc = major * 10 + minor
    for arch in archs:
        m = _ARCH.fullmatch(arch)
        if not m:
            continue
        num, suffix = int(m.group(2)), m.group(3)
        if suffix == "a":
            ok = num == cc
        elif m.group(1) == "sm":
            ok = num // 10 == major and num % 10 <= minor
        else:
            ok = num <= cc
        if ok:
            return True
    return False


# Oldest Linux driver branch of each CUDA major version (NVIDIA's CUDA toolkit release notes):
# the extension links the CUDA runtime statically, so the driver must be this new.
DRIVER_BRANCH = {11: 450, 12: 525, 13: 580}


def cuda_version(v: int) -> str:
    """12080 (CUDART_VERSION, cudaDriverGetVersion) -> "12.8"."""
    return f"{v // 1000}.{v % 1000 // 10}"


def driver_problem(driver: int, runtime: int) -> str | None:
    """Why the NVIDIA driver may not run a CUDA extension built with this CUDA runtime; None if it can.

    ``driver``: cudaDriverGetVersion (the CUDA version the driver supports, e.g. 12080; 0: no
    driver, so nothing to warn about); ``runtime``: CUDART_VERSION of the build (0: no CUDA
    runtime, as in the CPU build of the kernels).
    """
    if driver <= 0 or runtime <= 0 or driver >= runtime:
        return None
    built = f"CUDA {cuda_version(runtime)}"
    if driver // 1000 < runtime // 1000:  # no compatibility across major versions
        branch = DRIVER_BRANCH.get(runtime // 1000)
        need = f"an NVIDIA driver of the {branch} series or newer" if branch else f"a driver for {built}"
        return (f"the NVIDIA driver supports CUDA {cuda_version(driver)}, but the CUDA extension was built with "
                f"{built} (static runtime) and needs {need}: backend 'cuda' cannot run. Update the driver, or "
                f"rebuild mada-fused with a CUDA {driver // 1000} toolkit")
    # Same major version: CUDA's minor-version compatibility runs the SASS, not newer PTX.
    return (f"the NVIDIA driver supports CUDA {cuda_version(driver)}, older than the {built} the CUDA extension "
            f"was built with: its SASS runs (minor-version compatibility), its PTX (GPUs newer than the "
            f"sm_ targets) needs a driver for {built}")


class CudaBackend(NativeBackend):
    name = "cuda"

    def __init__(self, ext) -> None:
        super().__init__(ext)
        self._ok: dict[int, bool] = {}  # device index -> this build runs there
        self._warned: set[tuple[int, int]] = set()  # GPU kinds already warned about

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        device = torch.device(device)
        if device.type != "cuda" or dtype not in DTYPE_CODES:
            return False
        index = self._device_index(device)
        ok = self._ok.get(index)
        if ok is None:  # asked once per device (warm-up), never inside a graph capture
            ok = self._ok[index] = self._runs_on(index)
        return ok

    def _runs_on(self, index: int) -> bool:
        """The build has code for this GPU (arch list) and our CUDA runtime can drive it."""
        cap = torch.cuda.get_device_capability(index)
        if not archs_run_on(cuda_archs(), cap):
            if cap not in self._warned:
                self._warned.add(cap)
                warnings.warn(
                    f"mada_fused: the CUDA extension was built for {', '.join(cuda_archs())} and has no code "
                    f"for this GPU (sm_{cap[0]}{cap[1]}); backend='auto' uses Triton or the reference instead. "
                    f"Rebuild with MADA_CUDA_ARCHS='{cap[0]}{cap[1]}' to get the fused CUDA kernels.",
                    RuntimeWarning, stacklevel=4,
                )
            return False
        ok, why = self._ext.device_ok(index)  # e.g. a driver older than the static runtime
        if not ok:
            warnings.warn(f"mada_fused: the CUDA extension cannot run on cuda:{index} ({why}); "
                          "backend='auto' uses another backend", RuntimeWarning, stacklevel=4)
        return bool(ok)

    def _device_index(self, device: torch.device) -> int:
        return device.index if device.index is not None else torch.cuda.current_device()

    def _per_step(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.current_stream(device).cuda_stream, 0  # we run in torch's order

    def _alloc(self, device: torch.device) -> Callable[[int], torch.Tensor]:
        # Per-block partial sums; allocated on the current stream, so reuse is
        # ordered after our kernels, also inside a captured graph.
        return lambda n: torch.empty(n, dtype=torch.float64, device=device)


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
