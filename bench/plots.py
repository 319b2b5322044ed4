"""PNG plots for the step benchmark and the training comparison (matplotlib, no display)."""
from __future__ import annotations

import math
import os

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # headless machines and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BACKEND_STYLE = {"torch_fused": "-", "torch_foreach": ":", "reference": "--", "cpu": "-", "cuda": "-", "triton": "-."}
COEFS = ("beta1", "beta2", "beta3", "rho", "c", "gamma")


def _series(rows: list[dict], layout: str, key: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        if r["layout"] == layout and r.get(key) is not None:
            xs, ys = out.setdefault(f"{r['config']}@{r['backend']}", ([], []))
            xs.append(r["numel"])
            ys.append(r[key])
    return out


def plot_step(result: dict, out_dir: str) -> list[str]:
    """gbps_vs_size.png, ratio_vs_torch_fused.png and (CPU fp32) x_floor_vs_size.png, one panel per layout."""
    rows, layouts = result["rows"], result["args"]["layouts"]
    written = []
    plots = [("gbps", "gbps_vs_size.png", "GB/s (counted bytes / time)", True),
             ("ratio_torch_fused", "ratio_vs_torch_fused.png", "time / torch fused AdamW time", True)]
    if any(r.get("x_floor") is not None for r in rows):
        plots.append(("x_floor", "x_floor_vs_size.png", "time / memory floor of its streams", True))
    for key, fname, ylabel, logy in plots:
        fig, axes = plt.subplots(1, len(layouts), figsize=(8.5 * len(layouts), 4.5), squeeze=False)
        for ax, layout in zip(axes[0], layouts):
            configs = sorted({r["config"] for r in rows})
            for label, (xs, ys) in sorted(_series(rows, layout, key).items()):
                config, backend = label.split("@")
                # colour = config, line style = backend, so "same math, other backend" reads at a glance
                ax.plot(xs, ys, BACKEND_STYLE.get(backend, "-"), marker="o", ms=4, label=label,
                        color="k" if config == "adamw" else f"C{configs.index(config) % 10}",
                        alpha=0.6 if backend == "torch_foreach" else 1.0)
            if key == "gbps":
                bw = result["copy_bandwidth"]["gbps" if result["args"]["stat"] == "median" else "gbps_min_time"]
                ax.axhline(bw, color="k", lw=1, ls=":", label="copy_ bandwidth")
            else:
                ax.axhline(1.0, color="k", lw=1, ls=":")
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("parameters (elements)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"layout={layout}, {result['args']['dtype']}, {result['meta']['device']}, "
                         f"{result['args']['stat']} time", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _plain_log_ticks(ax) -> None:
    """Log y axis labelled 0.01, 0.02, 0.05, 0.1, ... instead of powers of ten."""
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_curves(runs: dict[str, dict], title: str, path: str) -> None:
    """Train (dashed) and val (solid) loss against step, one colour per optimizer."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, run) in enumerate(runs.items()):
        col = f"C{i}"
        h = run["history"]
        ax.plot(h["step"], h["train"], "--", color=col, alpha=0.7)
        ax.plot(h["step"], h["val"], "-", color=col, label=f"{name} (val {h['val'][-1]:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (dashed: train, solid: val)")
    ax.set_title(title)
    ax.set_yscale("log")  # losses span decades on digits; plain numbers on the ticks
    _plain_log_ticks(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coefficients(trajs: dict[str, dict[str, list[float]]], path: str, title: str, relative: bool = False) -> None:
    """One panel per coefficient; one line per run (trajs: run name -> {coef: values per step}).
    relative: plot the change from the starting value (starts far apart would hide small moves)."""
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    for ax, coef in zip(axes.flat, COEFS):
        for i, (name, tr) in enumerate(trajs.items()):
            ys = np.asarray(tr[coef]) - (tr[coef][0] if relative and tr[coef] else 0.0)
            ax.plot(np.arange(1, len(ys) + 1), ys, color=plt.cm.tab20(i % 20), label=name, lw=1.2)
        ax.set_title(f"{coef} - start" if relative else coef)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(b1s: list[float], b2s: list[float], vals: dict[str, np.ndarray], path: str, title: str) -> None:
    """Top row: final val loss over the (beta1, beta2) start grid, one shared colour scale.
    Bottom row: each later optimizer's loss relative to the first one (the baseline), in %."""
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in vals.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    names = list(vals)
    base = vals[names[0]]
    rels = {n: 100 * (vals[n] / base - 1) for n in names[1:]}
    lim = max([1.0] + [float(np.nanmax(np.abs(r))) for r in rels.values() if np.isfinite(r).any()])
    nrow = 2 if rels else 1
    fig, axes = plt.subplots(nrow, len(names), figsize=(4.6 * len(names), 4.0 * nrow), squeeze=False)
    panels = [(axes[0][j], n, vals[n], "viridis_r", vmin, vmax, "{:.3f}") for j, n in enumerate(names)]
    panels += [(axes[1][j + 1], f"{n} vs {names[0]}, % (<0: {n} lower)", r, "RdBu_r", -lim, lim, "{:+.1f}")
               for j, (n, r) in enumerate(rels.items())]
    if rels:
        axes[1][0].axis("off")
    for ax, name, v, cmap, lo, hi, f in panels:
        im = ax.imshow(v, origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        for (i, j), x in np.ndenumerate(v):
            r, g, b, _ = im.cmap(im.norm(x)) if math.isfinite(x) else (1, 1, 1, 1)
            ax.text(j, i, f.format(x) if math.isfinite(x) else "diverged", ha="center", va="center", fontsize=8,
                    color="w" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "k")  # readable on any cell
        ax.set_xticks(range(len(b2s)), [str(b) for b in b2s])
        ax.set_yticks(range(len(b1s)), [str(b) for b in b1s])
        ax.set_xlabel("starting beta2")
        ax.set_ylabel("starting beta1")
        ax.set_title(name, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_sweep(lrs: list[float], finals: dict[str, list[float]], path: str, title: str,
                  sds: dict[str, list[float]] | None = None) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, ys in finals.items():
        ax.errorbar(lrs, ys, yerr=(sds or {}).get(name), marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final val loss (mean +- sd over seeds)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
