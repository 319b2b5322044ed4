"""Argument checks shared by the optimizer classes.

Every check runs before anything is mutated, so a rejected call leaves the
optimizer exactly as it was.
"""
from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Param-group keys besides the per-group options: torch.optim's own and those
# torch's LR schedulers write (OneCycleLR, CyclicLR).
GROUP_KEYS = frozenset({"params", "param_names", "initial_lr", "max_lr", "min_lr", "max_momentum",
                        "base_momentum"})


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


def learning_rate(name: str, value: Any, read_tensor: bool) -> None:
    """A learning rate: a Python number or, as torch.optim allows, a 1-element
    float tensor (0-dim or not, any float dtype). A tensor's value is only read
    with ``read_tensor`` (construction, loading a checkpoint): step() never
    waits for the device to check it."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.is_meta:
            raise ValueError(f"{name} must be a 1-element float tensor with data (not on the meta device), "
                             f"got a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}")
        if read_tensor:
            non_negative(name, float(value.detach().reshape(()).cpu()))
    else:
        non_negative(name, value)


def host_pair(name: str, value: Any) -> Any:
    """A constructor's ``betas`` with 1-element tensors read once as Python
    floats, as torch.optim does; anything else is left for :func:`beta_pair`."""
    if not isinstance(value, (tuple, list)):
        return value
    out = []
    for i, x in enumerate(value):
        if isinstance(x, torch.Tensor):
            if x.numel() != 1:
                raise ValueError(f"{name}[{i}] as a tensor must have 1 element, got shape {tuple(x.shape)}")
            x = x.item()
        out.append(x)
    return tuple(out)


def group_lr(group: dict, index: int, read_tensor: bool = False) -> None:
    """lr and weight_decay may be changed between steps by schedulers or users."""
    learning_rate(f"param_groups[{index}]['lr']", group["lr"], read_tensor)
    non_negative(f"param_groups[{index}]['weight_decay']", group["weight_decay"])


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def adamw_switches(request: str, *, fused: Any, foreach: Any, capturable: Any, differentiable: Any,
                   amsgrad: Any) -> tuple[str, bool]:
    """torch.optim.AdamW's implementation switches, with their meaning here.

    ``request`` is the ``backend`` argument. Returns the backend request to use
    (for backends.check_name) and whether only a fused backend may step.

    - ``fused=True``: a fused kernel (cpu, cuda, triton, cuda_on_cpu) must step
      every parameter, else a ValueError; ``fused=False``: the unfused
      implementation, the reference backend; None: ``backend`` decides.
    - ``foreach``: accepted and ignored; every backend steps a whole bucket of
      tensors per call, which is what foreach asks for.
    - ``capturable``: accepted either way; a step is always CUDA-graph
      capturable here (with a tensor lr on the device, docs/robustness.md).
    - ``differentiable=True`` and ``amsgrad=True``: refused, naming what to use.
    """
    for name, value in (("fused", fused), ("foreach", foreach)):
        if value is not None:
            flag(name, value)
    flag("capturable", capturable)
    if flag("differentiable", differentiable):
        raise ValueError("differentiable=True is not supported: the fused step runs outside autograd, so no "
                         "gradient flows through step(); use torch.optim.AdamW(differentiable=True) for that")
    if flag("amsgrad", amsgrad):
        raise ValueError("amsgrad=True is not supported: use mada_fused.AVGrad, which keeps a running mean of v "
                         "where AMSGrad keeps its maximum (MADA with rho=0)")
    if fused is False:
        if request not in ("auto", "reference"):
            raise ValueError(f"fused=False asks for the unfused implementation, but backend={request!r} is fused; "
                             "drop one of the two")
        return "reference", False
    if fused and request == "reference":
        raise ValueError("fused=True asks for a fused kernel, but backend='reference' is the unfused one; "
                         "use backend='auto', 'cpu', 'cuda' or 'triton'")
    return request, bool(fused)


def param_group(group: dict, index: int) -> None:
    """A new parameter group (torch.optim has checked the rest)."""
    params = group["params"]
    if len({id(p) for p in params}) != len(params):
        raise ValueError(f"param_groups[{index}] holds the same tensor twice")
    for p in params:
        if p.is_complex():
            raise TypeError("complex parameters are not supported")
        if overlaps(p):
            raise ValueError(f"a parameter of param_groups[{index}] has elements that share memory "
                             f"(shape {tuple(p.shape)}, strides {p.stride()}, e.g. from expand()): "
                             "give the optimizer a tensor that owns its elements")
    group_lr(group, index)


def overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (expand(), as_strided()):
    stepping such a tensor element by element would write one place twice.

    Sufficient for "no": walked from the smallest stride up, each dimension's
    stride clears everything the smaller ones span. Only rare, hand-made
    layouts that interleave without overlapping are refused with the rest.
    """
    if t.is_contiguous():
        return False
    span = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def amp_scalars(grad_scale: Any, found_inf: Any) -> None:
    """What GradScaler hands over (``optimizer.grad_scale``/``found_inf``): each
    None or a 1-element float32 tensor, as every backend reads them."""
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and not (isinstance(t, torch.Tensor) and t.numel() == 1 and t.dtype == torch.float32):
            got = f"{t.dtype} tensor of {t.numel()} elements" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"optimizer.{name} must be a 1-element float32 tensor (as GradScaler sets it), got {got}")


