"""Would MADA's hyper-gradient survive 8-bit tangent rows? (issue #19; nothing is changed.)

``python -m bench.tangent_8bit`` trains full MADA (all six learned, fp32 state and tangents)
on bench.train's tasks and, before every step, forms each learned coefficient's
hyper-gradient ``h = sum(g * tangent row)`` three ways: from the fp32 rows the optimizer
keeps, from the rows rounded to bf16, and from the rows through the 8-bit signed code of
docs/spec.md 5.4 (mada_fused.quant8, per 256 elements; parameters under 4,096 elements keep
fp32 rows). The rows are du/dk of the last step only (one-step truncation), so this is exactly
the ``h`` a run with stored low-precision rows would see at that step. Reported per
coefficient over the steps after warm-up: the correlation with the fp32 ``h``, the median
relative error, and how often the sign (the direction of the coefficient's step) agrees.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from mada_fused import MADA, quant8
from mada_fused.coefficients import COEFFICIENTS

from .train import Task


def _q8(rows: torch.Tensor) -> torch.Tensor:
    if rows[0].numel() < quant8.MIN_NUMEL:
        return rows
    return torch.stack([quant8.dequantize(*quant8.quantize(r.reshape(-1), True), True).view(r.shape) for r in rows])


def collect(task_name: str, steps: int, seed: int) -> dict[str, list[tuple[float, float, float]]]:
    task = Task(task_name, "cpu", 1.0)
    torch.manual_seed(seed)
    model = task.model()
    opt = MADA(model.parameters(), lr=task.lr, backend="reference")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[tuple[float, float, float]]] = {k: [] for k in COEFFICIENTS}
    for _ in range(steps):
        x, y = task.sample(gen)
        opt.zero_grad()
        task.loss(model, x, y).backward()
        h = torch.zeros(3, len(COEFFICIENTS), dtype=torch.float64)
        for p in model.parameters():
            rows = opt.state[p].get("tangents") if p in opt.state else None
            if rows is None:
                continue
            g = p.grad.double().reshape(1, -1)
            for j, r in enumerate((rows, rows.to(torch.bfloat16).float(), _q8(rows))):
                h[j] += (g * r.double().reshape(len(rows), -1)).sum(1)
        if any(p in opt.state for p in model.parameters()):
            for c, name in enumerate(COEFFICIENTS):
                out[name].append(tuple(h[:, c].tolist()))
        opt.step()
    return out


def _corr(a: list[float], b: list[float]) -> float:
    return statistics.correlation(a, b) if len(a) > 2 and statistics.pstdev(a) > 0 else float("nan")


def summary(h: dict[str, list[tuple[float, float, float]]], skip: int) -> list[str]:
    lines = ["| coefficient | steps | corr bf16 | corr 8-bit | median rel err bf16 | median rel err 8-bit | "
             "sign agrees 8-bit |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, xs in h.items():
        xs = [x for x in xs[skip:] if x[0] != 0.0]
        if not xs:
            continue
        f, b, q = (list(c) for c in zip(*xs))
        rel = [[abs(y - x) / abs(x) for x, y in zip(f, other)] for other in (b, q)]
        agree = sum((x > 0) == (y > 0) for x, y in zip(f, q)) / len(f)
        lines.append(f"| {name} | {len(f)} | {_corr(f, b):.6f} | {_corr(f, q):.6f} | {statistics.median(rel[0]):.2e} | "
                     f"{statistics.median(rel[1]):.2e} | {agree:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,shakespeare")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for task in args.tasks.split(","):
        print(f"{task}, {args.steps} steps, seed {args.seed} (statistics over the steps after the 50 warm-up steps)")
        print("\n".join(summary(collect(task, args.steps, args.seed), skip=50)))


if __name__ == "__main__":
    main()
