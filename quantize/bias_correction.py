"""Empirical bias correction (Nagel et al. 2019, sec. 4.2; Finkelstein et al. 2019): rounding a layer's weights
shifts the mean of its output; add the shift back to the bias, per output channel:

    b_c += E[(W x)_c] - E[(W_q x)_c] = E[((W - W_q) x)_c]

The expectation is over the calibration images (and all spatial positions); x is the layer's input in the
quantized model, so layers are corrected in forward order, each on the outputs of those already corrected.
W is the reference float weight, W_q its quantized value as the frozen model will use it.
"""
from __future__ import annotations

import torch

from .qmodel import QLayer, QMobileNet
from .walk import reference_weights, walk

__all__ = ["output_mean_shift", "bias_correct"]


@torch.no_grad()
def output_mean_shift(layer: QLayer, x: torch.Tensor, w_ref: torch.Tensor) -> torch.Tensor:
    """E[(W - W_q) x] per output channel (C_out,), over the batch and spatial positions of x."""
    w_cur, _ = layer.folded_weight_bias()
    w_q = layer.quant_weight(w_cur)
    y = layer._op(x, w_ref - w_q, None)  # (N, C_out, H, W) or (N, C_out)
    return y.mean(dim=[d for d in range(y.dim()) if d != 1])


@torch.no_grad()
def bias_correct(qm: QMobileNet, x: torch.Tensor, ref: dict | None = None) -> dict[str, float]:
    """Correct every quantized layer's bias on the images `x` (N, 3, H, W). Returns {layer: max |shift|}.

    Needs a PTQ model (BN folded, so the bias is `op.bias`)."""
    ref = reference_weights(qm) if ref is None else ref
    report = {}

    def visit(name, layer, xf, xq):
        if layer.w_fq is None:
            return
        if layer.bn is not None:
            raise ValueError("bias correction needs a PTQ model with BN folded (a QAT model: call to_ptq first)")
        shift = output_mean_shift(layer, xq, ref[name][0])
        with torch.no_grad():
            layer.op.bias.add_(shift)
        report[name] = float(shift.abs().max())

    walk(qm, x, visit, ref)
    return report
