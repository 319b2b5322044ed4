"""Peak memory of one training iteration with and without gradient release.

``python -m bench.grad_release`` trains an MLP (``--layers`` x ``--width`` Linear
layers, cpu backend) and measures one iteration (forward, backward, and
without release ``step()`` and ``zero_grad()``) under torch's MemTracker
(``torch.distributed._tools.mem_tracker``), which follows every tensor's
storage through the dispatcher and files it as parameter, gradient,
activation, temporary or optimizer state. It prints the peak, per category,
with and without ``mada_fused.grad_release``, and the wall time per iteration.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker

import mada_fused

CONFIGS = {
    "mada_full": lambda ps: mada_fused.MADA(ps, beta3=0.5, rho=0.5, c=0.5, gamma=0.7, backend="cpu"),
    "adam_corner": lambda ps: mada_fused.MADA(ps, learn=(), backend="cpu"),
    "adamod": lambda ps: mada_fused.AdaMod(ps, backend="cpu"),
}


def setup(config: str, layers: int, width: int, batch: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = CONFIGS[config](model.parameters())
    x = torch.randn(batch, width)
    model(x).square().mean().backward()  # the state exists before the measured iteration
    opt.step()
    opt.zero_grad()
    return model, opt, x


def iteration(model, opt, x, release: bool) -> None:
    model(x).square().mean().backward()
    if not release:
        opt.step()
        opt.zero_grad()


def measure(config: str, release: bool, layers: int, width: int, batch: int, reps: int) -> dict[str, float]:
    model, opt, x = setup(config, layers, width, batch)
    handle = mada_fused.grad_release(opt) if release else None
    tracker = MemTracker()
    tracker.track_external(model, opt, x)
    with tracker:
        iteration(model, opt, x, release)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    start = time.perf_counter()
    for _ in range(reps):
        iteration(model, opt, x, release)
    ms = (time.perf_counter() - start) / reps * 1e3
    if handle is not None:
        handle.remove()
    mib = {str(k).split(".")[-1].lower(): v / 2**20 for k, v in peak.items()}
    return {"grad": mib["grad"], "act": mib["act"], "opt": mib["opt"], "total": mib["total"], "ms": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    n = args.layers * (args.width + 1) * args.width
    print(f"{args.layers} x Linear({args.width}, {args.width}): {n / 1e6:.2f}M fp32 parameters "
          f"({n * 4 / 2**20:.1f} MiB), batch {args.batch}; peak MiB by MemTracker category, ms per iteration")
    print("| config | release | grads | activations | optimizer state | total peak | ms/iter |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for config in CONFIGS:
        for release in (False, True):
            r = measure(config, release, args.layers, args.width, args.batch, args.reps)
            print(f"| {config} | {'yes' if release else 'no'} | {r['grad']:.1f} | {r['act']:.1f} | "
                  f"{r['opt']:.1f} | {r['total']:.1f} | {r['ms']:.1f} |")


if __name__ == "__main__":
    main()
