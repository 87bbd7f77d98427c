"""The export forward: an nn.Module built from a frozen QMobileNet whose graph carries our own quantization.

Every quantization point of the simulation becomes a `torch.ops.quantized_decomposed` quantize -> dequantize
pair with the point's frozen scale and zero-point (activations: Python float / int, the `.tensor` overloads do
not lower; weights: per-channel scale tensor and int64 zero-point tensor on axis 0). The converter in static
Q/DQ mode folds each pair into the int8 tensor's quantization parameters, so the file holds our numbers.

    graph position          in the simulation                 here
    input                   quant_in                          Q/DQ (the converter makes it the int8 input)
    conv / linear weight    w_fq(folded weight)               the simulation's fake-quantized weight + Q/DQ
    bias                    quantize_bias(b, s_in, s_w)       the same float, which the converter writes as
                                                              round(b / (s_in * s_w)): our integers
    conv output (+ReLU6)    clamp(0, 6) then out_fq           clamp (fused as RELU6) then Q/DQ
    residual add            add_fq                            Q/DQ after the add
    pool                    adaptive_avg_pool2d then pool_fq  the same (not mean(): no TRANSPOSE)
    output                  classifier out_fq                 Q/DQ (the converter makes it the int8 output)

Weight-only configurations (no activation quantizers) keep only the weight pairs; there the classifier is
written as a 1x1 conv, because the converter drops the Q/DQ around an F.linear weight (stores it as float).
Shapes are static: batch 1 (`torch.export` fixes the sample's batch). Ranges, zero-points, the weight axis and
the integer dtypes are the quantizers' specs (quantize/spec.py); the order of operations is the one graph walk
(quantize/graph.py). The converter names the file's tensors after the module nesting and the module and class
names here, so renaming them changes the file's bytes (not its numbers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantize import graph
from quantize.fakequant import FakeQuant
from quantize.qmodel import QLayer, QMobileNet

__all__ = ["QDQMobileNet", "ActQ"]

qd = torch.ops.quantized_decomposed


class ActQ(nn.Module):
    """A frozen per-tensor activation quantization point as plain numbers (scale, zero-point, range, dtype)."""

    def __init__(self, fq: FakeQuant):
        super().__init__()
        assert isinstance(fq, FakeQuant) and fq.frozen, "export needs frozen static activation quantizers"
        self.scale, self.zero_point = float(fq.scale), int(fq.zero_point)
        self.qmin, self.qmax = fq.spec.qmin, fq.spec.qmax
        self.dtype = fq.spec.storage_dtype

    def quant(self, x):
        return qd.quantize_per_tensor(x, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)

    def dequant(self, q):
        return qd.dequantize_per_tensor(q, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)

    def forward(self, x):
        return self.dequant(self.quant(x))

    def extra_repr(self):
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}, dtype={self.dtype}"


def _act(fq) -> ActQ | None:
    return ActQ(fq) if fq is not None else None


class _Layer(nn.Module):
    """One QLayer as constants: weight (already fake-quantized by the simulation), its per-channel Q/DQ, bias."""

    def __init__(self, layer: QLayer, as_conv1x1: bool = False):
        super().__init__()
        with torch.no_grad():
            w, b = layer.folded_weight_bias()
            w_hat = layer.quant_weight(w)
            b_hat = layer.quant_bias_value(b)
        op = layer.op
        self.is_linear = isinstance(op, nn.Linear)
        self.as_conv = as_conv1x1 and self.is_linear
        if self.as_conv:
            w_hat = w_hat.reshape(*w_hat.shape, 1, 1)
        self.register_buffer("weight", w_hat.detach().clone().float())
        self.register_buffer("bias", b_hat.detach().clone().float())
        self.relu6 = layer.relu6
        if not self.is_linear:
            self.stride, self.padding, self.groups = op.stride, op.padding, op.groups
        self.w_q = None
        if layer.w_fq is not None:
            fq = layer.w_fq
            self.w_qmin, self.w_qmax, self.w_dtype = fq.spec.qmin, fq.spec.qmax, fq.spec.storage_dtype
            self.w_axis = fq.spec.axis  # PyTorch layout: output channels (the converter moves it for depthwise)
            if fq.spec.per_channel:
                self.register_buffer("w_scale", fq.scale.detach().clone().float())
                self.register_buffer("w_zp", fq.zero_point.detach().clone().to(torch.int64))
                self.w_q = "channel"
            else:
                self.w_scale_f, self.w_zp_i = float(fq.scale), int(fq.zero_point)
                self.w_q = "tensor"
        self.out = _act(layer.out_fq)

    def qweight(self):
        w = self.weight
        if self.w_q is None:
            return w
        dt = self.w_dtype
        if self.w_q == "channel":
            q = qd.quantize_per_channel(w, self.w_scale, self.w_zp, self.w_axis, self.w_qmin, self.w_qmax, dt)
            return qd.dequantize_per_channel(q, self.w_scale, self.w_zp, self.w_axis, self.w_qmin, self.w_qmax, dt)
        q = qd.quantize_per_tensor(w, self.w_scale_f, self.w_zp_i, self.w_qmin, self.w_qmax, dt)
        return qd.dequantize_per_tensor(q, self.w_scale_f, self.w_zp_i, self.w_qmin, self.w_qmax, dt)

    def forward(self, x):
        w = self.qweight()
        if self.is_linear and not self.as_conv:
            y = F.linear(x, w, self.bias)
        elif self.as_conv:  # (N, C, 1, 1) -> (N, classes, 1, 1)
            y = F.conv2d(x, w, self.bias)
        else:
            y = F.conv2d(x, w, self.bias, self.stride, self.padding, 1, self.groups)
        if self.relu6:
            y = torch.clamp(y, 0.0, 6.0)
        return self.out(y) if self.out is not None else y


class _Block(nn.Module):
    def __init__(self, block, as_conv1x1: bool):
        super().__init__()
        self.conv = nn.Sequential(*[_Layer(layer, as_conv1x1) for layer in block.conv])
        self.use_res_connect = block.use_res_connect
        self.add_q = _act(block.add_fq) if self.use_res_connect else None

    def forward(self, x):
        return graph.block(self, x, _QDQ)


class QDQMobileNet(nn.Module):
    """forward: (1, 3, H, W) float [or (1, H, W, 3) with nhwc] -> (1, classes) float, Q/DQ at every point.

    The converter turns the input Q and the output DQ into the int8 graph's input and output tensors (with the
    input quantizer's and the classifier quantizer's scale and zero-point); see `flatbuffer.add_float_io`.
    """

    def __init__(self, qm: QMobileNet, nhwc: bool = False):
        super().__init__()
        self.in_q, self.pool_q = _act(qm.quant_in), _act(qm.pool_fq)
        self.nhwc = nhwc
        weight_only = qm.quant_in is None and any(layer.w_fq is not None for layer in _all_layers(qm))
        feats = []
        for m in qm.features:
            feats.append(_Layer(m, weight_only) if isinstance(m, QLayer) else _Block(m, weight_only))
        self.features = nn.Sequential(*feats)
        self.classifier = _Layer(qm.classifier, as_conv1x1=weight_only)
        self.out_q = self.classifier.out

    def forward(self, x):
        if self.nhwc:  # (N, H, W, 3) -> (N, 3, H, W); cancels against the converter's own layout transpose
            x = x.permute(0, 3, 1, 2)
        return graph.network(self, x, _QDQ).flatten(1)  # (N, classes)


class _QDQOps(graph.Ops):
    """The graph with a Q/DQ pair at every quantization point (the modules above hold the numbers)."""

    def input(self, net, x):
        return net.in_q(x) if net.in_q is not None else x

    def sequence(self, seq, x):
        return seq(x)  # nn.Sequential of _Layer / _Block: the module nesting the file's tensor names follow

    def layer(self, layer, x):
        return layer(x)

    def add(self, block, skip, y):
        y = skip + y
        return block.add_q(y) if block.add_q is not None else y

    def pool(self, net, x):
        x = F.adaptive_avg_pool2d(x, 1)  # (N, C, 1, 1): MEAN in the file, no TRANSPOSE
        if net.pool_q is not None:
            x = net.pool_q(x)
        return x if net.classifier.as_conv else x.flatten(1)


_QDQ = _QDQOps()


def _all_layers(qm):
    return [m for m in qm.modules() if isinstance(m, QLayer)]
