"""The experiment matrix: every configuration of the study, quantized, exported where LiteRT runs it, validated,
and timed on the host (and on a phone with --phone), one row of `matrix.csv` each (schema: common.matrix).

    python -m bench matrix --checkpoint ../shared/models/cifar10_mobilenetv2_w1.0.pt --out runs/matrix

Steps per row (a row already in matrix.csv is skipped, so an interrupted run resumes where it stopped; a
quantized checkpoint already written is reloaded rather than recomputed):
    1. PTQ (quantize.ptq.run_ptq) on the calibration split (real) or N(0, 1) images (random)
    2. logits on the evaluation subset against the FP32 logits (quantize.metrics.compare_logits)
    3. export with validation (export.run_export); a configuration LiteRT cannot run is recorded as refused
    4. host latency of the file (bench.host.run_host); on a phone too with --phone
Finally the report (bench.study_report) is written from the CSV.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from common.cli import DATA_MODE_HELP, EVAL_IMAGES_HELP, MEMORY_BUDGET_HELP, RESOLUTION_HELP
from common.files import remove_stale_temporaries
from common.matrix import done_keys, row_key, write_matrix_row
from common.provenance import collect_meta, read_meta, write_meta
from mobilenet.checkpoint import CheckpointError, load_model
from mobilenet.data import DEFAULT_DATA, DataConfig, load_dataset
from mobilenet.engine import predict
from mobilenet.model import with_resolution
from quantize.config import QuantConfig
from quantize.matrix import fp32_logits, matrix_rows, method_of, sim_columns, study_key

__all__ = ["MatrixConfig", "study_rows", "run_matrix", "row_name", "w4_note"]

_RUN_KEYS = ("command", "commit", "commit_dirty", "date")
_SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
REFERENCE = str(_SHARED / "models" / "cifar10_mobilenetv2_w1.0.pt")


@dataclass
class MatrixConfig:
    checkpoint: str = field(default="", metadata={
        "help": "FP32 or pruned checkpoint (matrix default: the CIFAR-10 reference in ../shared/models)"})
    out: str = field(default="", metadata={"help": "results directory (matrix default: runs/matrix)"})
    data: str = field(default=DEFAULT_DATA, metadata={"help": "CIFAR-10 JPEG archive or ImageFolder tree"})
    data_mode: str = field(default="auto", metadata={"help": DATA_MODE_HELP})
    memory_budget: float = field(default=0.25, metadata={"help": MEMORY_BUDGET_HELP})
    eval_images: int = field(default=2000, metadata={"help": EVAL_IMAGES_HELP})
    resolution: int | None = field(default=None, metadata={"help": RESOLUTION_HELP})
    calib_size: int = field(default=1000, metadata={"help": "calibration images (real: from the train split)"})
    adaround_iters: int = field(default=300, metadata={"help": "AdaRound optimizer steps per layer"})
    val_images: int = field(default=1000, metadata={"help": "test images run through each file and the simulation"})
    reported_images: int = field(default=200, metadata={
        "help": "int8 files: images for the reported-only comparison with the float64 fake-quant simulation "
                "(~100 ms per image; the gate, file vs integer simulation, uses all --val-images)"})
    host_runs: int = field(default=50, metadata={"help": "timed inferences per file on the host"})
    threads: list[int] = field(default_factory=lambda: [1], metadata={
        "help": "interpreter threads for the host timing (the matrix uses the first)"})
    only: str = field(default="", metadata={"help": "comma-separated config names to run, e.g. FP32,W8A8"})
    quick: bool = field(default=False, metadata={
        "help": "W8A8 and W4A8 per channel on real data plus FP32 only (a smoke run of the whole matrix)"})
    phone: bool = field(default=False, metadata={"help": "also time every file on a phone over adb"})
    serial: str | None = field(default=None, metadata={"help": "phone serial (with --phone)"})
    benchmark_binary: str | None = field(default=None, metadata={"help": "benchmark_model for the phone"})
    prune_dir: str = field(default="", metadata={"help": "a pruning run directory to include in the report"})
    peers: bool = field(default=False, metadata={
        "help": "also make ai-edge-quantizer's file for every row it has a recipe for, from our FP32 file and the "
                "same calibration images, and measure both files the same way (pip install -e .[peers])"})
    retime: int = field(default=0, metadata={
        "help": "time every exported file of the finished matrix again in N rounds, files interleaved, and "
                "replace the host latency columns (for a matrix that ran on a busy machine); 0 = no"})


def study_rows(calib_size: int, adaround_iters: int) -> list[tuple[QuantConfig, str]]:
    """(config, method) for every row of the study, from quantize's own list."""
    return [(q, method_of(q)) for q in matrix_rows(calib_size=calib_size, adaround_iters=adaround_iters)]


