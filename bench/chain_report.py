"""The chain's report: its FP32 and quantized files as two rows of the matrix schema, then the study report
(bench.study_report) over them and the pruning run, so the chain and the matrix read the same way."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from common.files import atomic_write_text

from common.matrix import write_matrix_row
from common.provenance import collect_meta, write_meta
from common.units import NA

__all__ = ["write_chain_report", "stage_summary"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _host(bench_csv: Path, model: Path) -> dict:
    if not bench_csv.exists():
        return {}
    with open(bench_csv, newline="") as f:
        for r in csv.DictReader(f):
            if Path(r["model"]).name == model.name and r["threads"] == "1" and r["xnnpack"] == "on":
                return {"host_ms_median": r["median_ms"], "host_ms_p5": r["p5_ms"], "host_ms_p95": r["p95_ms"],
                        "host_threads": 1}
    return {}


def _file(tflite: Path) -> dict:
    rep = _json(Path(str(tflite) + ".json"))
    if not rep:
        return {"export_status": "skipped"}
    fs, run = rep["file_summary"], rep["validation"]["runs"]["xnnpack"]
    return {"tflite": str(tflite), "export_status": "ok", "file_bytes": fs["size_bytes"],
            "gzip_bytes": fs["gzip_bytes"], "exact_match": run.get("exact_outputs"), "max_lsb": run.get("max_lsb"),
            "file_agreement": run.get("agreement")}


def _rate(images, seconds):
    return round(images / seconds, 1) if images and seconds else None


def stage_summary(out: Path) -> list[dict]:
    """One row per training stage of the chain: its budget, what it reached in that time, and its precision,
    read back from the files each step wrote."""
    rows = []
    base = _json(out / "baseline" / "metrics.json")
    if base:
        hist, b = base.get("history", []), base.get("budget") or {}
        images, secs = sum(r["train_images"] for r in hist), sum(r["train_seconds"] for r in hist)
        rows.append({"stage": "baseline training", "budget_min": b.get("minutes"),
                     "steps": sum(-(-r["train_images"] // base["config"]["batch_size"]) for r in hist),
                     "images": images, "seconds": round(secs, 1), "images_per_s": _rate(images, secs),
                     "precision": base.get("precision", {}).get("dtype"),
                     "note": f"{b['step_seconds']:.3f} s per step measured before the run" if b else ""})
    pr = _json(out / "prune" / "prune_report.json")
    pc = _json(out / "prune" / "prune_config.json").get("prune_config", {})
    prec = pr.get("precision", {})
    trials = pr.get("sweep_layers_trials")
    if trials:
        skipped = trials["planned"] - trials["run"]
        rows.append({"stage": "per-layer sweep", "budget_min": trials.get("minutes"), "steps": trials["run"],
                     "images": trials["run"] * pc.get("sweep_images", 0), "seconds": None, "images_per_s": None,
                     "precision": prec.get("sweep_bf16", {}).get("dtype"),
                     "note": f"{trials['run']} of {trials['planned']} trials" +
                             (f"; {skipped} skipped by the budget" if skipped else "")})
    ft = pr.get("finetune")
    if ft:
        rows.append({"stage": "fine-tuning", "budget_min": pc.get("budget_minutes") or None, "steps": ft["steps"],
                     "images": ft["images"], "seconds": ft["seconds"], "images_per_s": _rate(ft["images"], ft["seconds"]),
                     "precision": prec.get("bf16", {}).get("dtype"),
                     "note": f"{ft['steps']} of {ft.get('planned_steps', '?')} planned steps"})
    q = _json(out / "quantize" / "metrics.json")
    if q.get("qat"):
        hist, b = q["qat"]["history"], q["qat"]["config"].get("budget") or {}
        images, secs = sum(h["images"] for h in hist), hist[-1]["seconds"] if hist else 0
        rows.append({"stage": "QAT", "budget_min": b.get("minutes"), "steps": sum(h["steps"] for h in hist),
                     "images": images, "seconds": secs, "images_per_s": _rate(images, secs),
                     "precision": q.get("precision", {}).get("dtype"), "note": ""})
    return rows


def stage_blocks(rows: list[dict]) -> list:
    """The chain's training stages: the budget each had, the images and throughput it reached, its precision."""
    def cell(v, fmt="{}"):
        return NA if v is None else fmt.format(v)
    cells = [[r["stage"], cell(r["budget_min"], "{:g} min"), cell(r["steps"]), cell(r["images"]),
              cell(r["seconds"], "{:.0f} s"), cell(r["images_per_s"], "{:.0f}"), r["precision"] or NA, r["note"]]
             for r in rows]
    return [("h2", "Stages: budgets and throughput"),
            ("p", "Each training stage had a wall-clock budget and fitted its work to the speed it measured, so a "
                  "slower machine trains on fewer images rather than for longer."),
            ("table", ["stage", "budget", "steps / trials", "images", "time", "images/s", "precision", "note"],
             cells)]


def write_chain_report(out: Path, command: str, baseline: str) -> tuple[Path, Path]:
    from .study_report import write_report
    out = Path(out)
    q = _json(out / "quantize" / "metrics.json")
    m, qc = q.get("metrics", {}), q.get("quant_config", {})
    bench_csv = out / "bench_host.csv"
    fp32, qfile = out / "model_fp32.tflite", next(out.glob("model_w*.tflite"), None)
    fp_row = {"config": "FP32", "granularity": "n/a", "calib": "n/a", "method": "fp32", "act_mode": "none",
              "top1": m.get("acc_ref"), "top1_fp32": m.get("acc_ref"), "agreement": 1.0, "mse": 0.0,
              "snr_db": float("inf"), "weight_bytes": m.get("fp32_weight_bytes"), "eval_images": m.get("n")}
    fp_row.update(_file(fp32))
    fp_row.update(_host(bench_csv, fp32))
    write_matrix_row(out / "matrix.csv", fp_row)
    if qc and qfile is not None:
        static = qc.get("act_mode") == "static"
        method = "qat" if q.get("cli", {}).get("qat") else "rtn"
        row = {"config": qc["name"], "w_bits": qc.get("w_bits"), "a_bits": qc.get("a_bits"),
               "act_mode": qc.get("act_mode"), "granularity": qc.get("granularity"),
               "calib": qc.get("calib") if static else "n/a", "method": method,
               "top1": m.get("acc_q"), "top1_fp32": m.get("acc_ref"), "agreement": m.get("agreement"),
               "mse": m.get("mse"), "snr_db": m.get("snr_db"), "weight_bytes": m.get("weight_bytes"),
               "eval_images": m.get("n")}
        row.update(_file(qfile))
        row.update(_host(bench_csv, qfile))
        write_matrix_row(out / "matrix.csv", row)
    write_meta(out / "meta.json", collect_meta(command, baseline,
                                               eval_subset=f"{m.get('n', '?')} test images (stratified) of "
                                                           f"{q.get('data', {}).get('root', '?')}"))
    stages = stage_summary(out)
    atomic_write_text(json.dumps(stages, indent=2) + "\n", out / "stages.json")
    return write_report(out, prune_dir=out / "prune", title="mnv2-compress: the whole chain",
                        extra=stage_blocks(stages))
