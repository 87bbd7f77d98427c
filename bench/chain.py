"""The whole chain in one command, on CIFAR-10:

    baseline (trained, or --init CKPT) -> sensitivity sweep -> global L1 pruning -> fine-tuning
    -> W8A8 PTQ (QAT with --qat) -> INT8 export with its validation (and the FP32 export beside it)
    -> host benchmark -> report

Each step is the project's own command (train.py, python -m prune, python -m quantize, python -m export,
python -m bench), called in-process with its arguments, so a step done here equals that step done by hand.
Every step writes its outputs atomically and is skipped when they already exist: an interrupted chain resumes
at the step it was in. The default budgets finish in about 15 minutes on a 2-core CPU.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.cli import (DATA_HELP, DATA_MODE_HELP, DEVICE_HELP, EVAL_IMAGES_HELP, MEMORY_BUDGET_HELP, VAL_IMAGES_HELP,
                        torch_device)
from mobilenet.checkpoint import load_checkpoint, load_model
from common.files import atomic_write_text
from mobilenet.data import DEFAULT_DATA
from quantize.io import require_float_checkpoint

__all__ = ["ChainConfig", "run_chain"]


@dataclass
class ChainConfig:
    out: str = field(default="", metadata={"help": "output directory (chain default: runs/chain)"})
    init: str = field(default="", metadata={
        "help": "start from this FP32 checkpoint instead of training (e.g. ../shared/models/...)"})
    data: str = field(default=DEFAULT_DATA, metadata={"help": DATA_HELP})
    data_mode: str = field(default="auto", metadata={"help": DATA_MODE_HELP + "; for every step"})
    memory_budget: float = field(default=0.25, metadata={"help": MEMORY_BUDGET_HELP})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP + ", for every torch stage (training, "
                                                           "sweep, fine-tuning, calibration, QAT)"})
    width: float = field(default=1.0, metadata={"help": "width multiplier of the trained baseline"})
    resolution: int | None = field(default=None, metadata={
        "help": "input height = width of the baseline (or the --init model), a multiple of 8; default: the "
                "layout's (32)"})
    # Budgets in wall-clock minutes, not image counts: each training stage measures its step time first and
    # fits its steps to the budget, so a slower CPU trains on fewer images instead of running longer.
    train_minutes: float = field(default=3.0, metadata={"help": "minutes for the baseline's training epochs"})
    train_epochs: int = field(default=2, metadata={"help": "baseline epochs the training budget is split into"})
    prune: str = field(default="0.7", metadata={"help": "global unstructured sparsity, or auto"})
    sweep_minutes: float = field(default=1.0, metadata={
        "help": "minutes for the per-layer sensitivity sweep (ratio by ratio; the trials left out are reported)"})
    sweep_images: int = field(default=100, metadata={"help": "test images per per-layer sweep evaluation"})
    sweep_global_images: int = field(default=1000, metadata={"help": "test images per global sweep evaluation"})
    sweep_per_layer: bool = field(default=True, metadata={"help": "run the per-layer sweep too"})
    finetune_minutes: float = field(default=1.5, metadata={"help": "minutes for fine-tuning after pruning"})
    finetune_epochs: int = field(default=1, metadata={"help": "fine-tuning epochs the budget is split into"})
    qat: bool = field(default=False, metadata={"help": "quantization-aware training instead of PTQ"})
    qat_minutes: float = field(default=3.0, metadata={"help": "minutes for QAT (with --qat)"})
    qat_epochs: int = field(default=1, metadata={"help": "QAT epochs the budget is split into (with --qat)"})
    config: str = field(default="W8A8", metadata={"help": "quantization config of the exported file"})
    eval_images: int = field(default=2000, metadata={"help": EVAL_IMAGES_HELP})
    val_images: int = field(default=1000, metadata={"help": VAL_IMAGES_HELP})
    host_runs: int = field(default=50, metadata={"help": "timed inferences per file on the host"})


def _step(name: str, done: Path, fn, log: list):
    t0 = time.perf_counter()
    if done.exists():
        print(f"== {name}: done already ({done})")
        log.append({"step": name, "skipped": True, "output": str(done)})
        return
    print(f"== {name}")
    code = fn()
    if code:
        raise RuntimeError(f"step {name!r} failed with exit code {code}")
    if not done.exists():
        raise RuntimeError(f"step {name!r} finished without writing {done}")
    log.append({"step": name, "seconds": round(time.perf_counter() - t0, 1), "output": str(done)})


def run_chain(cfg: ChainConfig) -> Path:
    """The whole study on one model: train, sweep + prune + fine-tune, quantize, export, time, report; each step
    is skipped when its output exists, so a rerun resumes. (Long because the eight steps and the flags each gets
    read best top to bottom in one place; each step is one call of another command.)"""
    from .matrix import load_all_modules
    load_all_modules()
    import export.__main__ as export_cli
    import prune.__main__ as prune_cli
    import quantize.__main__ as quantize_cli
    import train

    from .host import HOST_COLUMNS, HostConfig, run_host
    from .report import write_csv

    torch_device(cfg.device)   # a device this machine lacks fails now, not after the baseline
    if cfg.init:    # the whole check (safe load, shapes, finite weights) before anything is written
        if not Path(cfg.init).is_file():
            raise ValueError(f"--init checkpoint not found: {cfg.init}")
        ckpt = load_checkpoint(cfg.init)
        require_float_checkpoint(ckpt, cfg.init)
        load_model(ckpt, where=cfg.init)
    out = Path(cfg.out or "runs/chain")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log: list[dict] = []
    command = " ".join(["python -m bench"] + [shlex.quote(a) for a in sys.argv[1:]])

    data = ["--data", cfg.data, "--data-mode", cfg.data_mode, "--memory-budget", str(cfg.memory_budget)]

    # 1. baseline
    baseline = Path(cfg.init) if cfg.init else out / "baseline" / "checkpoint.pt"
    if not cfg.init:
        args = ["--out", str(out / "baseline"), *data, "--width", str(cfg.width),
                "--device", cfg.device, "--epochs", str(cfg.train_epochs),
                "--budget-minutes", str(cfg.train_minutes), "--max-train-images", "0",
                "--eval-images", str(cfg.eval_images), "--eval-every", str(cfg.train_epochs)]
        args += ["--resolution", str(cfg.resolution)] if cfg.resolution else []
        resume = ["--resume"] if baseline.exists() else []
        _step("train baseline", out / "baseline" / "done", lambda: _train(train, args + resume, out), log)

    # 2-4. sweep, prune, fine-tune
    pruned = out / "prune" / "pruned.pt"
    _step("sweep + prune + fine-tune", pruned, lambda: prune_cli.main([
        "--checkpoint", str(baseline), "--out", str(out / "prune"), *data, "--device", cfg.device,
        "--ratio", cfg.prune,
        "--epochs", str(cfg.finetune_epochs), "--budget-minutes", str(cfg.finetune_minutes),
        "--images-per-epoch", "0", "--sweep-images", str(cfg.sweep_images),
        "--sweep-minutes", str(cfg.sweep_minutes), "--sweep-global-images", str(cfg.sweep_global_images),
        "--eval-images", str(cfg.eval_images)]
        + ([] if cfg.sweep_per_layer else ["--no-sweep-per-layer"])
        + (["--resolution", str(cfg.resolution)] if cfg.resolution else [])), log)

    # 5. quantize
    qdir = out / "quantize"
    qargs = ["--checkpoint", str(pruned), "--config", cfg.config, "--out", str(qdir), *data,
             "--device", cfg.device, "--eval-images", str(cfg.eval_images),
             "--no-export"]   # the chain exports below, beside the FP32 file it compares against
    if cfg.qat:
        qargs += ["--qat", "--epochs", str(cfg.qat_epochs), "--qat-minutes", str(cfg.qat_minutes)]
    qckpt = qdir / "quantized.pt"
    _step("quantize " + ("(QAT)" if cfg.qat else "(PTQ)"), qckpt, lambda: quantize_cli.main(qargs), log)

    # 6. export, validated; the FP32 export of the same pruned model beside it
    int8 = out / f"model_{cfg.config.lower()}.tflite"
    fp32 = out / "model_fp32.tflite"
    _step("export FP32", fp32, lambda: export_cli.main([
        "--checkpoint", str(pruned), "--out", str(fp32), *data,
        "--val-images", str(min(cfg.val_images, 200))]), log)
    _step(f"export {cfg.config}", int8, lambda: export_cli.main([
        "--checkpoint", str(qckpt), "--out", str(int8), *data, "--val-images", str(cfg.val_images),
        "--compare-to", str(fp32)]), log)

    # 7. host benchmark
    bench_csv = out / "bench_host.csv"

    def bench():
        rows = run_host(HostConfig(models=[str(fp32), str(int8)], threads=[1, 2], runs=cfg.host_runs))
        write_csv(str(bench_csv), rows, HOST_COLUMNS)
        return 0
    _step("host benchmark", bench_csv, bench, log)

    # 8. report
    from .chain_report import write_chain_report
    md, html = write_chain_report(out, command=command, baseline=str(baseline))
    log.append({"step": "report", "output": str(html)})
    total = time.perf_counter() - t_start
    atomic_write_text(json.dumps({"config": asdict(cfg), "command": command, "steps": log,
                                  "seconds": round(total, 1)}, indent=2) + "\n", out / "chain.json")
    print(f"chain finished in {total / 60:.1f} min: {int8} (validated), {bench_csv}, {html}")
    return html


def _train(train_mod, args: list[str], out: Path) -> int:
    code = train_mod.main(args)
    if code == 0:
        atomic_write_text("done\n", out / "baseline" / "done")
    return code
