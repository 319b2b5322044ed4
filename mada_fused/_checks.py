"""Argument checks shared by the optimizer classes.

Every check runs before anything is mutated, so a rejected call leaves the
optimizer exactly as it was.
"""
from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def real_number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number here, got a Tensor")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def non_negative(name: str, value: Any) -> float:
    value = real_number(name, value)
    if value < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def in_range(name: str, value: Any, lo: float, hi: float, hi_open: bool = False) -> float:
    value = real_number(name, value)
    if value < lo or value > hi or (hi_open and value == hi):
        bracket = ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in [{lo}, {hi}{bracket}, got {value}")
    return value


def beta(name: str, value: Any) -> float:
    return in_range(name, value, 0.0, 1.0, hi_open=True)


def beta_pair(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair of floats, got {value!r}")
    return beta(f"{name}[0]", value[0]), beta(f"{name}[1]", value[1])


def group_lr(group: dict, index: int) -> None:
    """lr and weight_decay may be changed between steps by schedulers or users."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"param_groups[{index}]['lr'] must be a 1-element float tensor")
    else:
        non_negative(f"param_groups[{index}]['lr']", lr)
    non_negative(f"param_groups[{index}]['weight_decay']", group["weight_decay"])


_SUPPORTED = frozenset(SUPPORTED_PARAM_DTYPES)


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """Reject gradients no backend can use, with the reason."""
    g = p.grad
    # Runs per parameter per step: the usual case in one expression, the reasons below.
    if (p.dtype in _SUPPORTED and g.dtype is p.dtype and g.layout is torch.strided
            and g.shape == p.shape and g.device == p.device):
        return g
    if p.is_complex() or g.is_complex():
        raise TypeError("complex parameters and gradients are not supported")
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError("sparse gradients are not supported; use a dense optimizer input")
    if p.dtype not in SUPPORTED_PARAM_DTYPES:
        raise TypeError(f"parameters of dtype {p.dtype} are not supported")
    if g.dtype != p.dtype:
        raise TypeError(f"grad dtype {g.dtype} does not match parameter dtype {p.dtype}")
    if g.device != p.device:
        raise ValueError(f"grad on {g.device} but parameter on {p.device}")
    if g.shape != p.shape:
        raise ValueError(f"grad shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")
    return g
