"""PNG plots of the pruning run: the global sweep, the per-layer heat map, accuracy against sparsity.

Drawn by `python -m prune` beside its CSVs and again by bench's report, from typed rows (prune.sweep's rows,
or `read_sweep_rows` of the CSVs), with a footer naming what produced them (common.plots.footer_text).
"""
from __future__ import annotations

import math
from pathlib import Path

from common.plots import pyplot, save_figure
from common.units import finite

__all__ = ["plot_prune_sweep", "plot_prune_layers", "plot_accuracy_sparsity"]


def plot_prune_sweep(global_rows: list[dict], path, footer: str) -> Path | None:
    """Top-1 against the global pruning ratio, no fine-tuning (prune/sweep.py's sweep_global.csv)."""
    rows = sorted((r for r in global_rows if finite(r.get("ratio")) and finite(r.get("acc"))),
                  key=lambda r: r["ratio"])
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([r["ratio"] for r in rows], [100 * r["acc"] for r in rows], "o-", color="#3b6fb6")
    for r in rows:
        ax.annotate(f"{100 * r['acc']:.2f}", (r["ratio"], 100 * r["acc"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7)
    ax.margins(y=0.12)      # room for the labels above the highest point
    images = {r.get("images") for r in rows} - {None}
    ax.set_xlabel("global L1 pruning ratio (fraction of weights set to zero)")
    ax.set_ylabel(f"top-1 (%) on {'/'.join(map(str, sorted(images))) or '?'} test images")
    ax.set_title("Pruning sensitivity: global ratio, no fine-tuning")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, footer)


def plot_prune_layers(layer_rows: list[dict], path, footer: str) -> Path | None:
    """Heat map of the accuracy drop (points) with one layer pruned alone: layers down, ratios across."""
    rows = [r for r in layer_rows if r.get("layer") not in (None, "(none)") and finite(r.get("ratio"))
            and finite(r.get("drop_points"))]
    if not rows:
        return None
    plt = pyplot()
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    ratios = sorted({r["ratio"] for r in rows})
    grid = [[math.nan] * len(ratios) for _ in layers]
    for r in rows:
        grid[layers.index(r["layer"])][ratios.index(r["ratio"])] = r["drop_points"]
    fig, ax = plt.subplots(figsize=(0.9 * len(ratios) + 4.5, 0.2 * len(layers) + 2.0))
    top = max(1.0, max(r["drop_points"] for r in rows))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=0, vmax=top)
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=5.5,
                        color="white" if v > 0.6 * top else "black")
    ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios], fontsize=7)
    kinds = {r["layer"]: r.get("kind") for r in rows}
    ax.set_yticks(range(len(layers)), [f"{n} ({kinds[n]})" if kinds.get(n) not in (None, "-") else n
                                       for n in layers], fontsize=6)
    ax.set_xlabel("fraction of the layer's weights pruned (others dense)")
    ax.set_title("Per-layer sensitivity: top-1 drop in points", fontsize=9)
    fig.colorbar(im, ax=ax, label="top-1 drop (points)", fraction=0.05)
    return save_figure(fig, path, footer)


def plot_accuracy_sparsity(global_rows: list[dict], report: dict | None, path, footer: str) -> Path | None:
    """Top-1 against reached sparsity: the sweep (no fine-tuning) and the pruning run before/after fine-tuning."""
    sweep = sorted((r for r in global_rows if finite(r.get("reached_sparsity")) and finite(r.get("acc"))),
                   key=lambda r: r["reached_sparsity"])
    rep = report or {}
    sp = rep.get("global_sparsity")
    points = [(name, rep.get(k)) for k, name in (("acc_pruned", "pruned, before fine-tuning"),
                                                 ("acc_finetuned", "pruned and fine-tuned")) if finite(rep.get(k))]
    if not sweep and not (finite(sp) and points):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if sweep:
        n = {r.get("images") for r in sweep} - {None}
        ax.plot([100 * r["reached_sparsity"] for r in sweep], [100 * r["acc"] for r in sweep], "o-",
                color="#3b6fb6", label=f"sweep, no fine-tuning ({'/'.join(map(str, sorted(n))) or '?'} images)")
    if finite(rep.get("acc_baseline")):
        ax.axhline(100 * rep["acc_baseline"], color="#888888", ls=":", label="baseline (dense)")
    if finite(sp):
        for (name, acc), marker in zip(points, ("s", "*")):
            ax.plot([100 * sp], [100 * acc], marker, ms=10 if marker == "*" else 7,
                    label=f"{name}: {100 * acc:.2f} % ({rep.get('eval_images', '?')} images)")
    ax.set_xlabel("global sparsity reached (% of pruned-layer weights that are zero)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy against sparsity")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, footer)
