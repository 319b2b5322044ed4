"""Optimizer configurations and gradients shared by the GPU backends' tests
(test_cuda_backend.py, test_triton_backend.py): each backend is checked
against the reference on the same cases."""
from __future__ import annotations

import torch

import mada_fused

ALL = ("beta1", "beta2", "beta3", "rho", "c", "gamma")
FULL = dict(lr=1e-2, beta3=0.5, rho=0.6, c=0.7, gamma=0.8, learn=ALL, hyper_warmup=0)
CASES = {
    "adam_corner": (mada_fused.MADA, dict(lr=1e-2, learn=())),
    "lion": (mada_fused.MADA, dict(lr=1e-3, gamma=0.0, learn=())),
    "fixed_interior": (mada_fused.MADA, dict(FULL, learn=())),
    "full_mod": (mada_fused.MADA, dict(FULL, mod_beta=0.9)),
    "full_exact_detach_max": (mada_fused.MADA, dict(FULL, vbar="detach", hyper_order="exact", maximize=True)),
    "subset_rows": (mada_fused.MADA, dict(lr=1e-2, gamma=0.7, learn=("beta2", "gamma"), hyper_warmup=0)),
    "avgrad": (mada_fused.AVGrad, dict(lr=1e-2)),
    "adamod": (mada_fused.AdaMod, dict(lr=1e-2, beta3=0.9)),
    "diffmod": (mada_fused.DiffMod, dict(lr=1e-2, len_memory=10)),
}


def random_grads(shapes, steps, dtype, device, scale=1.0):
    """Log-normal magnitudes, so sign switches and the AdaMod clip go both ways."""
    return [[(scale * torch.exp(0.7 * torch.randn(s)) * torch.randn(s)).to(dtype).to(device) for s in shapes]
            for _ in range(steps)]
