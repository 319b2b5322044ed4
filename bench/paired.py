"""`python -m bench.paired A B`: two step cases in one process, single steps alternated.

A case is ``config:backend`` as in `python -m bench` (``adam_corner:cpu``,
``adamw:torch_fused``, ``mada_full:cpu``, ...), optionally followed by mada_fused's
``:state_dtype`` and, for MADA, ``:tangent_dtype`` (each ``fp32``, the default, ``bf16``
or ``8bit``): ``mada_full:cpu:bf16``, ``mada_full:cpu:bf16:bf16``. Both get their own parameter
and state on copies of the same data; then each pair of calls runs A, B and
the memory floor of A's stream mix (bench/floor.py) back to back, in an order
that alternates from pair to pair. On the shared VM the bandwidth wanders by
+-20 % over minutes, so `python -m bench`'s round medians can put either of two
equal kernels ahead; ratios of calls made milliseconds apart cancel most of
that. Which case is allocated first matters too (up to 15 % here: where the
pages land), so the measurement runs twice, allocating A first and then B
first. Reported per order: the median of the per-pair ratios B / A, their
quartiles, how many pairs B won, and each case against the floor; then the
geometric mean of the two orders' median ratios.

    python -m bench.paired adam_corner:cpu adamw:torch_fused --size 16M --pairs 40
    python -m bench.paired mada_full:cpu mada_full:cpu:bf16 --size 16M --pairs 20
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import time

import torch

from bench.__main__ import parse_size
from bench.floor import stream_mix, sweep_fn
from bench.step import ANCHORS, BACKEND_DEVICE, CONFIGS, Config, fresh_pages, one_param_optimizer, state_buffers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": "8bit"}  # mada_fused's state/tangent_dtype


def parse_case(text: str) -> tuple[str, str, str, str]:
    """(config, backend, state dtype, tangent dtype) from ``config:backend[:state[:tangents]]``."""
    config, backend, *dtypes = text.split(":")
    if config not in CONFIGS or not backend or len(dtypes) > 2:
        raise argparse.ArgumentTypeError(f"{text!r}: want config:backend[:state_dtype[:tangent_dtype]] with "
                                         f"config in {sorted(CONFIGS)}")
    state, tangents = (dtypes + ["fp32", "fp32"])[:2]
    if not {state, tangents} <= set(DTYPES) or (backend in ANCHORS and dtypes):
        raise argparse.ArgumentTypeError(f"{text!r}: dtypes from {sorted(DTYPES)}, none for the torch anchors")
    if tangents != "fp32" and CONFIGS[config].cls != "MADA":
        raise argparse.ArgumentTypeError(f"{text!r}: a tangent dtype is MADA's only")
    if (config == "adamw") != (backend in ANCHORS):
        raise argparse.ArgumentTypeError(f"{text!r}: the torch anchors {sorted(ANCHORS)} run config adamw only")
    if backend not in ANCHORS and BACKEND_DEVICE.get(backend, "?") not in (None, "cpu"):
        cpu = sorted(b for b, d in BACKEND_DEVICE.items() if d in (None, "cpu"))
        raise argparse.ArgumentTypeError(f"{text!r}: this tool times CPU steps; backends {cpu + sorted(ANCHORS)}")
    return config, backend, state, tangents


def case_config(config: str, state: str = "fp32", tangents: str = "fp32") -> Config:
    """The config with the storage dtypes its case names (only those, so that a build
    without ``tangent_dtype`` still runs fp32-tangent cases)."""
    storage = {k: DTYPES[d] for k, d in (("state_dtype", state), ("tangent_dtype", tangents)) if d != "fp32"}
    return dataclasses.replace(CONFIGS[config], kwargs=dict(CONFIGS[config].kwargs, **storage))


def case_name(config: str, backend: str, state: str, tangents: str) -> str:
    dtypes = [state, tangents] if tangents != "fp32" else [state] if state != "fp32" else []
    return ":".join([config, backend, *dtypes])


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def measure(cases: list[tuple[str, str, str, str]], floor_of: str, numel: int, pairs: int,
            warmup: int) -> list[list[float]]:
    """Seconds per call of each case, allocated in the order given, and then of the floor
    of config ``floor_of``'s streams (fp32); each pair runs them all, in alternating order."""
    torch.manual_seed(0)
    init, grad = torch.randn(numel), torch.randn(numel)
    calls = []
    for config, backend, *dtypes in cases:
        with fresh_pages("cpu"):
            opt = one_param_optimizer(case_config(config, *dtypes), backend, init, grad)
            opt.step()  # allocates the state
        calls.append(opt.step)
    with fresh_pages("cpu"):
        floor = sweep_fn(numel, *stream_mix(state_buffers(CONFIGS[floor_of])))
    calls += [floor] if floor else []
    for _ in range(warmup):
        for fn in calls:
            fn()
    times: list[list[float]] = [[] for _ in calls]
    for k in range(pairs):
        for i in range(len(calls)) if k % 2 == 0 else reversed(range(len(calls))):
            t0 = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - t0)
    return times


def report(names: list[str], times: list[list[float]]) -> float:
    """Prints one measurement; returns the median per-pair ratio B / A."""
    for name, row in zip(names, times):
        lo, mid, hi = quartiles([t * 1e3 for t in row])
        print(f"  {name:28s} {mid:9.3f}  ({lo:.3f}-{hi:.3f})")
    ratio = [b / a for a, b in zip(times[0], times[1])]
    lo, median, hi = quartiles(ratio)
    print(f"  {names[1]} / {names[0]} per pair: median {median:.3f}, quartiles {lo:.3f}-{hi:.3f}; "
          f"{names[1]} faster in {sum(r < 1.0 for r in ratio)} of {len(ratio)}")
    if len(times) == 3:
        for name, row in zip(names[:2], times[:2]):
            lo, mid, hi = quartiles([s / f for s, f in zip(row, times[2])])
            print(f"  {name} / floor per pair: median {mid:.3f}, quartiles {lo:.3f}-{hi:.3f}")
    return median


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs=2, type=parse_case, metavar="CONFIG:BACKEND[:STATE_DTYPE[:TANGENT_DTYPE]]")
    ap.add_argument("--size", default="16M")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    if args.pairs < 2:
        ap.error("--pairs: at least 2 (quartiles)")
    numel = parse_size(args.size)
    a, b = (case_name(*c) for c in args.cases)
    print(f"{numel} fp32 parameters, {torch.get_num_threads()} threads, {args.pairs} pairs per order "
          f"(ms per call: median, quartiles)")
    ratios = []
    for b_first in (False, True):
        print(f" allocated {b if b_first else a} first:")
        cases = args.cases[::-1] if b_first else args.cases
        times = measure(cases, args.cases[0][0], numel, args.pairs, args.warmup)
        gc.collect()
        if b_first:  # report as A, B whatever the allocation order
            times[:2] = times[1::-1]
        names = [a, b] + (["floor (A's streams, fp32)"] if len(times) == 3 else [])
        ratios.append(report(names, times))
    print(f" {b} / {a}, geometric mean of the two orders: {math.sqrt(ratios[0] * ratios[1]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
