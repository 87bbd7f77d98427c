"""Layer-by-layer passes over a QMobileNet with two streams side by side, for the PTQ methods that fix one
layer at a time (bias correction, AdaRound):

    stream   computes                                             used as
    float    every layer with its reference float weight/bias    target of a layer's reconstruction
    quant    every layer as the QMobileNet runs it, with the      input of the layer being fixed, so a layer
             layers already fixed (activations not quantized)    also corrects the error of those before it

`visit(name, layer, x_float, x_quant)` is called before each layer is applied, in forward order, and may change
the layer; both streams then go through it. The whole calibration batch flows at once (a few hundred images), so
each layer is visited once. The forward order mirrors `QMobileNet.forward`; `walk` returns the quant-stream
logits, which the tests compare with `qm(x)`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .qmodel import QInvertedResidual, QLayer, QMobileNet, qlayers, quant_points, set_observe

__all__ = ["reference_weights", "float_forward", "walk"]


@torch.no_grad()
def reference_weights(qm: QMobileNet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's float (folded) weight and bias, by module path, taken before any method runs."""
    return {n: tuple(t.detach().clone() for t in layer.folded_weight_bias()) for n, layer in qlayers(qm).items()}


def float_forward(layer: QLayer, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The layer in float with weight `w` and bias `b`, after its ReLU6 clamp, without the output quantization."""
    y = layer._op(x, w, b)
    return torch.clamp(y, 0.0, 6.0) if layer.relu6 else y


def walk(qm: QMobileNet, x: torch.Tensor, visit: Callable, ref: dict | None = None) -> torch.Tensor:
    """Run `x` (N, 3, H, W) through both streams, calling `visit` before every QLayer. Returns quant logits."""
    ref = reference_weights(qm) if ref is None else ref
    names = {id(m): n for n, m in qlayers(qm).items()}
    was = qm.training
    qm.eval()
    saved = {n: (fq.observe, fq.fake_quant) for n, fq in quant_points(qm).items()}
    set_observe(qm, False, False)  # activation points pass through; frozen ones (none in PTQ) would still act

    def step(layer, xf, xq):
        name = names[id(layer)]
        with torch.enable_grad():
            visit(name, layer, xf, xq)
        with torch.no_grad():
            return float_forward(layer, xf, *ref[name]), layer(xq)

    try:
        with torch.no_grad():
            xf = x
            xq = qm.quant_in(x) if qm.quant_in is not None else x
        for m in qm.features:
            if isinstance(m, QLayer):
                xf, xq = step(m, xf, xq)
                continue
            assert isinstance(m, QInvertedResidual)
            inf, inq = xf, xq
            for layer in m.conv:
                xf, xq = step(layer, xf, xq)
            if m.use_res_connect:
                with torch.no_grad():
                    xf = inf + xf
                    xq = inq + xq
                    xq = m.add_fq(xq) if m.add_fq is not None else xq
            del inf, inq
        with torch.no_grad():
            xf = torch.flatten(F.adaptive_avg_pool2d(xf, 1), 1)
            xq = torch.flatten(F.adaptive_avg_pool2d(xq, 1), 1)
            xq = qm.pool_fq(xq) if qm.pool_fq is not None else xq
        _, out = step(qm.classifier, xf, qm.dropout(xq))
    finally:
        for n, fq in quant_points(qm).items():
            fq.observe, fq.fake_quant = saved[n]
        qm.train(was)
    return out

