"""Layer-by-layer passes over a QMobileNet with two streams side by side, for the PTQ methods that fix one
layer at a time (bias correction, AdaRound):

    stream   computes                                             used as
    float    every layer with its reference float weight/bias    target of a layer's reconstruction
    quant    every layer as the QMobileNet runs it, with the      input of the layer being fixed, so a layer
             layers already fixed (activations not quantized)    also corrects the error of those before it

`visit(name, layer, x_float, x_quant)` is called before each layer is applied, in forward order, and may change
the layer; both streams then go through it. The whole calibration batch flows at once (a few hundred images), so
each layer is visited once. The order is the one graph walk (quantize/graph.py) that `QMobileNet.forward` runs
too; `walk` returns the quant-stream logits, which the tests compare with `qm(x)`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .graph import Ops, network
from .qmodel import QLayer, QMobileNet, qlayers, quant_points, set_observe

__all__ = ["reference_weights", "float_forward", "walk"]


@torch.no_grad()
def reference_weights(qm: QMobileNet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's float (folded) weight and bias, by module path, taken before any method runs."""
    return {n: tuple(t.detach().clone() for t in layer.folded_weight_bias()) for n, layer in qlayers(qm).items()}


def float_forward(layer: QLayer, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The layer in float with weight `w` and bias `b`, after its ReLU6 clamp, without the output quantization."""
    y = layer._op(x, w, b)
    return torch.clamp(y, 0.0, 6.0) if layer.relu6 else y


class _TwoStreams(Ops):
    """A value is (float stream, quant stream); `visit` runs before each layer, under autograd."""

    def __init__(self, names: dict, ref: dict, visit: Callable):
        self.names, self.ref, self.visit = names, ref, visit

    def input(self, net, x):
        with torch.no_grad():
            return x, (net.quant_in(x) if net.quant_in is not None else x)

    def layer(self, layer, v):
        name = self.names[id(layer)]
        with torch.enable_grad():
            self.visit(name, layer, *v)
        with torch.no_grad():
            return float_forward(layer, v[0], *self.ref[name]), layer(v[1])

    def add(self, block, skip, v):
        with torch.no_grad():
            xq = skip[1] + v[1]
            return skip[0] + v[0], (block.add_fq(xq) if block.add_fq is not None else xq)

    def pool(self, net, v):
        with torch.no_grad():
            xf, xq = (torch.flatten(F.adaptive_avg_pool2d(t, 1), 1) for t in v)
            return xf, (net.pool_fq(xq) if net.pool_fq is not None else xq)

    def dropout(self, net, v):
        return v[0], net.dropout(v[1])


def walk(qm: QMobileNet, x: torch.Tensor, visit: Callable, ref: dict | None = None) -> torch.Tensor:
    """Run `x` (N, 3, H, W) through both streams, calling `visit` before every QLayer. Returns quant logits."""
    ref = reference_weights(qm) if ref is None else ref
    names = {id(m): n for n, m in qlayers(qm).items()}
    was = qm.training
    qm.eval()
    saved = {n: (fq.observe, fq.fake_quant) for n, fq in quant_points(qm).items()}
    set_observe(qm, False, False)  # activation points pass through; frozen ones (none in PTQ) would still act
    try:
        _, out = network(qm, x, _TwoStreams(names, ref, visit))
    finally:
        for n, fq in quant_points(qm).items():
            fq.observe, fq.fake_quant = saved[n]
        qm.train(was)
    return out
