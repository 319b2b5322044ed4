"""Optimizer memory: bytes of state per parameter and peak memory of a training step.

``python -m bench.memory`` builds an MLP (``--layers`` x Linear(``--width``,
``--width``), fp32 parameters) and, for torch's AdamW and each of this
package's configurations with fp32, bf16 and 8-bit state (and, for the MADA
configurations that learn coefficients, fp32 and bf16 tangent rows, and 8-bit
ones with 8-bit state), reports:

- ``state B/param``: the bytes of per-element state the optimizer keeps for
  each parameter element, summed over its per-parameter state tensors
  (``optimizer.state[p]``, tangent rows included, step counters not) and
  divided by the parameter count. Views are disjoint, so nothing is counted
  twice; for sizes that are multiples of 16 bytes this is the exact
  per-element cost (m, v, ... at ``state_dtype``, tangent rows at
  ``tangent_dtype``; 8-bit
  state and rows count their codes and their fp32 block scales, and parameters
  under 4,096 elements keep fp32 state and rows there).
- ``alloc B/param``: every distinct storage the optimizer holds (flat buckets
  with their alignment and page padding, step counters, MADA's coefficient
  state), the real allocations, over the parameter count.
- the peak memory of one training iteration (forward, backward, ``step()``,
  ``zero_grad()``) once the state exists: torch's MemTracker on the CPU
  (``torch.distributed._tools.mem_tracker``, as bench/grad_release.py), and
  ``torch.cuda.max_memory_allocated`` on a GPU; and the peak above AdamW's.

The ``tangents`` column is the dtype MADA's tangent rows are stored in ('-' when
a configuration learns nothing and keeps none).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from typing import Any, Callable

import torch

from .step import CONFIGS as STEP_CONFIGS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # state and tangent rows
STATE_DTYPES = {**DTYPES, "8bit": "8bit"}  # 8-bit tangent rows need 8-bit state (docs/spec.md 5.5)
OURS = ("adam_corner", "mada_full", "mada_mod", "avgrad", "adamod", "diffmod")


def _adamw(params: list[torch.Tensor], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """torch's AdamW, fused where the device supports it (the leanest torch variant)."""
    try:
        return torch.optim.AdamW(params, lr=1e-3, fused=True), "fused"
    except RuntimeError:
        return torch.optim.AdamW(params, lr=1e-3), "default"


def learns(name: str) -> bool:
    """Whether a configuration keeps tangent rows (MADA with learned coefficients)."""
    cfg = STEP_CONFIGS[name]
    return cfg.cls == "MADA" and cfg.kwargs.get("learn", True) != ()


def make_optimizer(name: str, dtype: str, params: list[torch.Tensor],
                   device: torch.device, tangents: str = "fp32") -> tuple[torch.optim.Optimizer, str]:
    """The optimizer of a row, and how it runs (AdamW's variant, our backend); ``tangents``:
    the tangent rows' dtype, for configurations that keep them."""
    if name == "adamw":
        return _adamw(params, device)
    import mada_fused
    from mada_fused import backends
    from mada_fused.flat_state import STATE_8BIT

    cfg = STEP_CONFIGS[name]
    extra = dict(tangent_dtype=STATE_DTYPES[tangents]) if learns(name) else {}
    opt = getattr(mada_fused, cfg.cls)(params, lr=1e-3, state_dtype=STATE_DTYPES[dtype], **extra, **cfg.kwargs)
    # The peak counts the backend's temporaries too: say which one ``auto`` picks.
    bucket = {**DTYPES, "8bit": STATE_8BIT}
    return opt, backends.resolve("auto", device, params[0].dtype, bucket[dtype], tangent_dtype=bucket[tangents]).name


def _tensors(obj: Any, seen: set[int], out: list[torch.Tensor]) -> None:
    """Every tensor reachable from ``obj`` through containers, dataclasses and
    the attributes of torch/mada_fused objects (the optimizer's own state)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(k, seen, out)
            _tensors(v, seen, out)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _tensors(v, seen, out)
    elif type(obj).__module__.split(".")[0] in ("mada_fused", "torch", "bench"):
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                _tensors(getattr(obj, f.name), seen, out)
        elif hasattr(obj, "__dict__"):
            _tensors(vars(obj), seen, out)


def state_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[str, int]:
    """``state``: bytes of the per-element state tensors in ``opt.state`` (tangent
    rows included, 0-dim step counters not). ``allocated``: bytes of every distinct
    storage the optimizer holds, parameters and gradients excluded."""
    per_element = sum(t.nbytes for s in opt.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor) and t.dim() > 0)
    found: list[torch.Tensor] = []
    _tensors(opt, set(), found)
    theirs = {p.untyped_storage().data_ptr() for p in params}
    theirs |= {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    storages = {}
    for t in found:
        s = t.untyped_storage()
        if s.data_ptr() not in theirs and s.nbytes():
            storages[s.data_ptr()] = s.nbytes()
    return {"state": per_element, "allocated": sum(storages.values())}


def tangent_dtype(opt: torch.optim.Optimizer) -> str:
    """The dtype MADA's tangent rows are stored in, or '-' when it keeps none."""
    for s in opt.state.values():
        if "tangents" in s:
            return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64",
                    torch.uint8: "8bit"}[s["tangents"].dtype]
    return "-"


