"""The `python -m bench` cases through pytest-benchmark: pytest bench/ --benchmark-only

Environment: BENCH_DEVICE (default cuda if available, else cpu), BENCH_SIZES
(default 1M,4M), BENCH_DTYPE (default float32).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from bench.__main__ import DTYPES, parse_size
from bench.models import LAYOUTS, make_params, numel_of
from bench.step import (ANCHORS, BACKEND_DEVICE, DEFAULT_CONFIGS, available_backends, bytes_moved,
                        cases, make_optimizer, state_buffers, sync)

DEVICE = os.environ.get("BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
SIZES = [parse_size(s) for s in os.environ.get("BENCH_SIZES", "1M,4M").split(",")]
DTYPE = DTYPES[os.environ.get("BENCH_DTYPE", "float32")]
AVAILABLE, NOTES = available_backends(DEVICE, None)
# Parametrize over every backend that could exist, so a missing one shows as a skip with its reason.
CASES = cases(list(DEFAULT_CONFIGS), [b for b in BACKEND_DEVICE if BACKEND_DEVICE[b] in (None, torch.device(DEVICE).type)])


@functools.lru_cache(maxsize=1)
def _params(layout: str, size: int) -> tuple[torch.Tensor, ...]:
    return tuple(make_params(LAYOUTS[layout](size), DEVICE, DTYPE))


@pytest.mark.parametrize("size", SIZES, ids=[f"{s >> 20}M" for s in SIZES])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cfg,backend", CASES, ids=[f"{c.name}@{b}" for c, b in CASES])
def test_step(benchmark, cfg, backend, layout, size):
    if backend not in ANCHORS and backend not in AVAILABLE:
        pytest.skip(f"backend {backend!r} unavailable: " + "; ".join(NOTES))
    params = list(_params(layout, size))
    opt = make_optimizer(cfg, backend, params)
    for _ in range(3):  # allocate state, pass the hyper-warmup
        opt.step()
    pbytes = params[0].element_size()
    n_state = state_buffers(cfg)
    benchmark.extra_info.update(
        config=cfg.name, backend=backend, layout=layout, numel=numel_of([p.shape for p in params]),
        bytes=bytes_moved(sum(p.numel() for p in params), pbytes, n_state, pbytes if backend in ANCHORS else 4))
    benchmark(lambda: (opt.step(), sync(DEVICE)))
