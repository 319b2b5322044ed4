"""What torch.compile makes of a training step that calls our ``step()``.

``python -m bench.compile_counts`` compiles ``forward, backward, opt.step(),
opt.zero_grad()`` (backend "eager": the counts do not depend on the backend)
for each optimizer and runs it over a 50-step cosine schedule, once with a
float lr (the scheduler writes a new float every step) and once with a tensor
lr, and prints torch's own counters: graph breaks (all, and those whose
frame is in mada_fused), unique graphs, frames compiled (all, and those in
mada_fused), recompiles and whether the recompile limit was hit (the frame
then runs eagerly from there on), all from dynamo's own counters and logs.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.utils

import mada_fused

OPTIMIZERS = {"MADA": mada_fused.MADA, "AVGrad": mada_fused.AVGrad,
              "AdaMod": mada_fused.AdaMod, "DiffMod": mada_fused.DiffMod}
PACKAGE_DIR = os.path.dirname(os.path.abspath(mada_fused.__file__))


class Watch(logging.Handler):
    """What dynamo logs while it is active: frames it compiled, graph breaks
    (by the file they happened in), recompiles, and hits of the recompile limit.

    Reads dynamo's own log records (the "graph_breaks" and "recompiles"
    artifacts, convert_frame's "start compiling" line and its limit warning)
    without printing them.
    """

    LOGGERS = ("torch._dynamo.convert_frame", "torch._dynamo.symbolic_convert.__graph_breaks",
               "torch._dynamo.guards.__recompiles")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.frames: list[str] = []  # "name file" of every frame dynamo compiled
        self.breaks: list[str] = []  # "file:line" of every graph break
        self.recompiles = 0
        self.limit_hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("torchdynamo start compiling"):
            self.frames.append(" ".join(msg.split()[3:5]))
        elif "in user code at " in msg:
            self.breaks.append(msg.split("in user code at ", 1)[1].split()[0])
        elif msg.startswith("Recompiling function"):
            self.recompiles += 1
        elif "hit config." in msg:
            self.limit_hits += 1

    def in_package(self, places: list[str]) -> list[str]:
        return [p for p in places if PACKAGE_DIR in p]

    def __enter__(self) -> "Watch":
        torch._logging.set_logs(graph_breaks=True, recompiles=True)
        self._saved = []
        for name in self.LOGGERS:
            log = logging.getLogger(name)
            self._saved.append((log, log.level, log.propagate))
            log.setLevel(logging.DEBUG)
            log.propagate = False  # counted, not printed
            log.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for log, level, propagate in self._saved:
            log.removeHandler(self)
            log.setLevel(level)
            log.propagate = propagate
        torch._logging.set_logs()


def setup(name: str, tensor_lr: bool, backend: str = "cpu", seed: int = 0, **options: Any):
    """A small MLP, its optimizer (``options`` for its constructor), a cosine schedule and a batch."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2, backend=backend, **options)
    if tensor_lr:
        opt.param_groups[0]["lr"] = torch.tensor(1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    return model, opt, sched, x, y


def train_step_of(model: torch.nn.Module, opt: torch.optim.Optimizer | None):
    """forward, backward and (with ``opt``) step and zero_grad."""
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        return loss
    return train_step


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor,
          y: torch.Tensor, steps: int, compiled: str | None) -> None:
    """``steps`` of training; ``compiled`` is None (eager), a torch.compile backend for the
    whole train step, or "step:<backend>" for ``torch.compile(opt.step)`` alone."""
    if compiled is None or compiled.startswith("step:"):
        fwd_bwd = train_step_of(model, None)
        step = opt.step if compiled is None else torch.compile(opt.step, backend=compiled[5:])
    else:
        fwd_bwd, step = torch.compile(train_step_of(model, opt), backend=compiled), None
    for _ in range(steps):
        fwd_bwd(x, y)
        if step is not None:
            step()
            opt.zero_grad()
        sched.step()


def measure(name: str, tensor_lr: bool, alone: bool, steps: int = 50) -> dict[str, Any]:
    """Counts over ``steps`` of a compiled train step (``alone``: of ``torch.compile(opt.step)``)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, opt, sched, x, y = setup(name, tensor_lr)
    with Watch() as w:
        train(model, opt, sched, x, y, steps, "step:eager" if alone else "eager")
    c = torch._dynamo.utils.counters
    return {
        "optimizer": name,
        "compiled": "opt.step" if alone else "train step",
        "lr": "tensor" if tensor_lr else "float",
        "graph breaks": len(w.breaks),
        "in mada_fused": len(w.in_package(w.breaks)),
        "unique graphs": c["stats"]["unique_graphs"],
        "frames compiled": len(w.frames),
        "in mada_fused ": len(w.in_package(w.frames)),
        "recompiles": w.recompiles,
        "limit hit": w.limit_hits > 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    rows = [measure(n, t, a, args.steps) for a in (False, True) for n in OPTIMIZERS for t in (False, True)]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
