"""PNG plots of the experiment matrix, and the one way every plot of the project is drawn and saved.

Every `plot_*` function takes typed rows (common.matrix.read_matrix; prune/plots.py draws the pruning sweep
with the same helpers), a path and a footer line naming what produced it (`footer_text`), writes the PNG
atomically and returns the path, or returns None without writing anything when its data is absent (a report
then says "not measured").
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

from .files import atomic_write_bytes
from .matrix import row_label
from common.units import finite, sig3

__all__ = ["footer_text", "pyplot", "save_figure", "plot_snr", "plot_size", "plot_latency", "plot_granularity",
           "plot_calibration", "STUDY_W8_BAND_DB", "GOAL_SNR_DB"]

STUDY_W8_BAND_DB = (22.0, 24.0)   # dB, the earlier study's W8 SNR against FP32
GOAL_SNR_DB = 30.0                # dB, this project's target for W8A8
GRAN_COLORS = {"per-channel": "#3b6fb6", "per-tensor": "#e08a2c", "n/a": "#888888"}
FOOTER_PT = 7                     # footer font size, points
DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def footer_text(meta: dict | None, source: str = "") -> str:
    """'command · checkpoint (sha) · commit · machine · date' from a meta.json dict; says so when it is missing."""
    if not meta:
        return f"provenance not recorded (no meta.json){' · ' + source if source else ''}"
    ck = Path(meta.get("checkpoint") or "?").name
    sha = (meta.get("checkpoint_sha256") or "")[:10]
    commit = (meta.get("commit") or "unknown")[:10] + ("+dirty" if meta.get("commit_dirty") else "")
    m = meta.get("machine") or {}
    isa = f" ({m['isa']})" if isinstance(m, dict) and m.get("isa") else ""
    machine = f"{m.get('cpu', '?')}{isa}, {m.get('cores', '?')} cores" if isinstance(m, dict) else str(m)
    parts = [f"command: {meta.get('command', '?')}", f"checkpoint: {ck}" + (f" (sha256 {sha})" if sha else ""),
             f"data: {meta['eval_subset']}" if meta.get("eval_subset") else "", f"commit {commit}",
             f"machine: {machine}", str(meta.get("date") or "")]
    return " · ".join(p for p in parts if p)


def save_figure(fig, path, footer: str) -> Path:
    """Footer under the axes (wrapped to the figure width), then PNG bytes written atomically."""
    plt = pyplot()
    w, h = fig.get_size_inches()
    lines = textwrap.wrap(footer, width=int(w * 72 / (FOOTER_PT * 0.62)))   # DejaVu Sans: <= ~0.62 em per char
    band = (len(lines) * FOOTER_PT * 1.35 + 8) / 72 / h                    # figure fraction for the footer
    fig.tight_layout(rect=(0, band, 1, 1))
    fig.text(0.005, 0.005, "\n".join(lines), fontsize=FOOTER_PT, color="#555555", ha="left", va="bottom")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path)


def _width(n: int) -> float:
    return min(18.0, max(6.5, 0.75 * n + 2.0))   # inches for n bar groups


def _xticks(ax, rows):
    """One word a line: a long config name ("W8A16 static", "W16A32 (fp16)", "W8A8-dynamic") would run into its
    neighbours' labels."""
    ax.set_xticks(range(len(rows)), [row_label(r, "\n").replace(" ", "\n").replace("-dynamic", "\ndynamic")
                                     for r in rows], fontsize=7)


def _bar_chart_done(fig, ax, rows, ylabel: str, title: str, path, footer: str) -> Path:
    """One bar group per configuration: labels, legend and grid, then the figure saved."""
    _xticks(ax, rows)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, footer)


def plot_snr(rows: list[dict], path, footer: str) -> Path | None:
    """SNR per configuration, grouped and coloured by granularity, with the study's W8 band and the goal."""
    order = {"per-channel": 0, "per-tensor": 1}
    rows = sorted((r for r in rows if finite(r.get("snr_db"))), key=lambda r: order.get(r.get("granularity"), 2))
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(_width(len(rows)), 4.6))
    colors = [GRAN_COLORS.get(r.get("granularity"), "#888888") for r in rows]
    bars = ax.bar(range(len(rows)), [r["snr_db"] for r in rows], color=colors)
    ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    lo, hi = STUDY_W8_BAND_DB
    ax.axhspan(lo, hi, color="#2a9d55", alpha=0.18, zorder=0, label=f"earlier study, W8: {lo:g}–{hi:g} dB")
    ax.axhline(GOAL_SNR_DB, color="#c0392b", ls="--", lw=1.2, label=f"goal: {GOAL_SNR_DB:g} dB")
    for g, c in GRAN_COLORS.items():
        if any(r.get("granularity") == g for r in rows):
            ax.bar([0], [0], color=c, label=f"weights {g}")
    ax.set_ylim(min(0.0, min(r["snr_db"] for r in rows) - 2), max(GOAL_SNR_DB, max(r["snr_db"] for r in rows)) * 1.1)
    _xticks(ax, rows)
    ax.set_ylabel("SNR of the logits against FP32 (dB)")
    ax.set_title("Output SNR per configuration (higher is closer to FP32)", pad=26)
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, footer)


