"""Quantization-aware training: fine-tune the fake-quantized MobileNetV2 so the weights learn to live on the grid.

The schedule follows torchvision's MobileNetV2 QAT recipe (references/classification/train_quantization.py),
counted in epochs from 0:

    phase                       epochs                          BN fold simulation     activation ranges
    0. calibration              before epoch 0                  running statistics     observed, no fake quant
    1. QAT, observing           [0, freeze_bn_epoch)            batch statistics       observed + fake quant
    2. QAT, BN frozen           [freeze_bn_epoch, ...)          running statistics     observed + fake quant
    3. QAT, observers frozen    [freeze_observer_epoch, ...)    running statistics     fixed scale/zero-point

Whatever the epoch count, the model returned is in phase 3 and converted with `to_ptq` (BN folded), so it
computes exactly what the QAT model computes in eval mode.

Why MobileNetV2 QAT diverges elsewhere, and what is done here about it:
- per-tensor weight ranges on folded depthwise convs: the BN scale gamma / sigma spans ~10x across the
  channels of one depthwise conv of the reference model (2.3 .. 30), so one scale per tensor rounds the small
  channels to zero and their gradients with them. The recipes default to per-channel; per-tensor is allowed but
  `run_qat` says so in its log.
- batch statistics from small batches: before the BN freeze, every layer normalizes with the batch's own
  mean/variance while the weight is quantized against the running variance; with a few images per batch the
  two disagree and the quantized forward swings. `batch_size` defaults to 64 and values below 16 are refused
  while BN is still live.
- activation ranges that only grow: a min/max observer keeps the widest range of any batch since calibration,
  so one outlier batch coarsens a layer for the rest of the run. `act_observer="ema"` (torch.ao's QAT default:
  moving average of the batch min/max, constant 0.01) replaces it unless set to None.
- the int32 bias: its rounding has no gradient; `QLayer.quant_bias_value` passes the gradient straight through
  so the biases (and BN betas after the freeze) keep training.
- bf16: fake quantization rounds x / scale in the input's dtype, and bf16 holds 8 significant bits, so codes
  near 255 and every tie land on different integers than in float32. `bf16` is off by default; turned on, the
  convolutions run in bf16 and the QAT forward is no longer the integer model's forward bit for bit.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from mobilenet.data import BatchLoader
from mobilenet.engine import evaluate, fit_steps_to_budget, train_one_epoch
from mobilenet.model import MobileNetV2
from mobilenet.precision import resolve_precision
from prune.masks import MaskKeeper

from .config import QuantConfig
from .qmodel import QMobileNet, calibrate, freeze, freeze_bn, prepare, qlayers, quant_points, to_ptq

__all__ = ["QATConfig", "run_qat", "qat_mask_names", "observers_paused", "MIN_BN_BATCH"]

EXACT_QAT = "QAT's fake quantization must round in float32 to equal the integer model"
MIN_BN_BATCH = 16  # images; below this the batch variance of the 4x4 late layers is too noisy to normalize with


@dataclass
class QATConfig:
    epochs: int = 5                      # passes (each capped at max_images_per_epoch images)
    lr: float = 1e-4                     # SGD learning rate, constant (torchvision's QAT recipe: 1e-4 at batch 32)
    momentum: float = 0.9
    weight_decay: float = 1e-4           # on conv/linear weights only; none on BN and biases
    freeze_bn_epoch: int = 3             # from this epoch on, BN uses running statistics (torchvision: 3)
    freeze_observer_epoch: int = 4       # from this epoch on, scales and zero-points are fixed (torchvision: 4)
    batch_size: int = 64                 # images per step
    max_images_per_epoch: int | None = 10_000   # images per epoch, at least one batch (None: all)
    budget_minutes: float | None = None  # wall clock for all epochs: steps per epoch fitted to the measured step
    calib_batches: int = 4               # batches of the calibration split seen before training starts
    eval_images: int | None = 2000       # test images after each epoch (class-stratified; 0 = all; None = skip)
    act_observer: str | None = "ema"     # activation observer during QAT (None: keep the QuantConfig's)
    bf16: bool | None = None             # autocast the convolutions to bf16 (inexact, see the module docstring);
    #                                      None: FP32 whatever the hardware (mobilenet/precision.py, exact=)
    channels_last: bool = True           # NHWC activations: faster CPU convolutions, same values
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs should be >= 1 instead of {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr should be > 0 instead of {self.lr}")
        if self.freeze_bn_epoch < 0 or self.freeze_observer_epoch < 0:
            raise ValueError(f"freeze epochs should be >= 0 instead of {self.freeze_bn_epoch}, "
                             f"{self.freeze_observer_epoch}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size should be >= 1 instead of {self.batch_size}")
        if self.batch_size < MIN_BN_BATCH and self.freeze_bn_epoch > 0:
            raise ValueError(f"batch_size={self.batch_size} is too small for batch statistics (QAT diverges); "
                             f"use >= {MIN_BN_BATCH} or freeze_bn_epoch=0")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ValueError(f"budget_minutes should be > 0 instead of {self.budget_minutes}")
        if self.max_images_per_epoch is not None and self.max_images_per_epoch < 1:
            raise ValueError(f"max_images_per_epoch should be >= 1 instead of {self.max_images_per_epoch}")

    def to_dict(self) -> dict:
        return asdict(self)


def qat_mask_names(masks: dict[str, torch.Tensor], qm: QMobileNet) -> dict[str, torch.Tensor]:
    """Pruning masks keyed by float-model parameter (`features.3.conv.1.0.weight`, `classifier.1.weight`) ->
    the same masks keyed by the QLayer parameter that holds that weight (`features.3.conv.1.op.weight`)."""
    layers = qlayers(qm)
    out = {}
    for name, mask in masks.items():
        if not name.endswith(".weight"):
            raise ValueError(f"mask {name!r} is not on a weight")
        path = name[: -len(".weight")]
        if path.endswith(".op") and path[:-3] in layers:         # already a QLayer path
            layer = path[:-3]
        elif path.rsplit(".", 1)[0] in layers:                   # ConvBNAct child 0 / classifier child 1
            layer = path.rsplit(".", 1)[0]
        else:
            raise ValueError(f"mask {name!r} names no conv or linear weight of the model")
        w = layers[layer].op.weight
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the weight {tuple(w.shape)}")
        out[f"{layer}.op.weight"] = mask.to(torch.bool)
    return out


@contextlib.contextmanager
def observers_paused(qm: nn.Module):
    """Evaluate without letting test images move the activation ranges (fake quant stays on)."""
    saved = {fq: (fq.observe, fq.fake_quant) for fq in quant_points(qm).values()}
    for fq in saved:
        if not fq.frozen:
            fq.observe, fq.fake_quant = False, True
    try:
        yield qm
    finally:
        for fq, (obs, fake) in saved.items():
            fq.observe, fq.fake_quant = obs, fake


def _start_fake_quant(qm: nn.Module):
    for fq in quant_points(qm).values():
        if not fq.frozen:
            fq.observe, fq.fake_quant = True, True
            with torch.no_grad():
                fq.compute_qparams()


def _optimizer(qm: nn.Module, c: QATConfig) -> torch.optim.SGD:
    decay = [p for p in qm.parameters() if p.dim() > 1]       # conv / linear weights
    no_decay = [p for p in qm.parameters() if p.dim() <= 1]   # BN gamma/beta, biases
    return torch.optim.SGD([{"params": decay, "weight_decay": c.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=c.lr, momentum=c.momentum)


def _check_finite(stats: dict, epoch: int):
    if not math.isfinite(stats["loss"]):
        raise FloatingPointError(f"QAT diverged in epoch {epoch + 1}: loss {stats['loss']}")


def run_qat(model: MobileNetV2, dataset, qcfg: QuantConfig, qat_cfg: QATConfig | None = None,
            device: str | torch.device = "cpu", masks: dict[str, torch.Tensor] | None = None,
            log=print) -> QMobileNet:
    """QAT of `model` (FP32 or pruned; not modified) under `qcfg`; returns the frozen PTQ-form model (BN folded).

    masks: the pruned checkpoint's "masks" (float-model names); pruned weights stay exactly zero throughout.
    The per-epoch history is left on the result as `qat_history` (a list of dicts) and the config as
    `qat_config`. Long because the order of the phases (observers on, BN folding simulated, observers frozen, BN
    frozen) is the algorithm and reads best in one place; the per-step work is in helpers.
    """
    c = qat_cfg if qat_cfg is not None else QATConfig()
    if qcfg.w_bits is None and qcfg.a_bits is None:
        raise ValueError(f"QAT needs a quantized config, not {qcfg.name!r}")
    if qcfg.act_mode == "static" and c.act_observer is not None:
        qcfg = replace(qcfg, act_observer=c.act_observer)
    if qcfg.w_bits is not None and not qcfg.per_channel:
        log("QAT with per-tensor weights: folded depthwise channels with small BN scales round to zero")
    torch.manual_seed(c.seed)
    device = torch.device(device)
    layout = dataset.layout
    prec = resolve_precision(c.bf16, device, exact=EXACT_QAT)
    log(f"QAT precision: {prec}")

    # 1. the simulation with BN kept, and the masks mapped onto it
    qm = prepare(model, qcfg, qat=True).to(device)
    if c.channels_last:
        qm.to(memory_format=torch.channels_last)
    opt = _optimizer(qm, c)
    keeper = MaskKeeper(qm, qat_mask_names(masks, qm), opt) if masks else None  # grads, weights, momentum

    # 2. calibration: activation ranges from float activations, so the first fake-quant step starts sensible
    calib = BatchLoader(dataset.calib, c.batch_size, layout, channels_last=c.channels_last, device=device)
    seen = calibrate(qm, (x for i, (x, _) in zip(range(c.calib_batches), calib)))
    _start_fake_quant(qm)
    log(f"QAT {qcfg.name}: calibrated on {seen} images; act observer {qcfg.act_observer}, "
        f"{c.epochs} epochs of <= {c.max_images_per_epoch or len(dataset.train)} images, lr {c.lr}")

    test = dataset.test.stratified(c.eval_images) if c.eval_images is not None else None
    n_train = len(dataset.train) if c.max_images_per_epoch is None else min(len(dataset.train),
                                                                             c.max_images_per_epoch)
    steps = max(1, n_train // c.batch_size)
    budget = None
    if c.budget_minutes:
        probe = BatchLoader(dataset.train, c.batch_size, layout, shuffle=True, augment=True, drop_last=True,
                            seed=c.seed, channels_last=c.channels_last, device=device)
        evals = c.epochs * len(test) if test is not None else 0
        budget = fit_steps_to_budget(qm, probe, prec.bf16, c.budget_minutes, c.epochs, evals)
        steps = min(steps, budget["steps_per_epoch"])
        log(f"QAT budget {c.budget_minutes:g} min: {budget['step_seconds']:.3f} s per step measured -> "
            f"{steps} steps per epoch")
    history, t0 = [], time.monotonic()
    for epoch in range(c.epochs):
        # 3. the phase switches, at the start of the epoch (torchvision's convention)
        if epoch >= c.freeze_bn_epoch:
            freeze_bn(qm)
        if epoch >= c.freeze_observer_epoch:
            freeze(qm)
        loader = BatchLoader(dataset.train, c.batch_size, layout, shuffle=True, augment=True, drop_last=True,
                             seed=c.seed, channels_last=c.channels_last, device=device)
        loader.set_epoch(epoch)
        stats = train_one_epoch(qm, loader, opt, None, bf16=prec.bf16, max_steps=steps,
                                after_step=keeper.after_step if keeper else None, desc=f"QAT {epoch + 1}/{c.epochs}")
        _check_finite(stats, epoch)
        stats.update(epoch=epoch + 1, seconds=round(time.monotonic() - t0, 1),
                     bn_frozen=epoch >= c.freeze_bn_epoch, observers_frozen=epoch >= c.freeze_observer_epoch)
        if test is not None:
            with observers_paused(qm):
                stats["test_acc"] = evaluate(qm, test, layout, device=device, channels_last=c.channels_last,
                                             desc="QAT eval")["acc"]
        history.append(stats)
        log(f"QAT epoch {epoch + 1}/{c.epochs}: loss {stats['loss']:.4f}, train acc {stats['acc']:.4f}"
            + (f", test acc {stats['test_acc']:.4f} ({len(test)} images)" if test is not None else "")
            + f", {stats['seconds']:.0f} s")

    # 4. phase 3 whatever the epoch count, then fold
    freeze_bn(qm)
    freeze(qm)
    if keeper is not None:
        keeper.remove()
    out = to_ptq(qm.to(memory_format=torch.contiguous_format))
    out.qat_history, out.qat_config = history, c.to_dict() | {"precision": prec.to_dict(), "budget": budget}
    return out
