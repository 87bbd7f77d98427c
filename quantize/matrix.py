"""The quantization study: every recipe x weight granularity x calibration data, plus the advanced PTQ methods.

    rows                                       granularity              calibration
    FP32                                       n/a                      n/a
    W8A32, W4A32 (weight-only)                 per-channel, per-tensor  n/a (no activation ranges)
    W16A32 (fp16): half-precision weights      n/a (no scales)          n/a
    W8A16 static (static int16 file)           per-channel, per-tensor  n/a (the simulation's int16 ranges are
                                                                        per sample; export calibrates static ones)
    W8A8-dynamic (dynamic range, the study's   per-channel (LiteRT's    n/a (ranges taken at run time)
    "W8A16 dynamic"; AEQ dynamic_wi8_afp32)    hybrid depthwise needs it)
    W8A8, W4A8                                 per-channel, per-tensor  real, random
    W8A8 per-tensor + CLE / + bias corr. / + both, W4A8 per-tensor + CLE + bias corr.           real
    W4A8 per-channel + bias corr.; W4A8, W4A32 per-channel + AdaRound; W4A8 + AdaRound + bias corr.  real

The W4 rows keep their depthwise convs at 8 bits (QuantConfig.depthwise_bits); `python -m quantize --dw-bits 4`
makes every weight 4-bit.

This module is the one list of rows and the one way a row's simulation columns are filled; both studies write
the one matrix schema (common.matrix): `python -m quantize --matrix` simulates every row (the file columns stay
empty, export_status "skipped"), `python -m bench matrix` also exports, validates and times each file.

The goal rows run first, AdaRound (the slow ones) last. Each row is written to the CSV atomically as it
finishes and rows already in it are skipped, so an interrupted study resumes where it stopped. FP32 logits of
the evaluation subset are computed once (kept in out/fp32_logits.pt for a resumed run on the same checkpoint and
subset).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from common.files import sha256_file
from common.matrix import done_keys, read_matrix, row_key, write_matrix_row
from common.plots import footer_text, plot_snr
from common.provenance import collect_meta, command_line, read_meta, write_meta
from mobilenet.checkpoint import atomic_save
from mobilenet.engine import predict

from .config import QuantConfig, recipe
from .metrics import evaluate_quantized

__all__ = ["matrix_rows", "method_of", "study_key", "row_id", "sim_columns", "fp32_logits", "run_matrix"]

SKIPPED_NOTE = "simulation only (python -m quantize --matrix); python -m bench matrix exports and times every row"


def method_of(q: QuantConfig) -> str:
    """The matrix's method column: fp32, rtn (round to nearest), or the PTQ extras joined by '+'."""
    if q.is_float:
        return "fp32"
    extras = [n for n, on in (("adaround", q.adaround), ("cle", q.cle), ("bc", q.bias_correction)) if on]
    return "+".join(extras) or "rtn"


def study_key(q: QuantConfig, method: str | None = None) -> dict:
    """The row's key columns (config, granularity, calib, method); weight-only and dynamic rows have no
    calibration, FP32 no granularity."""
    return {"config": q.label, "granularity": "n/a" if q.w_bits is None or q.fp16_weights else q.granularity,
            "calib": q.calib if q.act_mode == "static" else "n/a", "method": method or method_of(q)}


def row_id(q: QuantConfig) -> str:
    return " ".join(study_key(q).values())


def sim_columns(q: QuantConfig, m: dict) -> dict:
    """The simulation's columns of a row from compare_logits / evaluate_quantized output `m`."""
    return {"w_bits": q.w_bits, "a_bits": q.a_bits, "act_mode": q.act_mode, "top1": m["acc_q"],
            "top1_fp32": m["acc_ref"], "agreement": m["agreement"], "mse": m["mse"], "snr_db": m["snr_db"],
            "weight_bytes": m["weight_bytes"], "eval_images": m["n"]}


def matrix_rows(calib_size: int = 1000, adaround_iters: int = 1000, seed: int = 0) -> list[QuantConfig]:
    """The study's configurations, goal rows first, no duplicates (weight-only rows have no calibration, fp16
    weights no granularity)."""
    kw = dict(calib_size=calib_size, adaround_iters=adaround_iters, seed=seed)
    pt = dict(granularity="per-tensor")
    rows = [recipe("FP32", **kw), recipe("W8A8", **kw),
            recipe("W8A8", cle=True, bias_correction=True, **pt, **kw), recipe("W4A8", **kw),
            recipe("W4A8", bias_correction=True, **kw)]
    for name in ("W8A8", "W4A8", "W8A32", "W16A32", "W4A32", "W8A16", "W8A8-dynamic"):
        for gran in ("per-channel",) if name == "W8A8-dynamic" else ("per-channel", "per-tensor"):
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


def fp32_logits(model, split, out: Path, checkpoint, device="cpu", progress: bool = True) -> torch.Tensor:
    """The FP32 model's logits on `split`, cached in out/fp32_logits.pt under (checkpoint sha256, subset)."""
    tag = [sha256_file(checkpoint) or str(checkpoint), len(split), int(split.labels.sum())]
    cache = out / "fp32_logits.pt"
    try:
        blob = torch.load(cache, weights_only=True) if cache.exists() else None
    except Exception:           # a damaged cache (a run killed in its write, a full disk) is computed again
        blob = None
    if isinstance(blob, dict) and blob.get("tag") == tag and isinstance(blob.get("logits"), torch.Tensor):
        return blob["logits"]
    logits = predict(model, split, model.cfg.layout, device=device, desc="eval fp32", disable_bar=not progress)
    atomic_save({"tag": tag, "logits": logits}, cache)
    return logits


def run_matrix(model, ds, split, cli, out: Path) -> dict:
    """Simulate every row not yet in out/matrix.csv; returns {"csv": path, "png": path, "rows": typed rows}."""
    from .ptq import run_ptq
    csv_path, png_path = out / "matrix.csv", out / "matrix_snr.png"
    meta = collect_meta(command_line(), cli.checkpoint, seed=cli.seed,
                        eval_subset=f"{len(split)} class-stratified test images of {ds.root}")
    write_meta(out / "meta.json", meta)
    ref = fp32_logits(model, split, out, cli.checkpoint, cli.device, cli.progress)
    done = done_keys(csv_path)
    for q in matrix_rows(cli.calib_size, cli.adaround_iters, cli.seed):
        key = study_key(q)
        if row_key(key) in done:
            continue
        print(f"[matrix] {row_id(q)}", flush=True)
        t0 = time.time()
        qm = run_ptq(model, ds, q, device=cli.device, opt_images=cli.opt_images, progress=cli.progress)
        m = evaluate_quantized(qm, ref, split, model.cfg.layout, cli.device, cli.progress)
        write_matrix_row(csv_path, {**key, **sim_columns(q, m), "export_status": "skipped",
                                    "export_note": SKIPPED_NOTE})
        print(f"[matrix] {row_id(q)}: top-1 {100 * m['acc_q']:.2f} % ({100 * (m['acc_q'] - m['acc_ref']):+.2f} "
              f"pts), SNR {m['snr_db']:.2f} dB ({time.time() - t0:.0f} s)", flush=True)
    rows = read_matrix(csv_path)
    plot_snr(rows, png_path, footer_text(read_meta(out / "meta.json")))
    return {"csv": str(csv_path), "png": str(png_path), "rows": rows}
