"""How far a quantized model is from its FP32 reference: one function that every report imports.

    key            meaning
    acc_ref        top-1 of the reference logits against the labels, in [0, 1]
    acc_q          top-1 of the quantized logits
    agreement      fraction of images whose top-1 class equals the reference's top-1 class
    mse            mean over all logits of (y - y_q)^2
    snr_db         10 log10(sum y^2 / sum (y - y_q)^2) over the whole set, in dB; inf when identical
    n              images
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from mobilenet.engine import predict

__all__ = ["compare_logits", "snr_db", "weight_size_bytes", "evaluate_quantized"]


def snr_db(ref: torch.Tensor, q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `q` against `ref` in dB, summed over every element."""
    ref, q = ref.detach().double(), q.detach().double()
    noise = float(((ref - q) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def compare_logits(ref_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Metrics of `q_logits` (N, K) against `ref_logits` (N, K) and `labels` (N,); see the table above."""
    if ref_logits.shape != q_logits.shape or ref_logits.dim() != 2:
        raise ValueError(f"logits should both be (N, K): got {tuple(ref_logits.shape)} and {tuple(q_logits.shape)}")
    if labels.shape != (ref_logits.shape[0],):
        raise ValueError(f"labels should be ({ref_logits.shape[0]},), got {tuple(labels.shape)}")
    ref_logits, q_logits = ref_logits.detach(), q_logits.detach()
    ref_top, q_top = ref_logits.argmax(1), q_logits.argmax(1)
    labels = labels.to(ref_top.device)
    return {
        "acc_ref": (ref_top == labels).double().mean().item(),
        "acc_q": (q_top == labels).double().mean().item(),
        "agreement": (ref_top == q_top).double().mean().item(),
        "mse": ((ref_logits.double() - q_logits.double()) ** 2).mean().item(),
        "snr_db": snr_db(ref_logits, q_logits),
        "n": int(ref_logits.shape[0]),
    }


def weight_size_bytes(model: nn.Module, bits: int | None = None) -> int:
    """Bytes of conv/linear weights (biases at 32 bits per output channel).

    A QMobileNet: at its configured widths (`qmodel.weight_bytes`), `bits` ignored. A float model: every weight
    at `bits` (default 32), so `weight_size_bytes(fp32_model, 8)` is the size an 8-bit conversion would have.
    """
    from .qmodel import QMobileNet, weight_bytes
    if isinstance(model, QMobileNet):
        return weight_bytes(model)
    bits = 32 if bits is None else bits
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            total += m.weight.numel() * bits + m.weight.shape[0] * 32
    return total // 8


def evaluate_quantized(qm, ref_logits: torch.Tensor, split, layout: str, device, progress: bool) -> dict:
    """compare_logits of the quantized model against the FP32 logits on `split`, with its weight bytes and the
    evaluation time."""
    t0 = time.time()
    logits = predict(qm, split, layout, device=device, desc="eval quantized", disable_bar=not progress)
    out = compare_logits(ref_logits, logits, split.labels)
    out.update(weight_bytes=weight_size_bytes(qm), eval_seconds=round(time.time() - t0, 1))
    return out
