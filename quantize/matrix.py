"""The quantization study: every recipe x weight granularity x calibration data, plus the advanced PTQ methods,
one CSV row each (`python -m quantize --matrix`).

    rows                                       granularity              calibration
    FP32                                       n/a                      n/a
    W8A32, W16A32, W4A32 (weight-only)         per-channel, per-tensor  n/a (no activation ranges)
    W8A16 dynamic                              per-channel, per-tensor  n/a (ranges taken at run time)
    W8A8, W4A8                                 per-channel, per-tensor  real, random
    W8A8 per-tensor + CLE / + bias corr. / + both, W4A8 per-tensor + CLE + bias corr.           real
    W4A8 per-channel + bias corr.; W4A8, W4A32 per-channel + AdaRound; W4A8 + AdaRound + bias corr.  real

The goal rows run first, AdaRound (the slow ones) last. The CSV is rewritten atomically after every row, and rows already in it are skipped, so
an interrupted study resumes where it stopped. FP32 logits of the evaluation subset are computed once (and kept
in out/fp32_logits.pt for a resumed run on the same checkpoint and subset).
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mobilenet.checkpoint import atomic_save, atomic_write_bytes, atomic_write_text
from mobilenet.engine import predict

from .config import QuantConfig, recipe
from .metrics import weight_size_bytes

__all__ = ["matrix_rows", "row_id", "run_matrix", "read_rows", "plot_snr", "COLUMNS"]

COLUMNS = ["row", "config", "w_bits", "a_bits", "act_mode", "granularity", "calib", "methods", "acc_fp32", "acc_q",
           "delta_points", "agreement", "mse", "snr_db", "weight_bytes", "size_ratio", "n_eval", "quantize_s",
           "eval_s"]


def _methods(q: QuantConfig) -> str:
    m = [n for n, on in (("cle", q.cle), ("bias-corr", q.bias_correction), ("adaround", q.adaround)) if on]
    return "+".join(m) if m else "-"


def row_id(q: QuantConfig) -> str:
    gran = q.granularity if q.w_bits is not None else "n/a"
    calib = q.calib if q.act_mode == "static" else "n/a"
    return f"{q.name} {gran} {calib} {_methods(q)}"


def matrix_rows(calib_size: int = 1000, adaround_iters: int = 1000, seed: int = 0) -> list[QuantConfig]:
    """The study's configurations, goal rows first, no duplicates (weight-only rows have no calibration)."""
    kw = dict(calib_size=calib_size, adaround_iters=adaround_iters, seed=seed)
    pt = dict(granularity="per-tensor")
    rows = [recipe("FP32", **kw), recipe("W8A8", **kw),
            recipe("W8A8", cle=True, bias_correction=True, **pt, **kw), recipe("W4A8", **kw),
            recipe("W4A8", bias_correction=True, **kw)]
    for name in ("W8A8", "W4A8", "W8A32", "W16A32", "W4A32", "W8A16"):
        for gran in ("per-channel", "per-tensor"):
            for calib in (("real", "random") if recipe(name).act_mode == "static" else ("real",)):
                rows.append(recipe(name, granularity=gran, calib=calib, **kw))
    rows += [recipe("W8A8", cle=True, **pt, **kw), recipe("W8A8", bias_correction=True, **pt, **kw),
             recipe("W4A8", cle=True, bias_correction=True, **pt, **kw),
             recipe("W4A8", adaround=True, **kw), recipe("W4A32", adaround=True, **kw),
             recipe("W4A8", adaround=True, bias_correction=True, **kw)]
    seen, out = set(), []
    for q in rows:
        if row_id(q) not in seen:
            seen.add(row_id(q))
            out.append(q)
    return out


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict]):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def _fp32_logits(model, split, layout, out: Path, cli) -> torch.Tensor:
    key = {"checkpoint": str(Path(cli.checkpoint).resolve()), "n": len(split),
           "labels_sum": int(split.labels.sum()), "first_pixels": split.images[:4].float().sum().item()}
    cache = out / "fp32_logits.pt"
    try:
        blob = torch.load(cache, weights_only=True) if cache.exists() else None
    except Exception:           # a damaged cache (a run killed in its write, a full disk) is computed again
        blob = None
    if isinstance(blob, dict) and blob.get("key") == key and isinstance(blob.get("logits"), torch.Tensor):
        return blob["logits"]
    logits = predict(model, split, layout, device=cli.device, desc="eval fp32", disable_bar=not cli.progress)
    atomic_save({"key": key, "logits": logits}, cache)
    return logits


def run_matrix(model, ds, split, cli, out: Path) -> dict:
    """Run every row not yet in out/matrix.csv; returns {"csv": path, "png": path, "rows": all rows}."""
    from .__main__ import evaluate_quantized
    from .ptq import run_ptq
    csv_path, png_path = out / "matrix.csv", out / "matrix_snr.png"
    rows = read_rows(csv_path)
    done = {r["row"] for r in rows}
    layout = model.cfg.layout
    ref = _fp32_logits(model, split, layout, out, cli)
    fp32_bytes = weight_size_bytes(model, 32)
    for q in matrix_rows(cli.calib_size, cli.adaround_iters, cli.seed):
        rid = row_id(q)
        if rid in done:
            continue
        print(f"[matrix] {rid}", flush=True)
        t0 = time.time()
        qm = run_ptq(model, ds, q, device=cli.device, opt_images=cli.opt_images, progress=cli.progress)
        qs = time.time() - t0
        m = evaluate_quantized(qm, ref, split, layout, cli.device, cli.progress)
        rows.append({"row": rid, "config": q.name, "w_bits": q.w_bits or 32, "a_bits": q.a_bits or 32,
                     "act_mode": q.act_mode, "granularity": q.granularity if q.w_bits else "n/a",
                     "calib": q.calib if q.act_mode == "static" else "n/a", "methods": _methods(q),
                     "acc_fp32": f"{m['acc_ref']:.4f}", "acc_q": f"{m['acc_q']:.4f}",
                     "delta_points": f"{100 * (m['acc_q'] - m['acc_ref']):+.2f}",
                     "agreement": f"{m['agreement']:.4f}", "mse": f"{m['mse']:.3g}", "snr_db": f"{m['snr_db']:.2f}",
                     "weight_bytes": m["weight_bytes"], "size_ratio": f"{fp32_bytes / m['weight_bytes']:.2f}",
                     "n_eval": m["n"], "quantize_s": f"{qs:.0f}", "eval_s": f"{m['eval_seconds']:.0f}"})
        _write_rows(csv_path, rows)
        print(f"[matrix] {rid}: top-1 {rows[-1]['acc_q']} ({rows[-1]['delta_points']} pts), "
              f"SNR {rows[-1]['snr_db']} dB", flush=True)
    plot_snr(rows, png_path)
    return {"csv": str(csv_path), "png": str(png_path), "rows": rows, "cli": asdict(cli)}


def plot_snr(rows: list[dict], path: Path):
    """Horizontal bars of logits SNR (dB) per configuration; FP32 (infinite) is left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [(r["row"], float(r["snr_db"])) for r in rows if math.isfinite(float(r["snr_db"]))]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(pts) + 1.2))
    ax.barh([p[0] for p in pts][::-1], [p[1] for p in pts][::-1], color="tab:blue")
    ax.axvline(30.0, color="tab:red", lw=1, ls="--", label="30 dB goal (W8A8 per-channel)")
    ax.set_xlabel("logits SNR vs FP32 (dB)")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)