def row_name(key: dict) -> str:
    parts = [key["config"], key["granularity"], key["calib"], key["method"]]
    return "_".join(p.replace("/", "").replace("+", "-").replace(" (", "-").replace(")", "").replace(" ", "-")
                    for p in parts if p not in ("n/a", "rtn", "fp32"))


def _quantize(model, dataset, qcfg: QuantConfig, path: Path):
    """The frozen simulation for qcfg, reloaded from `path` if an earlier run saved it."""
    from quantize.io import load_quantized, save_quantized
    from quantize.ptq import run_ptq
    if path.exists():
        try:
            return load_quantized(str(path))[0]
        except CheckpointError:
            path.unlink()
    qm = run_ptq(model, dataset, qcfg, progress=False)
    save_quantized(str(path), qm, {"ptq_report": getattr(qm, "ptq_report", {})})
    return qm


def w4_note(storage: dict[str, str] | None) -> str:
    """The matrix row's account of its weights when some are 4-bit (export/int4.py), e.g. "weights: 35 int4 packed
    (builtin CONV_2D), 17 int8 (8-bit weights), 1 int4 packed (XNNPACK FULLY_CONNECTED)"; empty for other rows."""
    if not storage:
        return ""
    counts = Counter(storage.values())
    return "weights: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda c: -c[1]))


def _export(cfg: MatrixConfig, qcfg: QuantConfig, ckpt: Path, tfl: Path) -> dict:
    from export import ExportConfig, ExportError, export_kind, run_export
    try:
        export_kind(qcfg)
    except ExportError as e:
        return {"export_status": "refused", "export_note": str(e).splitlines()[0]}
    try:
        rep = run_export(ExportConfig(checkpoint=str(ckpt), out=str(tfl), data=cfg.data,
                                      val_images=cfg.val_images, skip_builtin=True, data_mode=cfg.data_mode,
                                      memory_budget=cfg.memory_budget, reported_images=cfg.reported_images))
    except ExportError as e:
        return {"export_status": "failed", "export_note": str(e).splitlines()[0]}
    v = rep["validation"]["runs"]["xnnpack"]
    fs = rep["file_summary"]
    note = w4_note(rep["graph"].get("w4_storage"))
    if qcfg.act_mode == "dynamic":
        note = ("static int16 ranges (LiteRT has no dynamic int16 path)" if qcfg.a_bits == 16 else
                "dynamic range: int8 weights, activations quantized to int8 per run by the hybrid kernels (the "
                "study's W8A16 dynamic; LiteRT has no 16-bit run-time path); max |logit diff| "
                f"{v['max_abs_diff']:.3g} vs simulation")
    return {"export_status": "ok", "export_note": note, "tflite": str(tfl),
            "file_bytes": fs["size_bytes"], "gzip_bytes": fs["gzip_bytes"],
            "exact_match": v.get("exact_outputs"), "max_lsb": v.get("max_lsb"),
            "file_agreement": v.get("agreement")}


def _host(cfg: MatrixConfig, tfl: str) -> dict:
    from .host import HostConfig, run_host
    r = run_host(HostConfig(models=[tfl], threads=cfg.threads[:1], xnnpack=[True], runs=cfg.host_runs))[0]
    return {"host_ms_median": r["median_ms"], "host_ms_p5": r["p5_ms"], "host_ms_p95": r["p95_ms"],
            "host_threads": cfg.threads[0]}


def _device(cfg: MatrixConfig, tfl: str, out: Path) -> dict:
    from .device import DeviceConfig, run_device
    rows = run_device(DeviceConfig(models=[tfl], serial=cfg.serial, benchmark_binary=cfg.benchmark_binary,
                                   csv=str(out / "device.csv")), log_dir=str(out / "device_logs"))
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return {}
    return {"device_ms": ok[0].get("inference_avg_ms"), "device": ok[0].get("device")}


