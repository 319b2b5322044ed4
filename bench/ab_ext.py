"""`python -m bench.ab_ext OLD.so NEW.so`: two builds of the CPU extension, one process, interleaved.

On a shared VM the same step measures +-20-30 % apart from one process to the
next (memory bandwidth wanders, the allocator places buffers differently), so
a kernel change smaller than that cannot be judged from two separate runs.
This loads both builds of ``mada_fused._C_cpu`` into one process, gives each
its own optimizer on its own copy of the same data, and alternates rounds of
steps between them; compare the medians of the round medians.

    cp mada_fused/_C_cpu*.so /tmp/old.so      # before the change
    pip install --no-build-isolation --no-deps -e .
    python -m bench.ab_ext /tmp/old.so mada_fused/_C_cpu*.so --size 16M --config mada_full

Both builds must speak this tree's call interface (csrc/abi.h, checked on load).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from bench.__main__ import parse_size
from bench.step import CONFIGS, one_param_optimizer
from mada_fused.backends import abi
from mada_fused.backends.cpu import CpuBackend


def load_build(path: str, workdir: Path, tag: str) -> ModuleType:
    """``path`` as a module of its own: a copy under its own directory, so the
    dynamic loader cannot hand back the build that is already loaded."""
    dst = workdir / tag / Path(path).name
    dst.parent.mkdir()
    shutil.copy(path, dst)
    # Its own package name too: CPython caches extension modules by name, and
    # the init symbol only fixes the last component.
    name = f"_ab_build{tag}._C_cpu"
    loader = importlib.machinery.ExtensionFileLoader(name, str(dst))
    spec = importlib.util.spec_from_file_location(name, dst, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    if not hasattr(module, "abi") or module.abi() != abi.report():
        raise SystemExit(f"{path} was built from another call interface than this tree's csrc/abi.h: "
                         "time the two trees with `python -m bench.paired` instead")
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs=2, help="two _C_cpu*.so files")
    ap.add_argument("--size", default="16M")
    ap.add_argument("--config", default="mada_full", choices=[c for c in CONFIGS if c != "adamw"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    args = ap.parse_args(argv)
    numel, cfg = parse_size(args.size), CONFIGS[args.config]
    torch.manual_seed(0)
    init, grad = torch.randn(numel), torch.randn(numel)
    opts = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, path in enumerate(args.builds):
            opt = one_param_optimizer(cfg, "cpu", init, grad)
            opt._backend_for[(init.device, init.dtype)] = CpuBackend(load_build(path, Path(tmp), str(k)))
            opt.step()  # allocates the state
            opts.append(opt)
        times: list[list[float]] = [[], []]
        for _ in range(args.rounds):
            for opt, row in zip(opts, times):
                steps = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    opt.step()
                    steps.append(time.perf_counter() - t0)
                row.append(statistics.median(steps) * 1e3)
    print(f"{args.config}, {numel} fp32 elements, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.steps} steps (ms per step: median of round medians, range)")
    for path, row in zip(args.builds, times):
        print(f"  {statistics.median(row):9.3f}  ({min(row):.3f}-{max(row):.3f})  {path}")
    ratio = statistics.median(times[1]) / statistics.median(times[0])
    print(f"  second / first: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
