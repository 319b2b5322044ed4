"""`python -m bench`: time one optimizer step per backend, against torch's fused AdamW.

Examples:
    python -m bench --quick --device cpu
    python -m bench --device cpu --sizes 1M,16M,64M --backends reference,cpu
    python -m bench --device cuda --dtype bfloat16 --out bench/out/h100
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import machine_info, machine_line
from .floor import library
from .step import CONFIGS, DEFAULT_CONFIGS, available_backends, run_benchmark

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'16M' -> 16 * 2**20 (binary units, so 256M is 2**28 elements)."""
    text = text.strip().upper()
    if text[-1] in SUFFIX:
        return int(float(text[:-1]) * SUFFIX[text[-1]])
    return int(text)


def size_label(numel: int) -> str:
    return f"{numel / (1 << 20):.3g}M"


def progress_bar(total: int):
    """tqdm when installed, else silent. tick(msg) marks the previous case done; tick(None) closes."""
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda _msg: None
    bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
    started = [False]

    def tick(msg: str | None) -> None:
        if started[0]:
            bar.update(1)
        started[0] = True
        if msg is None:
            bar.close()
        else:
            bar.set_description_str(msg)

    return tick


def fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    meta, bw = result["meta"], result["copy_bandwidth"]
    lines = [
        "# Step benchmark",
        "",
        f"Machine: {machine_line(meta)} (at the end; {meta.get('loadavg_start')} at the start). "
        f"Device `{meta['device']}`, dtype `{result['args']['dtype']}`.",
        f"Copy bandwidth (copy_ of {bw['numel'] / 1e6:.0f}M fp32, bytes = 2 x size): **{bw['gbps']:.1f} GB/s** "
        f"from the median time, {bw['gbps_min_time']:.1f} GB/s from the fastest.",
        f"GB/s, % copy BW and x fused below use the **{result['args']['stat']}** step time.",
        "`x floor` (CPU, fp32): the median over rounds of step time / the time bench/stream_floor.cpp takes,",
        "in the same round, to move the same streams (param and state read and written, grad read) with",
        "no arithmetic; 1.0 = the step costs exactly its bytes on this machine.",
        "",
        "Bytes moved = read param + grad, write param, read + write every state buffer the config",
        "allocates (fp32 for mada_fused; torch keeps state in the param dtype). `state` = buffer count",
        "including one tangent buffer per learned coefficient. `x fused` = time / torch fused AdamW time.",
        "With --rounds N every case ran N times, interleaved, each with fresh state; `median ms` is then",
        "the median of the N round medians and `rounds` their range.",
        "",
    ]
    lines += [f"- {n}" for n in result["notes"]]
    lines += ["", "Configs: " + "; ".join(f"`{c}`: {CONFIGS[c].about}" for c in ["adamw", *result["args"]["configs"]]), ""]
    for layout in result["args"]["layouts"]:
        rows = [r for r in result["rows"] if r["layout"] == layout]
        if not rows:
            continue
        lines += [f"## Layout `{layout}` ({rows[0]['n_tensors']} tensor(s) at the first size)", "",
                  "| size | config | backend | state | median ms | min ms | rounds: min-max ms | MB moved | GB/s "
                  "| % copy BW | x floor | x fused |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "time_ms" in r:
                spread = r["round_ms"]
                cells = [fmt(r["time_ms"], ".3f"), fmt(r["time_min_ms"], ".3f"),
                         f"{min(spread):.3f}-{max(spread):.3f} ({len(spread)})" if len(spread) > 1 else "",
                         fmt(r["bytes"] / 1e6, ".1f"), fmt(r["gbps"], ".1f"),
                         fmt(100 * r["frac_copy"], ".0f"), fmt(r.get("x_floor"), ".2f"),
                         fmt(r["ratio_torch_fused"], ".2f")]
            else:
                cells = [f"skipped: {r['skipped']}", "", "", fmt(r["bytes"] / 1e6, ".1f"), "", "", "", ""]
            lines.append(f"| {size_label(r['numel'])} | {r['config']} | {r['backend']} | {r['n_state']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Run time: {result['wall_s']:.0f} s. Command: `{result['command']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", help="comma list, e.g. 1M,16M,64M (default 1M,4M,16M,64M,256M; --quick: 1M,4M)")
    ap.add_argument("--backends", help="mada_fused backends, comma list (default: all available on --device)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"from {sorted(CONFIGS)}")
    ap.add_argument("--layouts", default="flat,gpt2", help="flat (one bucket) and/or gpt2 (148 tensors)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--out", default="bench/out/step", help="directory for results.json/.md and plots")
    ap.add_argument("--quick", action="store_true", help="small sizes, short timing budget")
    ap.add_argument("--stat", default="median", choices=["median", "min"],
                    help="step time behind GB/s and ratios (min resists other load on a shared machine)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every case this many times, interleaved, each with fresh state; "
                         "rows report the median of the round medians")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    sizes = [parse_size(s) for s in (args.sizes or ("1M,4M" if args.quick else "1M,4M,16M,64M,256M")).split(",")]
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    layouts = [x for x in args.layouts.split(",") if x]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    wanted = args.backends.split(",") if args.backends else None
    backends, notes = available_backends(args.device, wanted)
    if torch.device(args.device).type == "cpu" and args.dtype == "float32" and library()[0] is None:
        notes.append("no x floor column: " + library()[1])
    for n in notes:
        print("note:", n, file=sys.stderr)

    t0, load0 = time.perf_counter(), os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows, bw = run_benchmark(args.device, sizes, layouts, configs, backends, DTYPES[args.dtype],
                             args.quick, args.stat, progress=progress_bar, rounds=args.rounds)
    result = {"meta": dict(machine_info(args.device), loadavg_start=load0), "args": dict(vars(args), configs=configs, layouts=layouts,
                                                               backends=backends, sizes=sizes),
              "notes": notes, "copy_bandwidth": bw, "rows": rows, "wall_s": time.perf_counter() - t0,
              "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    if not args.no_plots:
        from .plots import plot_step

        plot_step(result, args.out)
    print(md)
    print(f"wrote {args.out}/results.json, results.md" + ("" if args.no_plots else ", *.png"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
