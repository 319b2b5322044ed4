"""What this installation was built with, and what it can run here.

Everything is looked up lazily (importing mada_fused never initialises CUDA).
The CUDA arch list is read from the CUDA extension itself (setup.py compiles a
``mada_fused_cuda_archs()`` C function into it), so it always describes the
binary that is actually installed.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import re
import warnings
from typing import Any

import torch

# sm_XY[a|f] (SASS) or compute_XY[a|f] (PTX), as setup.py records them.
_ARCH = re.compile(r"(sm|compute)_(\d+)([af]?)")


def _import(name: str):
    """(module, None) or (None, why it did not import)."""
    try:
        return importlib.import_module(f"mada_fused.{name}"), None
    except ImportError as e:
        return None, str(e)


@functools.lru_cache(maxsize=None)
def cuda_archs() -> tuple[str, ...]:
    """GPU targets in the CUDA extension, e.g. ('sm_80', ..., 'compute_90'); () if not built."""
    ext, _ = _import("_C_cuda")
    if ext is None:
        return ()
    try:
        fn = ctypes.CDLL(ext.__file__).mada_fused_cuda_archs
    except (OSError, AttributeError):
        return ()
    fn.restype = ctypes.c_char_p
    return tuple(a for a in fn().decode().split(";") if a)


def archs_run_on(archs, capability: tuple[int, int]) -> bool:
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


def cuda_ext_supports(device: torch.device | int | str | None = None) -> bool:
    """Whether the installed CUDA extension has code for this GPU (by arch list)."""
    if not torch.cuda.is_available() or not cuda_archs():
        return False
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if isinstance(device, torch.device) and device.type != "cuda":
        return False
    return archs_run_on(cuda_archs(), torch.cuda.get_device_capability(device))


_warned: set[tuple[int, int]] = set()


def warn_no_cuda_code(device: torch.device | int | str | None = None) -> None:
    """One warning per GPU kind that the CUDA extension has no code for."""
    cap = torch.cuda.get_device_capability(device)
    if cap in _warned:
        return
    _warned.add(cap)
    warnings.warn(
        f"mada_fused: the CUDA extension was built for {', '.join(cuda_archs())} and has no code "
        f"for this GPU (sm_{cap[0]}{cap[1]}); backend='auto' uses Triton or the reference instead. "
        f"Rebuild with MADA_CUDA_ARCHS='{cap[0]}{cap[1]}' to get the fused CUDA kernels.",
        RuntimeWarning,
        stacklevel=3,
    )


def _triton_ok() -> bool:
    """Triton is installed and the packaged kernels (mada_fused.triton_kernels) import."""
    return importlib.util.find_spec("triton") is not None and _import("triton_kernels")[0] is not None


def _auto_choice(device: torch.device) -> str:
    from . import backends

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return backends.resolve("auto", device, torch.float32).name
    except Exception as e:  # report, never crash an info call
        return f"error: {e}"


def build_info() -> dict[str, Any]:
    """A dict describing the build and this machine.

    Keys: ``version``, ``torch``, ``cpu_ext``, ``cuda_ext`` (bools),
    ``cuda_archs`` (list), ``triton`` (bool), ``backends_available`` (list),
    ``unavailable`` (backend -> reason), ``cpu`` (ISA in use, threads, build
    flags), ``cuda_build`` (what setup.py did about CUDA), ``gpus`` (per GPU:
    name, capability, whether the CUDA extension has code for it) and
    ``auto`` (device -> the backend ``backend="auto"`` picks for float32).
    """
    from . import __version__, backends

    cpu, cpu_err = _import("_C_cpu")
    cuda, cuda_err = _import("_C_cuda")
    cfg = cpu.build_config() if cpu is not None else {}
    archs = list(cuda_archs())
    info: dict[str, Any] = {
        "version": __version__,
        "torch": torch.__version__,
        "cpu_ext": cpu is not None,
        "cuda_ext": cuda is not None,
        "cuda_archs": archs,
        "triton": _triton_ok(),
        "backends_available": backends.available(),
        "unavailable": backends.unavailable_reasons(),
    }
    if cpu is None:
        info["cpu_ext_error"] = cpu_err
    else:
        info["cpu"] = {"isa": cpu.isa(), "threads": torch.get_num_threads(), **cfg}
    info["cuda_build"] = cfg.get("cuda_status", "unknown: the CPU extension is not built")
    if cuda is None:
        info["cuda_ext_error"] = cuda_err
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            gpus.append({
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "capability": f"{cap[0]}.{cap[1]}",
                "cuda_ext_has_code": archs_run_on(archs, cap),
            })
    info["gpus"] = gpus
    devices = [torch.device("cpu")] + [torch.device("cuda", g["index"]) for g in gpus]
    info["auto"] = {str(d): _auto_choice(d) for d in devices}
    return info
