"""`python -m quantize`: quantize a float (or pruned) checkpoint, evaluate it against FP32, save both, and
export the validated .tflite.

    python -m quantize --qat                   # the latest pruned (else baseline) model of runs/latest.json
    python -m quantize --checkpoint ../shared/models/cifar10_mobilenetv2_w1.0.pt --config W8A8 --out runs/w8a8
    python -m quantize --checkpoint CKPT --config W8A8 --granularity per-tensor --cle --bias-correction
    python -m quantize --checkpoint CKPT --config W4A8 --adaround --adaround-iters 300
    python -m quantize --checkpoint CKPT --config W8A8 --qat --epochs 2 --qat-lr 1e-4
    python -m quantize --checkpoint CKPT --matrix --out runs/quant_matrix

Writes out/quantized.pt (see quantize.io), out/metrics.json (FP32 vs quantized on a stratified test subset:
--eval-images, class-stratified), out/quantize_config.json and, unless --no-export, out/model_<config>.tflite
validated against the integer simulation (python -m export's pipeline) with its report beside it; both are
recorded in runs/latest.json for `python -m bench`. --matrix writes out/matrix.csv (one row per configuration,
resumable) and out/matrix_snr.png instead.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.cli import (DATA_HELP, DATA_MODE_HELP, DATA_SOURCE_HELP, DEVICE_HELP, EVAL_IMAGES_HELP, MEMORY_BUDGET_HELP,
                        RESOLUTION_HELP, VAL_IMAGES_HELP, Parser, add_config, config_from, opt, run_command,
                        torch_device)
from common.files import atomic_write_text
from mobilenet.checkpoint import load_checkpoint, load_model
from mobilenet.data import DEFAULT_CACHE, DEFAULT_DATA, DataConfig, load_dataset
from mobilenet.engine import predict
from mobilenet.model import with_resolution
from mobilenet.runs import find_input, record, runs_dir

from .config import RECIPES, QuantConfig, recipe
from .io import require_float_checkpoint, save_quantized
from .matrix import run_matrix
from .metrics import evaluate_quantized, weight_size_bytes
from .ptq import OPT_IMAGES, run_ptq

__all__ = ["CliConfig", "build_parser", "main", "quant_config_from"]

PROG = "python -m quantize"


@dataclass
class CliConfig:
    checkpoint: str = opt("", "float or pruned checkpoint, or a torchvision state_dict (default: the latest "
                              "pruned, else baseline, model recorded in runs/latest.json)")
    config: str = opt("W8A8", f"recipe: {' | '.join(RECIPES)}")
    granularity: str = opt("per-channel", "of the weights: per-channel | per-tensor")
    calib: str = opt("real", "calibration data: real (training images) | random")
    calib_size: int = opt(1000, "calibration images")
    w_bits: int | None = opt(None, "override the recipe's weight bits (2..16)")
    a_bits: int | None = opt(None, "override the recipe's activation bits (2..16)")
    dw_bits: int | None = opt(None, "weight bits of the depthwise convs (2..16; default: the weight bits, but "
                                    "at least 8: 4 makes a W4 file all 4-bit)")
    act_observer: str = opt("minmax", "minmax | ema | percentile | mse")
    weight_observer: str = opt("minmax", "minmax | mse")
    cle: bool = opt(False, "cross-layer equalization")
    bias_correction: bool = opt(False, "empirical bias correction")
    adaround: bool = opt(False, "learned rounding of the weights")
    adaround_iters: int = opt(1000, "AdaRound steps per layer")
    opt_images: int = opt(OPT_IMAGES, "images for AdaRound / bias correction / CLE")
    eval_images: int = opt(2000, EVAL_IMAGES_HELP)
    resolution: int | None = opt(None, RESOLUTION_HELP)
    out: str = opt("", "output directory (default: runs/quantize, under $MNV2_RUNS)")
    matrix: bool = opt(False, "run the whole study matrix (CSV + PNG)")
    qat: bool = opt(False, "quantization-aware training (quantize.qat)")
    epochs: int | None = opt(None, "QAT epochs (default: QATConfig's)")
    qat_lr: float | None = opt(None, "QAT learning rate (default: QATConfig's)")
    freeze_bn_epoch: int | None = opt(None, "QAT: epoch from which BN stats freeze")
    freeze_observer_epoch: int | None = opt(None, "QAT: epoch from which ranges freeze")
    qat_images: int | None = opt(None, "QAT: training images per epoch")
    qat_minutes: float = opt(6.0, "QAT: wall-clock minutes for all epochs, the steps fitted to the measured step "
                                  "time; 0 = none")
    export: bool = opt(True, "end by exporting the validated .tflite (out/model_<config>.tflite); --no-export "
                             "skips it")
    val_images: int = opt(1000, VAL_IMAGES_HELP)
    bf16: bool | None = opt(None, "QAT: bf16 autocast (then no longer bit-exact with the integer model); default: "
                                  "FP32")
    data: str = opt(DEFAULT_DATA, DATA_HELP)
    data_source: str = opt("folder", DATA_SOURCE_HELP)
    cache_dir: str = opt(DEFAULT_CACHE, "where the archive is unpacked and decoded")
    data_mode: str = opt("auto", DATA_MODE_HELP)
    memory_budget: float = opt(0.25, MEMORY_BUDGET_HELP)
    seed: int = opt(0, "calibration split, random calibration data, AdaRound")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default")
    device: str = opt("auto", DEVICE_HELP)
    progress: bool = opt(True, "progress bars")


QAT_FIELDS = {"epochs": "epochs", "qat_lr": "lr", "freeze_bn_epoch": "freeze_bn_epoch",
              "freeze_observer_epoch": "freeze_observer_epoch", "qat_images": "max_images_per_epoch", "bf16": "bf16",
              "qat_minutes": "budget_minutes", "eval_images": "eval_images"}


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_config(p, CliConfig)
    return p


def quant_config_from(cli: CliConfig) -> QuantConfig:
    """The QuantConfig the options describe (recipe, then overrides). ValueError names a bad value."""
    over = dict(granularity=cli.granularity, calib=cli.calib, calib_size=cli.calib_size,
                act_observer=cli.act_observer, weight_observer=cli.weight_observer, cle=cli.cle,
                bias_correction=cli.bias_correction, adaround=cli.adaround, adaround_iters=cli.adaround_iters,
                seed=cli.seed)
    base = recipe(cli.config)
    if cli.w_bits is not None:
        over["w_bits"] = cli.w_bits
    if cli.a_bits is not None:
        if base.act_mode == "none":
            raise ValueError(f"--a-bits {cli.a_bits} does not apply to {base.name}, whose activations stay float")
        over["a_bits"] = cli.a_bits
    if cli.dw_bits is not None:
        over["dw_bits"] = cli.dw_bits
    cfg = recipe(cli.config, **over)
    if cli.w_bits is not None or cli.a_bits is not None:
        cfg.name = f"W{cfg.w_bits if cfg.w_bits else 32}A{cfg.a_bits if cfg.a_bits else 32}"
    if cli.adaround_iters < 0:
        raise ValueError(f"--adaround-iters should be >= 0, not {cli.adaround_iters}")
    return cfg


def quantize_one(model, ds, qcfg: QuantConfig, cli: CliConfig, masks: dict | None = None):
    """The frozen QMobileNet for one configuration (PTQ, or QAT when cli.qat; QAT keeps pruning masks)."""
    if not cli.qat:
        return run_ptq(model, ds, qcfg, device=cli.device, opt_images=cli.opt_images, progress=cli.progress)
    from .qat import QATConfig, run_qat  # only QAT needs it; PTQ runs without the module
    given = {k: getattr(cli, k) for k in QAT_FIELDS if getattr(cli, k) is not None}
    if given.get("qat_minutes") == 0:   # 0 = no budget: the epochs and images per epoch decide
        del given["qat_minutes"]
    qat_cfg = QATConfig(**{QAT_FIELDS[k]: v for k, v in given.items()})
    return run_qat(model, ds, qcfg, qat_cfg, cli.device, masks=masks)


def _check(cli: CliConfig) -> CliConfig:
    cli.out = cli.out or str(runs_dir() / "quantize")
    if cli.threads < 0:
        raise ValueError(f"--threads should be >= 0, not {cli.threads}")
    if cli.opt_images < 1:
        raise ValueError(f"--opt-images should be >= 1, not {cli.opt_images}")
    if cli.matrix and cli.qat:
        raise ValueError("--matrix runs the PTQ study; run --qat separately")
    return cli


def run(cli: CliConfig) -> dict:
    out = Path(cli.out)
    qcfg = quant_config_from(cli) if not cli.matrix else None      # bad options fail before the slow loads
    if not cli.checkpoint:
        cli.checkpoint = str(find_input(("pruned", "baseline"), "--checkpoint"))
    ckpt = load_checkpoint(cli.checkpoint)
    require_float_checkpoint(ckpt, cli.checkpoint)
    model, ckpt = load_model(ckpt, where=cli.checkpoint)
    with_resolution(model, cli.resolution)
    cli.device = str(torch_device(cli.device))
    model = model.to(cli.device)
    ds = load_dataset(DataConfig(source=cli.data_source, root=cli.data, layout=model.cfg.layout,
                                 resolution=model.cfg.input_size, cache_dir=cli.cache_dir, seed=cli.seed,
                                 calib_size=max(cli.calib_size, 1000), mode=cli.data_mode,
                                 memory_budget=cli.memory_budget))
    ds.check_classes(model.cfg.num_classes, cli.checkpoint)
    split = ds.test.stratified(cli.eval_images)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"cli": asdict(cli), "quant_config": qcfg.to_dict() if qcfg else None},
                                 indent=2) + "\n", out / "quantize_config.json")
    if cli.matrix:
        return run_matrix(model, ds, split, cli, out)
    ref = predict(model, split, model.cfg.layout, device=cli.device, desc="eval fp32", disable_bar=not cli.progress)
    t0 = time.time()
    qm = quantize_one(model, ds, qcfg, cli, ckpt.get("masks"))
    seconds = round(time.time() - t0, 1)
    metrics = evaluate_quantized(qm, ref, split, model.cfg.layout, cli.device, cli.progress)
    metrics.update(fp32_weight_bytes=weight_size_bytes(model, 32), quantize_seconds=seconds,
                   eval_indices=f"every {len(ds.test) // len(split)}th of {len(ds.test)} test images"
                   if len(ds.test) % len(split) == 0 else f"{len(split)} evenly spaced test images")
    save_quantized(out / "quantized.pt", qm, {"metrics": metrics, "source_checkpoint": cli.checkpoint,
                                              "qat": cli.qat, "masks": ckpt.get("masks"), "cli": asdict(cli)})
    summary = {"cli": asdict(cli), "data": ds.describe(), "quant_config": qcfg.to_dict(), "metrics": metrics,
               "ptq_report": _short_report(getattr(qm, "ptq_report", {}))}
    if cli.qat:
        summary["qat"] = {"config": qm.qat_config, "history": qm.qat_history}
    summary["precision"] = qm.qat_config["precision"] if cli.qat else \
        {"dtype": "fp32", "reason": "the PTQ simulation rounds in float32, as the integer model does"}
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "metrics.json")
    record("quantized", out / "quantized.pt")
    print(f"{qcfg.label} {qcfg.granularity}: top-1 {100 * metrics['acc_q']:.2f}% (FP32 {100 * metrics['acc_ref']:.2f}%)"
          f", agreement {100 * metrics['agreement']:.2f}%, SNR {metrics['snr_db']:.1f} dB, "
          f"{metrics['weight_bytes'] / 1e6:.2f} MB weights -> {out}")
    if cli.export:
        summary["export"] = _export(cli, qcfg, out)
    return summary


def _export(cli: CliConfig, qcfg: QuantConfig, out: Path) -> dict:
    """The validated .tflite of out/quantized.pt, through python -m export's own pipeline (the CLI is where the
    design card's flow goes on from quantize to export; the library packages keep their one-way imports)."""
    from export.pipeline import ExportConfig, run_export
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # the converter's per-pass progress lines
    tflite = out / f"model_{qcfg.name.lower()}.tflite"
    data = "random" if cli.data_source == "random" else cli.data
    report = run_export(ExportConfig(checkpoint=str(out / "quantized.pt"), out=str(tflite), data=data,
                                     val_images=cli.val_images, data_mode=cli.data_mode,
                                     memory_budget=cli.memory_budget))
    record("tflite", tflite, validated=report["validation"]["passed"], config=qcfg.name)
    print(f"exported {tflite} ({report['file_summary']['size_bytes']:,} bytes), validated against the integer "
          f"simulation on {cli.val_images} test images")
    return {"file": str(tflite), "passed": report["validation"]["passed"]}


def _short_report(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k not in ("adaround", "bias_correction")}
    if "adaround" in report:
        ada = report["adaround"]
        out["adaround"] = {"layers": len(ada), "kept_adaround": sum(r["kept"] == "adaround" for r in ada.values()),
                           "err_nearest": sum(r["err_nearest"] for r in ada.values()),
                           "err_adaround": sum(min(r["err_adaround"], r["err_nearest"]) for r in ada.values())}
    if "bias_correction" in report:
        out["bias_correction_max_shift"] = max(report["bias_correction"].values(), default=0.0)
    return out


def main(argv=None) -> int:
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:      # --help (0) or a malformed flag (2, message already printed)
        return int(e.code or 0)

    def body():
        cli = _check(config_from(ns, CliConfig))
        if cli.threads:
            torch.set_num_threads(cli.threads)
        run(cli)
    return run_command(PROG, body)


if __name__ == "__main__":
    from common.files import exit_cleanly_on_sigterm
    exit_cleanly_on_sigterm()
    sys.exit(main())
