"""The chain's report: its FP32 and quantized files as two rows of the matrix schema, then the study report
(bench.study_report) over them and the pruning run, so the chain and the matrix read the same way."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .results import collect_meta, write_matrix_row, write_meta

__all__ = ["write_chain_report"]


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
                                               eval_subset=f"{m.get('n', '?')} CIFAR-10 test images (stratified)"))
    return write_report(out, prune_dir=out / "prune", title="mnv2-compress: the whole chain on CIFAR-10")
