"""checkpoint -> .tflite + report, validated before the file is kept.

    step  what
    1     hash the checkpoint (it must be unchanged at the end) and load it: a quantized checkpoint becomes its
          frozen simulation; an FP32 / pruned one is exported as FP32 only
    2     decide the file kind from the quant config, or refuse (never another precision)
    3     W8A16: calibrate static int16 ranges (the simulation's are dynamic; LiteRT's int16 path is static)
    4     convert (batch 1) and apply the flatbuffer edits (float io, int64 biases, 4-bit weights packed as INT4
          where LiteRT has a kernel for them, sparse weights where they save bytes); write to a temporary file
          beside --out
    5     validate the temporary file: structure, then N test images through the file (XNNPACK gates; builtin
          kernels reported too) and through the simulation of the kernels that run it (an INT4 conv leaves the
          XNNPACK delegate: that layer is simulated with the builtin arithmetic; dynamic range: the float
          simulation that quantizes each conv's input per image, within the measured max_abs_dynamic)
    6     rename it to --out and write <out>.json; on any failure delete it and raise ExportError
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from common.cli import (DATA_HELP, DATA_MODE_HELP, DATA_SOURCE_HELP, MEMORY_BUDGET_HELP, RESOLUTION_HELP,
                        VAL_IMAGES_HELP, CheckFailed, opt)
from common.files import atomic_file, atomic_write_text, sha256_file
from mobilenet.checkpoint import FORMAT, CheckpointError, load_checkpoint, load_model
from mobilenet.data import DEFAULT_DATA, BatchLoader, DataConfig, load_dataset
from mobilenet.model import check_resolution
from quantize.config import RECIPES
from quantize.io import load_quantized
from quantize.qmodel import prepare

from . import validate as V
from .convert import ExportError, check_storage, convert, export_kind, static_int16
from .report import file_summary, gzip_size, zero_weights
from .tflite_file import read_tflite

__all__ = ["ExportConfig", "ValidationFailed", "run_export", "load_for_export"]


@dataclass
class ExportConfig:
    checkpoint: str = opt("", "quantized checkpoint (python -m quantize), or an FP32 / pruned one for an FP32 "
                              "export (default: the latest quantized model recorded in runs/latest.json)")
    out: str = opt("", "the .tflite file to write; the report goes to <out>.json (default: beside the checkpoint, "
                       "model_<config>.tflite)")
    config: str | None = opt(None, "the quant config the checkpoint must hold (e.g. W8A8); default: whatever it "
                                   "holds")
    float_io: bool = opt(False, "integer graphs: float input and output (one QUANTIZE and one DEQUANTIZE at the "
                                "edges)")
    nhwc: bool = opt(False, "input (1, H, W, 3) instead of (1, 3, H, W) (no TRANSPOSE at the input)")
    w4_storage: str = opt("auto", "4-bit weights: auto (packed INT4, two codes a byte, wherever LiteRT has a "
                                  "kernel for them, int8 elsewhere; INT4 convs run on builtin kernels, not "
                                  "XNNPACK) | int8 (int8 values in [-7, 7] everywhere: no size gain)")
    weights_storage: str = opt("auto", "conv weights of FP32 and INT8 files: auto (CSR + DENSIFY op per weight "
                                       "wherever that takes fewer bytes: pruned models) | sparse (every weight "
                                       "with a zero) | dense")
    val_images: int = opt(1000, VAL_IMAGES_HELP + " (class-stratified, as --eval-images)")
    resolution: int | None = opt(None, RESOLUTION_HELP + "; the file's input is (1, 3, N, N)")
    calib_images: int = opt(256, "W8A16: calibration images for the static int16 ranges")
    data: str = opt(DEFAULT_DATA, DATA_HELP)
    data_source: str = opt("folder", DATA_SOURCE_HELP)
    data_mode: str = opt("auto", DATA_MODE_HELP)
    memory_budget: float = opt(0.25, MEMORY_BUDGET_HELP)
    compare_to: str | None = opt(None, "another .tflite (e.g. the dense export) to report size and gzip size "
                                       "against")
    skip_builtin: bool = opt(False, "do not also validate with the builtin (non-XNNPACK) kernels (they are "
                                    "reported, not gating)")
    reported_images: int = opt(1000, "int8 graphs: the reported-only comparisons (builtin kernels, float "
                                     "simulation) use the first min(val-images, this) images; the gate "
                                     "(XNNPACK vs integer simulation) uses all")
    max_lsb: int = opt(1, "int8 graphs: largest output difference from the simulation accepted, in output LSBs")
    # int16 graphs: the same in int16 LSBs, against the float simulation (there is no int16 integer simulation):
    # 16 = 1/16 of one int8 step. Measured drift on the CIFAR-10 reference over 1,000 images: 8 (per-channel
    # weights), 9 (per-tensor); a wrong scale or code moves outputs by hundreds to thousands.
    # dynamic range: largest |logit| difference from the simulation accepted. The kernels choose each run-time
    # input code with their own last rounding (float vs double scale, ties away from zero vs to even), so now
    # and then a code moves by one and the move propagates. Measured on the CIFAR-10 reference (W8A8-dynamic,
    # per-channel, 1,000 class-stratified test images, commit 4edb748, benchmarks/RESULTS.md): max 0.111 with
    # XNNPACK, 0.066 with the builtin kernels (a tiny test model: 3e-4). The gate is 0.25, 2.25x the largest
    # drift measured; a changed weight scale or code is caught before that, by the structure check.
    max_abs_dynamic: float = opt(0.25, "dynamic-range files: largest |logit| difference from the simulation "
                                       "accepted (2.25x the drift measured on the CIFAR-10 reference)")
    max_lsb_int16: int = opt(16, "int16 graphs: the same in int16 LSBs against the float simulation (1/16 of an "
                                 "int8 step; rounding at each of ~50 layers drifts up to ~9 on the CIFAR-10 "
                                 "reference)")

    def __post_init__(self):
        if self.data == "random":   # the earlier spelling of --data-source random
            self.data_source = "random"


def load_for_export(path: str) -> tuple[torch.nn.Module, dict]:
    """(frozen QMobileNet, checkpoint). A float checkpoint becomes the FP32 'simulation' (BN folded)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") == FORMAT and ckpt.get("kind") == "quantized":
        return load_quantized(ckpt, where=path)
    model, ckpt = load_model(ckpt, where=path)
    return prepare(model, RECIPES["FP32"]), ckpt