def _peers(cfg: MatrixConfig, rows, out: Path, dataset, eval_split, ref, model) -> None:
    """AEQ's file beside ours for every exported row it has a recipe for (bench.peers)."""
    from common.matrix import read_matrix
    from quantize.ptq import calibration_images
    from .peers import peer_recipe, run_peers
    made = {row_key(r): r for r in read_matrix(out / "matrix.csv")}
    fp32 = next((r["tflite"] for r in made.values() if r.get("method") == "fp32" and r.get("tflite")), None)
    if fp32 is None:
        print("peers: the matrix has no FP32 file to give ai-edge-quantizer; run it with FP32 among the rows")
        return
    pairs = []
    for q, m in rows:
        r = made.get(row_key(study_key(q, m)), {})
        if peer_recipe(q, m) and r.get("export_status") == "ok":
            pairs.append((q, " ".join(study_key(q, m).values()), r["tflite"]))
    calib = calibration_images(dataset, QuantConfig(calib="real"), cfg.calib_size, model.cfg.input_size)
    run_peers(pairs, fp32, calib, eval_split, ref, model.cfg.layout, out, cfg.host_runs)


def load_all_modules():
    """Import every module of the project now. A run of an hour must not reach a lazy import after the
    working tree has changed and load code that does not fit what it already holds."""
    import importlib
    import pkgutil
    for pkg in ("mobilenet", "prune", "quantize", "export", "bench"):
        for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
            if m.name != "__main__":
                importlib.import_module(f"{pkg}.{m.name}")


def retime_matrix(cfg: MatrixConfig, command: str | None = None) -> Path:
    """Host latency of every exported file of a finished matrix, measured again in one pass: `cfg.retime`
    rounds, each timing all files one after the other (so drift on a shared machine hits them alike); a row's
    median / p5 / p95 become the medians over rounds of its per-round figures. Other columns are untouched."""
    import statistics
    from .host import HostConfig, run_host
    from common.matrix import read_matrix
    out = Path(cfg.out or "runs/matrix")
    csv_path = out / "matrix.csv"
    rows = [r for r in read_matrix(csv_path) if r.get("tflite") and Path(r["tflite"]).is_file()]
    if not rows:
        raise ValueError(f"no exported files listed in {csv_path}: run the matrix first")
    files = [r["tflite"] for r in rows]
    rounds = []
    for _ in tqdm(range(cfg.retime), desc="re-timing rounds", unit="round", disable=None):
        rounds.append(run_host(HostConfig(models=files, threads=cfg.threads[:1], xnnpack=[True],
                                          runs=cfg.host_runs)))
    for i, r in enumerate(rows):
        r.update({k: statistics.median(rr[i][src] for rr in rounds) for k, src in
                  (("host_ms_median", "median_ms"), ("host_ms_p5", "p5_ms"), ("host_ms_p95", "p95_ms"))})
        r["host_threads"] = cfg.threads[0]
        write_matrix_row(csv_path, r)
    meta = read_meta(out / "meta.json") or {}
    entry = collect_meta(command or "python -m bench matrix --retime", meta.get("checkpoint") or cfg.checkpoint
                         or REFERENCE)
    meta.setdefault("history", []).append({k: entry.get(k) for k in _RUN_KEYS} | {
        "retimed": f"host latency of {len(rows)} files, {cfg.retime} interleaved rounds of {cfg.host_runs} runs, "
                   f"1-min load average {os.getloadavg()[0]:.2f} after"})
    write_meta(out / "meta.json", meta)
    from .study_report import write_report
    md, html = write_report(out, prune_dir=cfg.prune_dir or None)
    print(f"re-timed {len(rows)} files; wrote {csv_path}, {md} and {html}")
    return csv_path


