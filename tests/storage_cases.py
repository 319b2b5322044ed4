"""What the low-precision storage tests share (bf16 state, bf16 tangents, bf16 parameters,
8-bit state): which backends this build has, MADA's every-term configuration, the spec's
stochastic-rounding hash in plain Python integers, and a seeded trajectory runner."""
from __future__ import annotations

import struct

import pytest
import torch

import spec_model as spec
from mada_fused.backends import BackendUnavailable, load

U32 = 0xFFFFFFFF

# Every term of MADA at once, all six coefficients learned from step 2 on.
FULL = dict(betas=(0.9, 0.999), beta3=0.5, rho=0.5, c=0.7, gamma=0.6, mod_beta=0.9, hyper_warmup=0)


def loads(name: str) -> bool:
    try:
        load(name)
    except BackendUnavailable:
        return False
    return True


needs_cpu = pytest.mark.skipif(not loads("cpu"), reason="the C++ CPU extension is not built")
needs_triton = pytest.mark.skipif(not loads("triton"), reason="Triton is not installed")
needs_cuda_on_cpu = pytest.mark.skipif(not loads("cuda_on_cpu"),
                                       reason="_C_cuda_on_cpu not built (MADA_BUILD_CUDA_ON_CPU=1)")


# -- docs/spec.md section 5.1's hash and rounding, written from its text -------------------------
def mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & U32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & U32
    return h ^ (h >> 16)


def sr_bits(seed: int, step: int, buffer: int, index: int) -> int:
    key = mix32(mix32(mix32(seed) ^ step) ^ buffer)
    return mix32(((key + (index >> 32)) & U32) ^ (index & U32))


def sr_bf16_bytes(x: float, r: int) -> bytes:
    """The fp32 bytes of sr_bf16(x, r): its high half is the stored bf16."""
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    u = (u | 0x00400000) & 0xFFFF0000 if x != x else (u + (r & 0xFFFF)) & 0xFFFF0000
    return struct.pack("<I", u)


# -- trajectories ----------------------------------------------------------------------------------
def run_threaded(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads, dtype: torch.dtype,
                 threads: int | None = None) -> None:
    """spec.run_steps with the grads cast to ``dtype``, on ``threads`` torch threads if given."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        spec.run_steps(opt, params, [[g.to(dtype) for g in gs] for gs in grads])
    finally:
        torch.set_num_threads(old)


def stored(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """A copy of every parameter's state, keyed (parameter index, name)."""
    return {(i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state[p].items()}


def bit_pattern(t: torch.Tensor) -> torch.Tensor:
    """bf16 values as their bit patterns, so comparisons are bitwise; other tensors as they are."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t