def fits(p: torch.Tensor, g: torch.Tensor, built_for: tuple[torch.dtype, torch.device, torch.Size]) -> bool:
    """Whether ``p`` and its grad ``g`` still have the dtype, device and shape
    ``p``'s state was built for (and ``g`` is dense). The per-step fast path:
    :func:`grad_of` and the optimizer find out what is wrong when it is not."""
    dtype, device, shape = built_for
    return (p.dtype is dtype and g.dtype is dtype and g.layout is torch.strided
            and p.shape == shape and g.shape == shape and p.device == device and g.device == device)


_SUPPORTED = frozenset(SUPPORTED_PARAM_DTYPES)


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """Reject gradients no backend can use, with the reason (for parameters
    without state, or that no longer :func:`fits` theirs)."""
    g = p.grad
    # The usual case in one expression, the reasons below.
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


def same_shape(p: torch.Tensor, shape: torch.Size) -> None:
    """A parameter whose dtype or device changed takes its state along; one
    whose shape changed cannot: nothing says which old element is which."""
    if p.shape != shape:
        raise ValueError(
            f"a parameter's shape changed from {tuple(shape)} to {tuple(p.shape)} after the optimizer "
            "made its state for it; build a new optimizer for the new shape"
        )


def capturable(groups: list[dict], new: list[torch.Tensor]) -> None:
    """What a step under CUDA graph capture must not do: a replay repeats
    kernels, never host work or a host-to-device copy."""
    if new:
        raise RuntimeError(
            "step() under CUDA graph capture would allocate (or move) optimizer state: "
            "take at least one step with every parameter before capturing"
        )
    for i, group in enumerate(groups):
        value = group["lr"]
        if not isinstance(value, torch.Tensor) or value.device.type == "cpu":
            raise RuntimeError(
                f"under CUDA graph capture param_groups[{i}]['lr'] must be a tensor on the "
                "parameters' device: a Python float is baked into the graph (a scheduler's "
                "change would be ignored on replay) and a host tensor needs a copy"
            )


def state_dtype(value: Any) -> torch.dtype:
    """The ``state_dtype`` argument: fp32 (default), bf16 or 8-bit ("8bit", held as
    torch.uint8, flat_state.STATE_8BIT) storage of the optimizer state."""
    if isinstance(value, str) and value == "8bit":
        return torch.uint8
    if value not in (torch.float32, torch.bfloat16):
        raise ValueError(f"state_dtype must be torch.float32, torch.bfloat16 or '8bit', got {value!r}")
    return value


def tangent_dtype(value: Any, state: torch.dtype) -> torch.dtype:
    """MADA's ``tangent_dtype`` argument: fp32 (default), bf16 or 8-bit ("8bit", held as
    torch.uint8) storage of the tangent rows, given the checked ``state_dtype``."""
    if isinstance(value, str) and value == "8bit":
        if state != torch.uint8:
            # docs/spec.md 5.5: the rows are coded in the 8-bit state's blocks.
            raise ValueError("tangent_dtype='8bit' needs state_dtype='8bit': 8-bit tangent rows share "
                             "8-bit state's blockwise layout, and bf16 or fp32 state with 8-bit rows "
                             "would save less than 8-bit state with bf16 rows (docs/spec.md 5.5)")
        return torch.uint8
    if value not in (torch.float32, torch.bfloat16):
        raise ValueError(f"tangent_dtype must be torch.float32, torch.bfloat16 or '8bit', got {value!r}")
    return value


def sr_seed(value: Any) -> int:
    """The seed of bf16 state's stochastic rounding: a uint32."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ValueError(f"sr_seed must be an int in [0, 2**32), got {value!r}")
    return value


def param_round(kahan_sum: Any, bf16_stochastic_round: Any) -> str:
    """How bf16 parameters store their new values (docs/spec.md 5.2), from the two flags."""
    kahan = flag("kahan_sum", kahan_sum)
    sr = flag("bf16_stochastic_round", bf16_stochastic_round)
    if kahan and sr:
        raise ValueError("kahan_sum=True and bf16_stochastic_round=True are two ways to keep bf16 "
                         "parameters moving without fp32 master weights: choose one")
    return "kahan" if kahan else "stochastic" if sr else "nearest"