def _images(cfg: ExportConfig, layout: str, resolution: int, n: int, split: str):
    ds = load_dataset(DataConfig(source=cfg.data_source, root=cfg.data, layout=layout, resolution=resolution,
                                 mode=cfg.data_mode, memory_budget=cfg.memory_budget,
                                 random_size=max(n, 1)))
    s = getattr(ds, split)
    s = s.stratified(n) if split == "test" else s.subset(torch.arange(min(n, len(s))))
    x, y = next(iter(BatchLoader(s, len(s), layout)))
    return x, y


def _validate(data: bytes, qm, kind: str, cfg: ExportConfig, x: torch.Tensor, y: torch.Tensor) -> dict:
    int_graph = kind in ("int8", "int16")
    problems, summary = V.check_structure(data, qm, kind, cfg.float_io)
    int8 = kind == "int8"
    # int8: the gate is the integer simulation of XNNPACK on every image; the float64 fake-quant simulation and
    # the builtin kernels are reported only, on the first `reported_images` (they cost ~10x more per image)
    n_rep = min(len(x), max(1, cfg.reported_images)) if int8 else len(x)
    builtin = V.builtin_layers_of(data, qm) if int8 else set()   # layers that leave the XNNPACK delegate
    sim = V.sim_outputs(qm, x[:n_rep], int_graph)
    runs = {}
    limit = cfg.max_lsb_int16 if kind == "int16" else cfg.max_lsb
    for kernels in ("xnnpack",) + (() if cfg.skip_builtin else ("builtin",)):
        t0 = time.perf_counter()
        xs, ys = (x, y) if kernels == "xnnpack" else (x[:n_rep], y[:n_rep])
        got = V.run_file(data, qm, xs, kernels=kernels, int_out=int_graph, nhwc=cfg.nhwc)
        if int8:  # the reference is our integer simulation of these kernels; the float simulation is reported
            r = V.compare_codes(V.int_sim_outputs(qm, xs, kernels, builtin), got, ys, limit)
            r["reference"] = f"integer simulation ({kernels} arithmetic)"
            if kernels == "xnnpack" and builtin:
                r["reference"] = (f"integer simulation (xnnpack arithmetic; builtin for the {len(builtin)} layers "
                                  "whose INT4 weights XNNPACK rejects)")
                r["builtin_layers"] = sorted(builtin)
            r["vs_float_sim"] = V.compare_codes(sim, got[:n_rep], ys[:n_rep], limit)
            r["vs_float_sim"].pop("passed")   # reported only: no verdict (the float simulation drifts, see intsim)
        else:
            atol = cfg.max_abs_dynamic if kind == "dynamic" else None
            r = V.compare_codes(sim, got, y, limit) if int_graph else V.compare_float(sim, got, ys, atol)
            r["reference"] = "float simulation" + (" (inputs quantized per image at each conv)"
                                                   if kind == "dynamic" else "")
        r["seconds"] = round(time.perf_counter() - t0, 2)
        runs[kernels] = r
    passed = not problems and runs["xnnpack"]["passed"]
    return {"passed": passed, "structure_problems": problems, "structure": summary, "runs": runs,
            "gate": {"kernels": "xnnpack", "max_lsb": limit, "min_agreement": V.MIN_AGREEMENT,
                     "float_atol_rel": V.FLOAT_ATOL,
                     **({"max_abs_dynamic": cfg.max_abs_dynamic} if kind == "dynamic" else {}),
                     "reference": "integer simulation" if int8 else "float simulation"}}


