"""`python -m bench.train --experiments lowprec`: what storing less costs in final loss.

Rows, per optimizer: everything fp32 (the baseline); bf16 state; bf16 state and bf16
tangents (MADA); 8-bit state, alone and with bf16 or 8-bit tangents (MADA); and bf16 parameters
without fp32 master weights, rounded to nearest (plain: why the other two exist), with a
Kahan compensation buffer, or stochastically rounded (their state stays fp32, so those
rows show the parameter rounding alone). Every row is compared with its optimizer's fp32 row in units of that
row's seed-to-seed standard deviation: issue #19's targets are bf16 state within one,
8-bit within two, Kahan within one. A row whose option this build lacks is skipped,
with the reason the optimizer gave, so the experiment runs at every stage of the work.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

BF16 = torch.bfloat16


@dataclass(frozen=True)
class Variant:
    name: str
    param_dtype: torch.dtype
    kwargs: dict = field(default_factory=dict, hash=False)
    target_sd: float | None = None  # issue #19: |mean - fp32 row's mean| <= target_sd * fp32 row's sd
    tangents: bool = False  # only means something where coefficients are learned


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("fp32", torch.float32),
    Variant("bf16-state", torch.float32, dict(state_dtype=BF16), 1.0),
    Variant("bf16-state+tangents", torch.float32, dict(state_dtype=BF16, tangent_dtype=BF16), 1.0, tangents=True),
    Variant("8bit-state", torch.float32, dict(state_dtype="8bit"), 2.0),
    Variant("8bit-state+bf16-tangents", torch.float32, dict(state_dtype="8bit", tangent_dtype=BF16), 2.0,
            tangents=True),
    Variant("8bit-state+tangents", torch.float32, dict(state_dtype="8bit", tangent_dtype="8bit"), 2.0,
            tangents=True),
    Variant("bf16-params", BF16),
    Variant("bf16-params+kahan", BF16, dict(kahan_sum=True), 1.0),
    Variant("bf16-params+sr", BF16, dict(bf16_stochastic_round=True)),
]}
# torch's AdamW is the fp32 anchor; "AdamW-corner" is MADA(learn=()) at Adam's corner (the
# AdamW that takes these options); "MADA" learns all six coefficients.
OPTIMIZERS = ("AdamW", "AdamW-corner", "MADA")
PROBE_NUMEL = 8192  # above the size under which 8-bit state stays fp32, so the probe quantizes


def applies(opt: str, variant: Variant) -> bool:
    """torch's AdamW is the fp32 anchor only; tangent storage needs learned coefficients."""
    return (opt != "AdamW" or variant.name == "fp32") and (not variant.tangents or opt == "MADA")


def unavailable(variant: Variant, make: Callable[..., torch.optim.Optimizer], device: str = "cpu") -> str | None:
    """None if this build runs the row; otherwise why not. ``make(params, **kwargs)`` builds
    the optimizer; the probe constructs it and takes one step on a small parameter."""
    p = torch.nn.Parameter(torch.randn(PROBE_NUMEL).to(device, variant.param_dtype))
    p.grad = torch.randn_like(p)
    try:
        make([p], **variant.kwargs).step()
    except (TypeError, ValueError, NotImplementedError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def rows(optims: list[str], variants: list[str], make_for: Callable[[str], Callable[..., torch.optim.Optimizer]],
         device: str = "cpu") -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(rows to run, rows this build cannot run with the reason: (optimizer, variant, why));
    ``make_for(opt)`` gives the ``make`` of unavailable."""
    bad = [v for v in variants if v not in VARIANTS] + [o for o in optims if o not in OPTIMIZERS]
    if bad:
        raise ValueError(f"lowprec: unknown rows {bad}; variants {list(VARIANTS)}, optimizers {list(OPTIMIZERS)}")
    run, skipped = [], []
    for o in optims:
        for v in variants:
            if applies(o, VARIANTS[v]):
                why = unavailable(VARIANTS[v], make_for(o), device)
                if why is None:
                    run.append((o, v))
                else:
                    skipped.append((o, v, why))
    return run, skipped


def _fmt(x: float, sd: float = 0.0) -> str:
    if not math.isfinite(x):
        return "diverged"
    return f"{x:.4f}" + (f" +- {sd:.4f}" if sd else "")


def baseline_of(opt: str, by_row: dict[tuple[str, str], dict]) -> dict | None:
    """The fp32 row a row is measured against: its own optimizer's, and for torch's AdamW
    anchor, the AdamW-corner's (so the corner is seen to be AdamW)."""
    return by_row.get(("AdamW-corner" if opt == "AdamW" else opt, "fp32"))


def signed(d: float) -> str:
    return f"{d:+.4f}" if abs(d) >= 1e-3 or d == 0 else f"{d:+.1e}"  # bf16 state moves the 5th digit


def verdict(r: dict, base: dict, target: float | None) -> tuple[str, str, str]:
    """(difference of the means, in fp32-row sds, verdict against the target)."""
    d = r["final_val"] - base["final_val"]
    sd = base["final_val_sd"]
    if not math.isfinite(d):
        return "diverged", "-", "fails" if target else "-"
    k = abs(d) / sd if sd > 0 else math.inf
    ksd = f"{d / sd:+.2f}" if sd > 0 else "n/a (1 seed)"
    if target is None or sd == 0:
        return signed(d), ksd, "-"
    return signed(d), ksd, f"{'meets' if k <= target else 'misses'} (<= {target:g} sd)"


def markdown(by_task: dict[str, dict[tuple[str, str], dict]], steps: dict[str, int],
             skipped: list[tuple[str, str, str]]) -> list[str]:
    out = []
    for task, by_row in by_task.items():
        n = next(iter(by_row.values()))["n_seeds"]
        out += [f"## {task}: storage precision, {steps[task]} steps, {n} seed(s) (final val loss, mean +- seed sd)", "",
                "| optimizer | row | params | final val | - fp32 row | in fp32 sds | paired by seed (lower) "
                "| target | s/run (CPU s) |", "|---|---|---|---:|---:|---:|---:|---|---:|"]
        for (o, v), r in by_row.items():
            base = baseline_of(o, by_row)
            diff = ksd = paired = target = ""
            if base is r:
                target = "(baseline)"
            elif base is not None:
                diff, ksd, target = verdict(r, base, VARIANTS[v].target_sd)
                d = [a - b for a, b in zip(r["final_val_seeds"], base["final_val_seeds"])]
                paired = f"{signed(statistics.fmean(d))} ({sum(x < -1e-4 for x in d)}/{len(d)})"
            out.append(f"| {o} | {v} | {str(VARIANTS[v].param_dtype).removeprefix('torch.')} | "
                       f"{_fmt(r['final_val'], r['final_val_sd'])} | {diff} | {ksd} | {paired} | {target} | "
                       f"{r['time_s']:.1f} ({r['cpu_s']:.1f}) |")
        out.append("")
    if skipped:
        out += ["Skipped (this build lacks the option): " + "; ".join(
            f"{o} {v} ({why})" for o, v, why in skipped), ""]
    return out
