"""Parameter layouts for the step benchmark: one flat bucket, or a GPT-2-shaped list.

The GPT-2 layout keeps GPT-2-small's proportions (12 layers, vocab/d ~ 65.4,
context = 4/3 d) and picks the width so the total matches the requested size:
at 124M it is GPT-2 small itself, at 1M a toy with the same ~148 tensors of very
different sizes (what a real model hands a fused optimizer).
"""
from __future__ import annotations

import math

import torch

Shapes = list[tuple[int, ...]]
GPT2_LAYERS = 12


def flat_shapes(numel: int) -> Shapes:
    return [(numel,)]


def gpt2_shapes_from(d: int, n_layer: int, vocab: int, ctx: int) -> Shapes:
    shapes: Shapes = [(vocab, d), (ctx, d)]  # token and position embeddings
    for _ in range(n_layer):
        shapes += [(d,), (d,)]  # ln_1
        shapes += [(d, 3 * d), (3 * d,)]  # attn.c_attn (qkv)
        shapes += [(d, d), (d,)]  # attn.c_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,)]  # mlp.c_fc
        shapes += [(4 * d, d), (d,)]  # mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def gpt2_shapes(numel: int) -> Shapes:
    """GPT-2-small-shaped tensors totalling ~numel (exact up to one embedding row)."""
    # total ~ d^2 * (12 L + vocab/d + ctx/d) with GPT-2 small's ratios
    per_d2 = 12 * GPT2_LAYERS + 50257 / 768 + 4 / 3
    d = max(16, int(round(math.sqrt(numel / per_d2) / 16)) * 16)
    ctx = max(1, round(d * 4 / 3))
    body = sum(math.prod(s) for s in gpt2_shapes_from(d, GPT2_LAYERS, 0, ctx))
    vocab = max(1, round((numel - body) / d))  # the embedding absorbs the remainder
    return gpt2_shapes_from(d, GPT2_LAYERS, vocab, ctx)


LAYOUTS = {"flat": flat_shapes, "gpt2": gpt2_shapes}


def make_params(shapes: Shapes, device: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Leaf params with a fixed random grad each (the grad stays put across timed steps)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.empty(shape, device=device, dtype=dtype)
        p.normal_(0.0, 0.02, generator=gen)
        p.requires_grad_(True)
        g = torch.empty_like(p)
        g.normal_(0.0, 1.0, generator=gen)  # O(1) grads: no denormals, no zeros
        p.grad = g
        params.append(p)
    return params


def numel_of(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes)