class ValidationFailed(ExportError, CheckFailed):
    """The file was written but does not compute what the simulation does: nothing is kept, exit 1."""


def run_export(cfg: ExportConfig) -> dict:
    """Do the whole export; returns the report. ExportError (nothing kept) on refusal or failed validation."""
    if cfg.val_images < 1:
        raise ExportError(f"--val-images should be >= 1 instead of {cfg.val_images}")
    if cfg.reported_images < 1:
        raise ExportError(f"--reported-images should be >= 1 instead of {cfg.reported_images}")
    if not cfg.max_abs_dynamic >= 0:   # also refuses NaN
        raise ExportError(f"--max-abs-dynamic should be >= 0 instead of {cfg.max_abs_dynamic}")
    if cfg.compare_to:
        read_tflite(cfg.compare_to)       # a file that is not a .tflite fails now, not after the conversion
    ckpt_path = Path(cfg.checkpoint)
    if not ckpt_path.is_file():
        raise CheckpointError(f"checkpoint not found: {ckpt_path}")
    digest = sha256_file(ckpt_path)

    qm, ckpt = load_for_export(str(ckpt_path))                                        # 1
    if cfg.resolution is not None:
        qm.model_cfg = replace(qm.model_cfg, resolution=check_resolution(qm.model_cfg.layout, cfg.resolution))
    qcfg = qm.qcfg
    if cfg.config is not None and cfg.config.upper() != qcfg.name.upper():
        if qcfg.is_float:
            raise ExportError(f"{ckpt_path} holds an FP32 model (kind {ckpt.get('kind')!r}), not {cfg.config}: "
                              f"quantize it first (python -m quantize --checkpoint {ckpt_path} --config "
                              f"{cfg.config} --out DIR), or export it as FP32")
        raise ExportError(f"{ckpt_path} holds a {qcfg.name} model, not {cfg.config}")
    out = Path(cfg.out or ckpt_path.with_name(f"model_{qcfg.name.lower()}.tflite"))
    kind = export_kind(qcfg, cfg.w4_storage)                                          # 2
    check_storage(kind, cfg.weights_storage)
    layout, res = qm.model_cfg.layout, qm.model_cfg.input_size
    x, y = _images(cfg, layout, res, cfg.val_images, "test")
    dynamic_qm = None
    if kind == "int16":                                                               # 3
        cx, _ = _images(cfg, layout, res, cfg.calib_images, "calib")
        dynamic_qm = qm if qcfg.act_mode == "dynamic" else None
        qm = static_int16(qm, [cx[i:i + 128] for i in range(0, len(cx), 128)])

    t0 = time.perf_counter()
    data, notes = convert(qm, kind, float_io=cfg.float_io, nhwc=cfg.nhwc,               # 4
                          weights_storage=cfg.weights_storage, w4_storage=cfg.w4_storage)
    convert_s = time.perf_counter() - t0
    with atomic_file(out) as tmp:           # renamed to --out only if the block ends without an exception (6)
        tmp.write_bytes(data)
        data = tmp.read_bytes()
        validation = _validate(data, qm, kind, cfg, x, y)                             # 5
        if dynamic_qm is not None:  # how the static int16 file relates to the checkpoint's dynamic simulation
            dyn = V.sim_outputs(dynamic_qm, x, False)
            got = V.run_file(data, qm, x, kernels="xnnpack", int_out=True, nhwc=cfg.nhwc)
            validation["agreement_with_dynamic_sim"] = (dyn.argmax(1) == got.argmax(1)).double().mean().item()
        report = _report(cfg, ckpt_path, digest, ckpt, qcfg, qm, kind, notes, data, validation, convert_s)
        if not validation["passed"]:
            raise ValidationFailed(_failure_message(validation))
        if sha256_file(ckpt_path) != digest:
            raise ExportError(f"{ckpt_path} changed during the export")
    report["file"] = str(out)
    atomic_write_text(json.dumps(report, indent=2, default=str) + "\n", str(out) + ".json")
    return report


