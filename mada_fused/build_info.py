"""What this installation was built with, and what it can run here.

Only reads and reports: the decisions (which backend runs where, which GPUs
the CUDA build has code for) belong to :mod:`mada_fused.backends`, and are
asked from there. Everything is looked up lazily (importing mada_fused never
initialises CUDA).
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Any

import torch

from . import backends
from .backends.cuda import archs_run_on, cuda_archs, driver_problem


def _import(name: str):
    """(module, None) or (None, why it did not import)."""
    try:
        return importlib.import_module(f"mada_fused.{name}"), None
    except ImportError as e:
        return None, str(e)


def _triton_ok() -> bool:
    """Triton is installed and the packaged kernels (mada_fused.triton_kernels) import."""
    return importlib.util.find_spec("triton") is not None and _import("triton_kernels")[0] is not None


def _auto_choice(device: torch.device) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return backends.resolve("auto", device, torch.float32).name
    except Exception as e:  # report, never crash an info call
        return f"error: {e}"


def build_info() -> dict[str, Any]:
    """A dict describing the build and this machine.

    Keys: ``version``, ``torch``, ``cpu_ext``, ``cuda_ext`` (bools),
    ``cuda_archs`` (list), ``cuda_runtime`` / ``cuda_driver`` (the CUDA version the
    extension was built with / the NVIDIA driver supports, e.g. 13000; 0: none),
    ``cuda_driver_problem`` (str or None), ``triton`` (bool), ``backends_available`` (list),
    ``unavailable`` (backend -> reason), ``cpu`` (ISA in use, threads, build
    flags), ``cuda_build`` (what the build did about CUDA), ``gpus`` (per GPU:
    name, capability, whether the CUDA extension has code for it) and
    ``auto`` (device -> the backend ``backend="auto"`` picks for float32).
    """
    from . import __version__

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
    # Asking the driver's version makes no CUDA context (build_info stays cheap on any machine).
    runtime, driver = (cuda.runtime_version(), cuda.driver_version()) if cuda is not None else (0, 0)
    info.update(cuda_runtime=runtime, cuda_driver=driver, cuda_driver_problem=driver_problem(driver, runtime))
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
