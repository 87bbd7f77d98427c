"""PNG plots of the sensitivity sweep: accuracy against global ratio, and a layer x ratio heat map of the drop."""
from __future__ import annotations

import io

from mobilenet.checkpoint import atomic_write_bytes

__all__ = ["plot_global_sweep", "plot_layer_heatmap"]


def _save(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(buf.getvalue(), path)


def plot_global_sweep(rows: list[dict], path, title: str = "Global L1 pruning, no fine-tuning") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(rows, key=lambda r: float(r["ratio"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([100 * float(r["reached_sparsity"]) for r in rows], [100 * float(r["acc"]) for r in rows], "o-")
    for r in rows:
        ax.annotate(f"{100 * float(r['acc']):.1f}", (100 * float(r["reached_sparsity"]), 100 * float(r["acc"])),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("global sparsity reached (%)")
    ax.set_ylabel(f"top-1 accuracy (%) on {rows[0]['images']} test images")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_layer_heatmap(rows: list[dict], path, title: str = "Per-layer pruning: accuracy drop (points)") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["layer"] != "(none)"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    ratios = sorted({float(r["ratio"]) for r in rows})
    grid = [[float("nan")] * len(ratios) for _ in layers]
    for r in rows:
        grid[layers.index(r["layer"])][ratios.index(float(r["ratio"]))] = float(r["drop_points"])
    fig, ax = plt.subplots(figsize=(1.2 * len(ratios) + 4, 0.22 * len(layers) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=0)
    ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
    kinds = {r["layer"]: r["kind"] for r in rows}
    ax.set_yticks(range(len(layers)), [f"{n} ({kinds[n]})" for n in layers], fontsize=6)
    ax.set_xlabel("fraction of the layer's weights pruned")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy drop (points)")
    _save(fig, path)
    plt.close(fig)