def plot_size(rows: list[dict], path, footer: str) -> Path | None:
    """Weight bytes, .tflite bytes and gzipped .tflite bytes per configuration (MB; log scale if wide)."""
    cols = [("weight_bytes", "weights", "#7a8fa6"), ("file_bytes", ".tflite file", "#3b6fb6"),
            ("gzip_bytes", ".tflite gzip -9", "#2a9d55")]
    rows = [r for r in rows if any(finite(r.get(c)) for c, _, _ in cols)]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(_width(len(rows)), 4.4))
    vals = [r.get(c) for r in rows for c, _, _ in cols if finite(r.get(c)) and r.get(c) > 0]
    for i, (c, name, color) in enumerate(cols):
        xs = [k + (i - 1) * 0.27 for k, r in enumerate(rows) if finite(r.get(c))]
        ys = [r[c] / 1e6 for r in rows if finite(r.get(c))]
        if xs:
            bars = ax.bar(xs, ys, width=0.27, color=color, label=name)
            ax.bar_label(bars, labels=[f"{y:.2f}" if y >= 0.1 else sig3(y) for y in ys], fontsize=6, padding=1)
    if vals and max(vals) / min(vals) > 30:
        ax.set_yscale("log")
    return _bar_chart_done(fig, ax, rows, "size (MB, 1 MB = 10⁶ bytes)", "Model size per configuration", path, footer)


def plot_latency(rows: list[dict], path, footer: str) -> Path | None:
    """Host median latency with p5–p95 bars; the phone's latency beside it where measured."""
    rows = [r for r in rows if finite(r.get("host_ms_median")) or finite(r.get("device_ms"))]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(_width(len(rows)), 4.4))
    host = [(k, r) for k, r in enumerate(rows) if finite(r.get("host_ms_median"))]
    dev = [(k, r) for k, r in enumerate(rows) if finite(r.get("device_ms"))]
    off = 0.2 if dev else 0.0
    if host:
        med = [r["host_ms_median"] for _, r in host]
        lo = [r["host_ms_median"] - r["host_ms_p5"] if finite(r.get("host_ms_p5")) else 0.0 for _, r in host]
        hi = [r["host_ms_p95"] - r["host_ms_median"] if finite(r.get("host_ms_p95")) else 0.0 for _, r in host]
        err = [[max(0.0, v) for v in lo], [max(0.0, v) for v in hi]]   # ms below / above the median
        threads = sorted({r.get("host_threads") for _, r in host if r.get("host_threads") is not None})
        bars = ax.bar([k - off for k, _ in host], med, width=0.4 if dev else 0.6, yerr=err, capsize=3,
                      color="#3b6fb6", label=f"host median, p5–p95 ({'/'.join(map(str, threads)) or '?'} thread(s))")
        ax.bar_label(bars, labels=[sig3(v) for v in med], fontsize=6, padding=2)
    if dev:
        names = sorted({r.get("device") or "phone" for _, r in dev})
        bars = ax.bar([k + off for k, _ in dev], [r["device_ms"] for _, r in dev], width=0.4, color="#e08a2c",
                      label=f"device: {', '.join(names)}")
        ax.bar_label(bars, labels=[sig3(r["device_ms"]) for _, r in dev], fontsize=6, padding=2)
    return _bar_chart_done(fig, ax, rows, "latency per image (ms)",
                           "Inference latency per configuration (lower is faster)", path, footer)


def _pairs(rows, column, a, b, same):
    first = {tuple(r.get(c) for c in same): r for r in rows if r.get(column) == a}
    return [(first[k], r) for r in rows if r.get(column) == b
            for k in [tuple(r.get(c) for c in same)] if k in first]


def _paired(rows, column, a, b, same, path, footer, title) -> Path | None:
    """Two panels (SNR, top-1): for each config measured both ways, the `a` bar beside the `b` bar."""
    both = lambda x, y, m: finite(x.get(m)) and finite(y.get(m))   # noqa: E731
    pairs = [(x, y) for x, y in _pairs(rows, column, a, b, same) if both(x, y, "snr_db") or both(x, y, "top1")]
    if not pairs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(min(18.0, 1.6 * len(pairs) + 5.0), 4.4))
    labels = [" ".join(str(x.get(c)) for c in same if x.get(c) not in (None, "n/a", "fp32")) for x, _ in pairs]
    for ax, metric, scale, unit in ((axes[0], "snr_db", 1, "SNR against FP32 (dB)"),
                                    (axes[1], "top1", 100, "top-1 accuracy (%)")):
        for i, (name, color) in enumerate(((a, "#3b6fb6"), (b, "#e08a2c"))):
            pts = [(k, p[i][metric] * scale) for k, p in enumerate(pairs) if finite(p[i].get(metric))]
            if pts:
                bars = ax.bar([k + (i - 0.5) * 0.36 for k, _ in pts], [v for _, v in pts], width=0.36,
                              color=color, label=name)
                ax.bar_label(bars, fmt="%.1f" if metric == "snr_db" else "%.2f", fontsize=6, padding=1)
        ax.set_xticks(range(len(pairs)), [textwrap.fill(s, 14, break_on_hyphens=False) for s in labels], fontsize=7)
        ax.set_xlim(-0.7, len(pairs) - 0.3)     # a lone pair keeps bar widths of a pair among several
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, footer)


def plot_granularity(rows: list[dict], path, footer: str) -> Path | None:
    return _paired(rows, "granularity", "per-channel", "per-tensor", ("config", "calib", "method"), path, footer,
                   "Per-channel against per-tensor weight scales (same config, calibration, method)")


def plot_calibration(rows: list[dict], path, footer: str) -> Path | None:
    return _paired(rows, "calib", "real", "random", ("config", "granularity", "method"), path, footer,
                   "Real against random calibration images (same config, granularity, method)")
