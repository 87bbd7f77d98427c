"""Post-training quantization: fold BN, optionally equalize, quantize the weights (nearest or AdaRound), correct
the biases, calibrate the activation ranges, freeze.

    step   what                                   on
    1      fold BN into the convs                 the float model (a copy; the input is not modified)
    2      cross-layer equalization (qcfg.cle)    the folded float model, before any weight range is taken
    3      prepare the simulation                 weights fake-quantized at round-to-nearest
    4      AdaRound (qcfg.adaround)               the first `opt_images` calibration images, layer by layer
    5      bias correction (qcfg.bias_correction) the same images, layer by layer
    6      calibrate activation ranges            qcfg.calib_size images (static activations only)
    7      freeze                                 every scale and zero-point becomes a fixed buffer

Calibration data (qcfg.calib): "real" takes the first images of `dataset.calib` (drawn from the training set);
"random" draws N(0, 1) images of the model's input size (in normalized units) from a generator seeded with
qcfg.seed, the data-free baseline.
"""
from __future__ import annotations

import torch
from torch import nn

from mobilenet.data import BatchLoader, Dataset
from mobilenet.fold import fold_model

from .adaround import adaround
from .bias_correction import bias_correct
from .cle import equalize
from .config import QuantConfig
from .qmodel import QMobileNet, calibrate, freeze, prepare
from .walk import reference_weights

__all__ = ["run_ptq", "calibration_images", "calibration_batches", "OPT_IMAGES"]

OPT_IMAGES = 256      # images held in memory for the layer-by-layer methods (AdaRound, bias correction, CLE bounds)
CALIB_BATCH = 250     # images per calibration forward


def calibration_images(dataset: Dataset | None, qcfg: QuantConfig, n: int, input_size: int,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """The first `n` calibration images (n, 3, S, S), normalized floats, real or seeded N(0, 1)."""
    if qcfg.calib == "random":
        g = torch.Generator().manual_seed(qcfg.seed)
        return torch.randn(n, 3, input_size, input_size, generator=g).to(device)
    if dataset is None:
        raise ValueError("calib='real' needs a dataset (or use calib='random')")
    split = dataset.calib
    if len(split) < n:
        raise ValueError(f"calibration split holds {len(split)} images, fewer than the {n} asked for")
    x, _ = next(iter(BatchLoader(split.subset(torch.arange(n)), n, dataset.layout, device=device)))
    return x


def calibration_batches(dataset: Dataset | None, qcfg: QuantConfig, input_size: int,
                        device: str | torch.device = "cpu"):
    """qcfg.calib_size calibration images in batches of CALIB_BATCH (generated lazily)."""
    n = qcfg.calib_size
    if qcfg.calib == "random":
        x = calibration_images(None, qcfg, n, input_size, device)
        return [x[i:i + CALIB_BATCH] for i in range(0, n, CALIB_BATCH)]
    if dataset is None:
        raise ValueError("calib='real' needs a dataset (or use calib='random')")
    if len(dataset.calib) < n:
        raise ValueError(f"calibration split holds {len(dataset.calib)} images, fewer than calib_size={n}")
    return (x for x, _ in BatchLoader(dataset.calib.subset(torch.arange(n)), CALIB_BATCH, dataset.layout,
                                      device=device))


def run_ptq(model: nn.Module, dataset: Dataset | None, qcfg: QuantConfig, *, device: str | torch.device = "cpu",
            opt_images: int = OPT_IMAGES, progress: bool = True) -> QMobileNet:
    """The frozen PTQ simulation of `model` under `qcfg` (see the table above). `model` is not modified.

    The returned model carries `ptq_report` (a dict: what each optional method did)."""
    if (qcfg.adaround or qcfg.bias_correction) and qcfg.w_bits is None:
        raise ValueError(f"{qcfg.name}: AdaRound and bias correction need quantized weights (w_bits is None)")
    size = model.cfg.input_size
    folded = fold_model(model).to(device)                                    # 1
    report: dict = {}
    needs_x = qcfg.cle or qcfg.adaround or qcfg.bias_correction
    x = calibration_images(dataset, qcfg, min(opt_images, qcfg.calib_size), size, device) if needs_x else None
    if qcfg.cle:                                                             # 2
        report["cle"] = equalize(folded, [x[i:i + CALIB_BATCH] for i in range(0, len(x), CALIB_BATCH)])
    qm = prepare(folded, qcfg).to(device)                                    # 3
    ref = reference_weights(qm) if needs_x else None
    if qcfg.adaround:                                                        # 4
        report["adaround"] = adaround(qm, x, qcfg.adaround_iters, seed=qcfg.seed, ref=ref, progress=progress)
    if qcfg.bias_correction:                                                 # 5
        report["bias_correction"] = bias_correct(qm, x, ref)
    if qcfg.act_mode == "static":                                            # 6
        report["calib_images"] = calibrate(qm, calibration_batches(dataset, qcfg, size, device))
    freeze(qm)                                                               # 7
    qm.ptq_report = report
    return qm.eval()