def run_matrix(cfg: MatrixConfig, command: str | None = None) -> Path:
    """Every row of the study not yet in out/matrix.csv: quantize, evaluate, export, validate, time, write the row;
    then the report. (Long because the set-up a resumed run must repeat in order, rows, data, provenance, FP32
    logits, reads best in one place; each row's work is `_quantize`, `_export`, `_host`, `_device`.)"""
    load_all_modules()
    if cfg.retime:
        return retime_matrix(cfg, command)
    cfg = replace(cfg, checkpoint=cfg.checkpoint or REFERENCE, out=cfg.out or "runs/matrix")
    if cfg.eval_images < 0:
        raise ValueError(f"--eval-images should be >= 0 instead of {cfg.eval_images}")
    rows = study_rows(cfg.calib_size, cfg.adaround_iters)
    if cfg.quick:
        rows = [r for r in rows if r[0].name == "FP32" or (r[0].name in ("W8A8", "W4A8") and r[1] == "rtn"
                and r[0].granularity == "per-channel" and r[0].calib == "real")]
    if cfg.only:
        names = {n.strip().upper() for n in cfg.only.split(",") if n.strip()}
        unknown = names - {q.name.upper() for q, _ in rows}
        if unknown:
            raise ValueError(f"--only names unknown configs {sorted(unknown)}")
        rows = [r for r in rows if r[0].name.upper() in names]
    model, _ = load_model(cfg.checkpoint)      # a bad checkpoint fails before anything is written
    with_resolution(model, cfg.resolution)
    out = Path(cfg.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "tflite").mkdir(parents=True, exist_ok=True)
    for d in (out, out / "checkpoints", out / "tflite"):   # left by a run killed with SIGKILL
        for f in remove_stale_temporaries(d):
            print(f"removed a stale temporary file: {f}", file=sys.stderr)
    csv_path = out / "matrix.csv"
    dataset = load_dataset(DataConfig(source="folder", root=cfg.data, layout=model.cfg.layout,
                                      resolution=model.cfg.input_size, calib_size=cfg.calib_size,
                                      mode=cfg.data_mode, memory_budget=cfg.memory_budget))
    dataset.check_classes(model.cfg.num_classes, cfg.checkpoint)
    eval_split = dataset.test.stratified(cfg.eval_images)
    meta = collect_meta(command or "python -m bench matrix", cfg.checkpoint,
                        eval_subset=f"{len(eval_split)} evenly spaced (class-stratified) test images of "
                                    f"{dataset.root} ({len(dataset.classes)} classes)", seed=0)
    meta["data"] = dataset.describe()
    # a resumed matrix is the work of several invocations: keep each one's command and commit
    old = read_meta(out / "meta.json") if (out / "meta.json").is_file() else None
    history = list((old or {}).get("history") or ([{k: old.get(k) for k in _RUN_KEYS}] if old else []))
    history.append({k: meta.get(k) for k in _RUN_KEYS} | {"rows_before": len(done_keys(csv_path))})
    meta["history"] = history
    write_meta(out / "meta.json", meta)

    from quantize.metrics import compare_logits, weight_size_bytes
    ref = fp32_logits(model, eval_split, out, cfg.checkpoint, progress=True)   # kept for a resumed run

    done = done_keys(csv_path)
    for qcfg, method in tqdm(rows, desc="matrix", unit="config"):
        key = study_key(qcfg, method)
        if row_key(key) in done:
            continue
        name = row_name(key)
        tqdm.write(f"== {name}")
        ckpt = out / "checkpoints" / f"{name}.pt"
        qm = _quantize(model, dataset, qcfg, ckpt)
        m = compare_logits(ref, predict(qm, eval_split, model.cfg.layout, desc=name), eval_split.labels)
        row = {**key, **sim_columns(qcfg, {**m, "weight_bytes": weight_size_bytes(qm)})}
        row.update(_export(cfg, qcfg, ckpt, out / "tflite" / f"{name}.tflite"))
        if row.get("export_status") == "ok":
            row.update(_host(cfg, row["tflite"]))
            if cfg.phone:
                row.update(_device(cfg, row["tflite"], out))
        write_matrix_row(csv_path, row)
    if cfg.peers:
        _peers(cfg, rows, out, dataset, eval_split, ref, model)
    from .study_report import write_report
    md, html = write_report(out, prune_dir=cfg.prune_dir or None)
    print(f"wrote {csv_path}, {md} and {html}")
    return csv_path
