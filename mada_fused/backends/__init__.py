"""Backend registry: which compute backends exist and which one a bucket uses.

Each backend lives in its own module with a ``load() -> Backend`` function
that raises :class:`BackendUnavailable` with a reason a user can act on.
Loading is lazy, so a missing optional dependency (Triton, a CUDA build)
only matters to someone who asks for it.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from ..flat_state import STATE_8BIT, state_dtype_name
from .base import Backend

NAMES: tuple[str, ...] = ("reference", "cpu", "cuda", "triton", "cuda_on_cpu")
# "auto" tries these in order and takes the first that loads and supports the bucket
# (never cuda_on_cpu: the CUDA kernels run on host threads, a test vehicle).
_AUTO_ORDER: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "MADA_FUSED_BACKEND"


class BackendUnavailable(ValueError):
    """A backend that exists in the code base but cannot run here."""


_loaded: dict[str, Backend] = {}
_failed: dict[str, str] = {}


def load(name: str) -> Backend:
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + NAMES}")
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        raise BackendUnavailable(_failed[name])
    try:
        backend = importlib.import_module(f"{__name__}.{name}").load()
    except BackendUnavailable as e:
        _failed[name] = str(e)
        raise
    except ImportError as e:
        _failed[name] = f"the {name} backend failed to import ({e}); reinstall mada-fused"
        raise BackendUnavailable(_failed[name]) from e
    _loaded[name] = backend
    return backend


def available() -> list[str]:
    """Names of the backends that load on this machine (for any device)."""
    out = []
    for name in NAMES:
        try:
            load(name)
        except BackendUnavailable:
            continue
        out.append(name)
    return out


def unavailable_reasons() -> dict[str, str]:
    available()
    return dict(_failed)


def check_name(name: str) -> str:
    """Validate a user's ``backend=`` argument; returns the effective request."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
        if name != "auto" and name not in NAMES:
            raise ValueError(f"{ENV_VAR}={name!r} is not a backend; choose one of {NAMES}")
    elif name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + NAMES}")
    if name != "auto":
        load(name)  # fail at construction, with the reason, not at the first step
    return name


def check_state_dtype(request: str, state_dtype: torch.dtype, tangent_dtype: torch.dtype = torch.float32) -> None:
    """Refuse, at construction, a named backend that cannot store ``state_dtype`` state
    or ``tangent_dtype`` tangent rows."""
    if request == "auto":
        return
    for what, dtype, attr in (("optimizer state", state_dtype, "state_dtypes"),
                              ("tangent rows", tangent_dtype, "tangent_dtypes")):
        if dtype not in getattr(load(request), attr):
            able = [n for n in available() if dtype in getattr(load(n), attr)]
            raise ValueError(f"backend {request!r} cannot store {state_dtype_name(dtype)} {what} yet; "
                             f"backends that can: {able} (or backend='auto')")


_ROUND_OPTION = {"stochastic": "bf16_stochastic_round=True", "kahan": "kahan_sum=True"}


def check_param_round(request: str, param_round: str) -> None:
    """Refuse, at construction, a named backend that cannot store bf16 parameters as
    ``param_round`` asks (flat_state.PARAM_ROUNDS)."""
    if request != "auto" and param_round not in load(request).param_rounds:
        able = [n for n in available() if param_round in load(n).param_rounds]
        raise ValueError(f"backend {request!r} does not implement {_ROUND_OPTION[param_round]} yet; "
                         f"backends that do: {able} (or backend='auto')")


def resolve(request: str, device: torch.device, dtype: torch.dtype,
            state_dtype: torch.dtype = torch.float32, param_round: str = "nearest",
            tangent_dtype: torch.dtype = torch.float32) -> Backend:
    """The backend that steps a (device, dtype) bucket whose state is stored as
    ``state_dtype``, whose parameters as ``param_round`` and whose tangent rows as
    ``tangent_dtype``, for a checked request."""
    if request != "auto":
        backend = load(request)
        if not backend.supports(device, dtype):
            raise ValueError(
                f"backend {request!r} cannot step {dtype} parameters on {device}; "
                f"use backend='auto' or one of {available()}"
            )
        check_state_dtype(request, state_dtype, tangent_dtype)
        check_param_round(request, param_round)
        return backend
    for name in _AUTO_ORDER:
        try:
            backend = load(name)
        except BackendUnavailable:
            continue
        # Triton on a CPU tensor is its interpreter, a debugging aid many times
        # slower than the reference: only an explicit backend='triton' gets it.
        if (backend.supports(device, dtype) and state_dtype in backend.state_dtypes
                and param_round in backend.param_rounds and tangent_dtype in backend.tangent_dtypes
                and (name != "triton" or device.type == "cuda")):
            low = state_dtype in (torch.bfloat16, STATE_8BIT) or tangent_dtype in (torch.bfloat16, STATE_8BIT)
            if name == "reference" and device.type != "cpu" and low:
                warnings.warn(f"no fused backend stores {state_dtype_name(state_dtype)} state with "
                              f"{state_dtype_name(tangent_dtype)} "
                              f"tangents on {device.type} yet: "
                              "these parameters step on the (slow) reference backend", stacklevel=4)
            elif name == "reference" and device.type != "cpu" and param_round != "nearest":
                warnings.warn(f"no fused backend implements {_ROUND_OPTION[param_round]} on {device.type} "
                              "here (Triton is not installed): these parameters step on the (slow) reference "
                              "backend", stacklevel=4)
            return backend
    raise AssertionError("the reference backend supports every device")  # pragma: no cover