def _failure_message(v: dict) -> str:
    lines = ["validation failed; no file was kept"]
    lines += [f"  structure: {p}" for p in v["structure_problems"][:10]]
    if len(v["structure_problems"]) > 10:
        lines.append(f"  ... and {len(v['structure_problems']) - 10} more structure problems")
    for kernels, r in v["runs"].items():
        gate = "gating" if kernels == "xnnpack" else "reported only"
        if "max_lsb" in r:
            lines.append(f"  outputs ({kernels}, {gate}): max {r['max_lsb']} LSB off (limit {v['gate']['max_lsb']}) "
                         f"on {r['images_over_limit']} of {r['n']} images, exact outputs {r['exact_outputs']:.4%}, "
                         f"top-1 agreement {r['agreement']:.4%} (limit {V.MIN_AGREEMENT:.1%}) against the "
                         f"{r.get('reference', 'simulation')}")
            if "vs_float_sim" in r:
                f = r["vs_float_sim"]
                lines.append(f"    against the float simulation (reported only): max {f['max_lsb']} LSB off, "
                             f"exact outputs {f['exact_outputs']:.4%}, top-1 agreement {f['agreement']:.4%}")
        else:
            lines.append(f"  outputs ({kernels}, {gate}): max |diff| {r['max_abs_diff']:.3g} (limit "
                         f"{r['atol']:.3g}), top-1 agreement {r['agreement']:.4%}")
    return "\n".join(lines)


def _report(cfg, ckpt_path, digest, ckpt, qcfg, qm, kind, notes, data, validation, convert_s) -> dict:
    rep = {
        "source_checkpoint": str(ckpt_path), "source_sha256": digest, "source_kind": ckpt.get("kind"),
        "quant_config": qcfg.to_dict(), "export_kind": kind, "export_config": asdict(cfg),
        "graph": notes, "convert_seconds": round(convert_s, 1),
        "activations": {"fp32": "float32", "fp16": "float32 (fp16 weights, dequantized once at load)",
                        "weight-only": "float32 (int8 weights dequantized at run time)",
                        "dynamic": "float32 between ops; each conv quantizes its input to int8 per image on every "
                                   "run (hybrid kernels: XNNPACK qd8 for CONV_2D, builtin for DEPTHWISE_CONV_2D)",
                        "int8": "int8, static per-tensor ranges from the checkpoint",
                        "int16": "int16 symmetric, STATIC per-tensor ranges calibrated at export "
                                 f"({cfg.calib_images} calibration images, min/max); the checkpoint's simulation "
                                 f"is {qcfg.act_mode}; validated against the static int16 simulation"}[kind],
        "validation_data": {"root": "random" if cfg.data_source == "random" else str(Path(cfg.data).resolve()),
                            "split": "test", "images": cfg.val_images},
        "file_summary": file_summary(data),
        "weights": zero_weights(data, qm),
        "validation": validation,
        "machine": platform.machine(), "torch": torch.__version__,
    }
    if kind == "int16":
        rep["int16_calibration"] = {"images": cfg.calib_images, "observer": "minmax", "source": "calibration split"}
    if cfg.compare_to:
        other = read_tflite(cfg.compare_to)
        rep["compare_to"] = {"file": cfg.compare_to, "size_bytes": len(other), "gzip_bytes": gzip_size(other),
                             "size_ratio": len(data) / len(other), "gzip_ratio": gzip_size(data) / gzip_size(other)}
    return rep