def make_model(layers: int, width: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)


def _iteration(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def peak_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> int:
    """Peak memory of one training iteration, the optimizer state already built."""
    _iteration(model, opt, x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        _iteration(model, opt, x)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, opt, x)
    with tracker:
        _iteration(model, opt, x)
    peak = tracker.get_tracker_snapshot("peak")[x.device]
    return next(v for k, v in peak.items() if str(k).split(".")[-1].lower() == "total")


def measure(name: str, dtype: str, layers: int, width: int, batch: int, device: torch.device,
            tangents: str = "fp32") -> dict[str, Any]:
    model = make_model(layers, width, device)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    opt, runs = make_optimizer(name, dtype, params, device, tangents)
    x = torch.randn(batch, width, device=device)
    peak = peak_bytes(model, opt, x)  # steps once first: the state exists when counted
    counted = state_bytes(opt, params)
    return {"config": name, "state_dtype": dtype, "runs": runs, "tangents": tangent_dtype(opt),
            "params": n, "state_bytes": counted["state"], "allocated_bytes": counted["allocated"],
            "state_per_param": counted["state"] / n, "allocated_per_param": counted["allocated"] / n,
            "peak_bytes": peak}


def rows_for(configs: tuple[str, ...], layers: int, width: int, batch: int, device: torch.device,
             progress: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """AdamW first, then each of ``configs`` with fp32, bf16 and 8-bit state (and tangent rows, where
    it keeps them: fp32 and bf16, and 8-bit with 8-bit state); each row's peak also relative to AdamW's."""
    def rows_of(c: str, d: str) -> tuple[str, ...]:
        return (*DTYPES, *(("8bit",) if d == "8bit" else ())) if learns(c) else ("fp32",)

    cases = [("adamw", "fp32", "fp32")] + [(c, d, t) for c in configs for d in STATE_DTYPES for t in rows_of(c, d)]
    rows = []
    for name, dtype, tangents in cases:
        progress(f"{name} {dtype} {tangents}")
        rows.append(measure(name, dtype, layers, width, batch, device, tangents))
    base = rows[0]["peak_bytes"]
    for r in rows:
        r["peak_over_adamw_bytes"] = r["peak_bytes"] - base
        r["peak_over_adamw_per_param"] = (r["peak_bytes"] - base) / r["params"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    mib = 2.0**20
    out = ["| config | state dtype | tangents | runs | state B/param | alloc B/param | peak MiB | "
           "peak - AdamW MiB | (peak - AdamW) B/param |",
           "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['state_dtype']} | {r['tangents']} | {r['runs']} | "
                   f"{r['state_per_param']:.2f} | {r['allocated_per_param']:.2f} | {r['peak_bytes'] / mib:.1f} | "
                   f"{r['peak_over_adamw_bytes'] / mib:+.1f} | {r['peak_over_adamw_per_param']:+.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--configs", default=",".join(OURS), help=f"comma-separated, from {','.join(OURS)}")
    ap.add_argument("--quick", action="store_true", help="a small model (2 x Linear(256, 256), batch 8)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.batch = 2, 256, 8
    configs = tuple(c for c in args.configs.split(",") if c)
    unknown = [c for c in configs if c not in OURS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {', '.join(OURS)}")
    device = torch.device(args.device)
    rows = rows_for(configs, args.layers, args.width, args.batch, device)
    n = rows[0]["params"]
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "device": str(device),
              "torch": torch.__version__, "layers": args.layers, "width": args.width, "batch": args.batch,
              "params": n, "peak_by": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "MemTracker"}
    if args.json:
        print(json.dumps({"header": header, "rows": rows}, indent=1))
        return
    print(f"{header['date']}, {device}, torch {torch.__version__}: {args.layers} x Linear({args.width}, "
          f"{args.width}) = {n / 1e6:.2f}M fp32 parameters, batch {args.batch}; peak of one iteration "
          f"(forward, backward, step, zero_grad) by {header['peak_by']}")
    print(table(rows))


if __name__ == "__main__":
    main()
