"""The quantization simulation of MobileNetV2, with quantization points exactly where an int8 LiteRT graph has
them:

    point                               module
    the input                           QMobileNet.quant_in
    each conv output, after its ReLU6   QLayer.out_fq        (ReLU6 is a clamp before it, never its own op)
    each residual ADD output            QInvertedResidual.add_fq
    the pooled features                 QMobileNet.pool_fq
    the classifier output               classifier QLayer.out_fq

Dynamic range (8-bit dynamic activations, `Target.dynamic_inputs`): no output points; each QLayer quantizes its
own float input per image (`QLayer.in_fq`), as LiteRT's hybrid kernels do, and every other op stays float.

Each conv/linear is a `QLayer`: weight fake-quant per output channel (or per tensor), bias as the int32 value at
s_in * s_w when activations are static integers. For PTQ the BN is folded into the conv before `prepare`; for
QAT the QLayer keeps its BN and simulates the fold (batch statistics until `freeze_bn`, then running ones), so
a QAT model with frozen BN and observers computes exactly what its PTQ conversion (`to_ptq`) computes.
Module paths mirror the float model (`features.3.conv.1` is the same layer in both). The order of operations is
the one graph walk (quantize/graph.py); the ranges, zero-points and bias rule are the target's (quantize/spec.py).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mobilenet.fold import fold_bn, fold_model
from mobilenet.model import ConvBNAct, InvertedResidual, MobileNetV2

from . import graph
from .config import QuantConfig
from .core import bias_codes, quantize, quantize_bias
from .fakequant import DynamicFakeQuant, FakeQuant
from .graph import link_inputs

__all__ = ["QLayer", "QInvertedResidual", "QMobileNet", "prepare", "calibrate", "freeze", "to_ptq",
           "qlayers", "quant_points", "set_observe", "freeze_bn", "weight_bytes"]


def _act_quant(cfg: QuantConfig):
    """The quantization point at an op's output: static, dynamic (per sample) or none."""
    spec = cfg.target.activation
    if cfg.target.dynamic_inputs:   # quantized at each conv / FC input instead (QLayer.in_fq)
        return None
    if cfg.act_mode == "static":
        return FakeQuant(spec, cfg.act_observer)
    if cfg.act_mode == "dynamic":
        return DynamicFakeQuant(spec)
    return None


class QLayer(nn.Module):
    """conv or linear (+ BN kept for QAT) -> optional ReLU6 clamp -> output quantization point."""

    def __init__(self, op: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None, relu6: bool, cfg: QuantConfig):
        super().__init__()
        self.op, self.bn, self.relu6 = op, bn, relu6
        c_out = op.out_channels if isinstance(op, nn.Conv2d) else op.out_features
        target = cfg.target
        w_spec = target.weight_of(self.is_depthwise)
        self.w_fq = FakeQuant(w_spec, cfg.weight_observer, channels=c_out) if w_spec is not None else None
        self.w_half = cfg.fp16_weights   # weights rounded to IEEE half (LiteRT's fp16 storage), no integer grid
        self.out_fq = _act_quant(cfg)
        # dynamic range: the input as the hybrid kernel quantizes it on every run, per image
        self.in_fq = DynamicFakeQuant(target.activation) if target.dynamic_inputs else None
        self.bias_spec = target.bias  # None: the bias stays float (no integer accumulator to add it to)
        self.bn_frozen = False
        self.__dict__["input_fq"] = None  # the quantization point feeding this layer (not a child module)

    @property
    def is_depthwise(self) -> bool:
        return isinstance(self.op, nn.Conv2d) and self.op.groups > 1 and self.op.groups == self.op.in_channels

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float weight and bias the integer kernel implements (BN folded with running statistics)."""
        w, b = self.op.weight, self.op.bias
        if self.bn is not None:
            return fold_bn(w, b, self.bn.running_mean, self.bn.running_var, self.bn.eps, self.bn.weight, self.bn.bias)
        return w, (b if b is not None else torch.zeros(w.shape[0], device=w.device))

    def quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.w_fq is None:
            if not self.w_half:
                return w
            return w + (w.half().to(w.dtype) - w).detach()   # value: the half-rounded weight; gradient straight
        if not self.w_fq.frozen:  # weight ranges follow the current weight, never a running history
            self.w_fq.observer.reset()
            self.w_fq.fake_quant = True
        return self.w_fq(w)

    def quant_bias_value(self, b: torch.Tensor) -> torch.Tensor:
        fq = self.input_fq
        if self.bias_spec is None or self.w_fq is None or fq is None or not isinstance(fq, FakeQuant):
            return b
        if not (fq.frozen or fq.fake_quant):  # calibration: the input scale is not known yet
            return b
        qb = quantize_bias(b, float(fq.scale), self.w_fq.scale, self.bias_spec).to(b.dtype)
        return qb.detach() + (b - b.detach())  # value qb exactly; gradient straight through (QAT trains biases)

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """The integer weight (int64, PyTorch layout) the file holds: the folded weight on the frozen grid."""
        fq = self.w_fq
        w, _ = self.folded_weight_bias()
        return quantize(w.detach(), fq.scale, fq.zero_point, fq.spec.qmin, fq.spec.qmax, fq.axis).to(torch.int64)

    @torch.no_grad()
    def bias_codes(self) -> torch.Tensor:
        """The integer bias (int64, per output channel) the file holds: what `quant_bias_value` adds, as codes."""
        assert self.bias_spec is not None, "only a layer of an integer graph (static activations) has bias codes"
        _, b = self.folded_weight_bias()
        return bias_codes(b, float(self.input_fq.scale), self.w_fq.scale, self.bias_spec)

    def _op(self, x, w, b):
        if isinstance(self.op, nn.Conv2d):
            return F.conv2d(x, w, b, self.op.stride, self.op.padding, self.op.dilation, self.op.groups)
        return F.linear(x, w, b)

    def _post(self, y):
        """ReLU6 (a clamp of the output range) and the output quantization point, in place in y (the fresh
        conv / BN output) when the point is a static FakeQuant: one fused pass, no extra activation tensor."""
        if isinstance(self.out_fq, FakeQuant):
            return self.out_fq.forward_inplace(y, self.relu6)
        if self.relu6:
            # the same min/max either way; hardtanh's backward is one kernel where clamp's is five passes
            y = F.hardtanh(y, 0.0, 6.0) if y.requires_grad else torch.clamp(y, 0.0, 6.0)
        return self.out_fq(y) if self.out_fq is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_fq is not None:
            x = self.in_fq(x)
        if self.bn is not None and self.training and not self.bn_frozen:
            return self._forward_batch_stats(x)
        w, b = self.folded_weight_bias()
        return self._post(self._op(x, self.quant_weight(w), self.quant_bias_value(b)))

    def _forward_batch_stats(self, x):
        """QAT before the BN freeze (Krishnamoorthi 2018, sec. 3.2): quantize the weight folded with running
        statistics, then undo that scale and let BN normalize with batch statistics (and update running ones).
        The scale is undone on the quantized weight, (C_out, ...), not on the conv output, (N, C_out, H, W):
        the same up to float rounding, and one pass over the activation less each way."""
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
        w = self.op.weight * scale.reshape(-1, 1, 1, 1)
        y = self._op(x, self.quant_weight(w) / scale.reshape(-1, 1, 1, 1), None)
        if self.op.bias is not None:
            y = y + self.op.bias.reshape(1, -1, 1, 1)
        return self._post(bn(y))


class QInvertedResidual(nn.Module):
    def __init__(self, block: InvertedResidual, layers: list[QLayer], cfg: QuantConfig):
        super().__init__()
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = block.use_res_connect
        self.add_fq = _act_quant(cfg) if self.use_res_connect else None

    def forward(self, x):
        return graph.block(self, x, _FAKE_QUANT)


class QMobileNet(nn.Module):
    def __init__(self, model: MobileNetV2, cfg: QuantConfig, qat: bool = False):
        super().__init__()
        self.model_cfg, self.qcfg, self.qat = model.cfg, cfg, qat
        self.quant_in = _act_quant(cfg)
        feats = []
        for m in model.features:
            if isinstance(m, ConvBNAct):
                feats.append(self._layer(m, cfg))
            else:
                feats.append(QInvertedResidual(m, [self._layer(c, cfg) for c in m.conv], cfg))
        self.features = nn.Sequential(*feats)
        self.pool_fq = _act_quant(cfg)
        self.dropout = copy.deepcopy(model.classifier[0])
        self.classifier = QLayer(copy.deepcopy(model.classifier[1]), None, False, cfg)
        link_inputs(self)

    @staticmethod
    def _layer(m: ConvBNAct, cfg: QuantConfig) -> QLayer:
        bn = m[1] if isinstance(m[1], nn.BatchNorm2d) else None
        return QLayer(copy.deepcopy(m[0]), copy.deepcopy(bn), isinstance(m[2], nn.ReLU6), cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) float -> (N, classes) float
        return graph.network(self, x, _FAKE_QUANT)


class _FakeQuantOps(graph.Ops):
    """The graph in float with fake quantization: each node's output through its quantization point."""

    def input(self, net, x):
        return net.quant_in(x) if net.quant_in is not None else x

    def sequence(self, seq, x):
        return seq(x)  # nn.Sequential: each QLayer / QInvertedResidual runs its own forward

    def layer(self, layer, x):
        return layer(x)

    def add(self, block, skip, y):
        y = skip + y
        if isinstance(block.add_fq, FakeQuant):
            return block.add_fq.forward_inplace(y)  # y is the ADD's fresh output
        return block.add_fq(y) if block.add_fq is not None else y

    def pool(self, net, x):
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return net.pool_fq(x) if net.pool_fq is not None else x

    def dropout(self, net, x):
        return net.dropout(x)


_FAKE_QUANT = _FakeQuantOps()


def prepare(model: MobileNetV2, cfg: QuantConfig, qat: bool = False) -> QMobileNet:
    """The quantization simulation of `model` (not modified). PTQ folds BN first; QAT keeps it to simulate."""
    src = copy.deepcopy(model) if qat else fold_model(model)
    qm = QMobileNet(src, cfg, qat=qat)
    return qm.train(model.training) if qat else qm.eval()


def qlayers(qm: nn.Module) -> dict[str, QLayer]:
    return {n: m for n, m in qm.named_modules() if isinstance(m, QLayer)}


def quant_points(qm: nn.Module) -> dict[str, FakeQuant]:
    """Activation quantization points by module path, in forward order."""
    return {n: m for n, m in qm.named_modules() if isinstance(m, FakeQuant) and not n.endswith("w_fq")}


def set_observe(qm: nn.Module, observe: bool, fake_quant: bool):
    for fq in quant_points(qm).values():
        if not fq.frozen:
            fq.observe, fq.fake_quant = observe, fake_quant


@torch.no_grad()
def calibrate(qm: QMobileNet, batches) -> int:
    """Run float batches through with observers on and fake quantization off. Returns images seen."""
    set_observe(qm, True, False)
    was = qm.training
    qm.eval()
    n = 0
    for x in batches:
        x = x[0] if isinstance(x, (tuple, list)) else x
        qm(x)
        n += len(x)
    qm.train(was)
    return n


@torch.no_grad()
def freeze(qm: QMobileNet) -> QMobileNet:
    """Fix every activation range and every weight scale; the forward is then a pure function of buffers."""
    for fq in quant_points(qm).values():
        fq.freeze()
    for layer in qlayers(qm).values():
        if layer.w_fq is not None and not layer.w_fq.frozen:
            w, _ = layer.folded_weight_bias()
            layer.quant_weight(w)
            layer.w_fq.freeze()
    return qm


def freeze_bn(qm: nn.Module):
    """QAT: switch folded-BN simulation from batch to running statistics and stop updating them."""
    for layer in qlayers(qm).values():
        if layer.bn is not None:
            layer.bn_frozen = True
            layer.bn.eval()


@torch.no_grad()
def to_ptq(qm: QMobileNet) -> QMobileNet:
    """A copy in which every BN kept for QAT is folded into its conv; with frozen BN and observers it computes
    exactly what `qm` computes in eval mode (the fold is the same `fold_bn` call)."""
    out = copy.deepcopy(qm).eval()
    for layer in qlayers(out).values():
        if layer.bn is None:
            continue
        w, b = layer.folded_weight_bias()
        conv = layer.op
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        groups=conv.groups, bias=True)
        new.weight.copy_(w)
        new.bias.copy_(b)
        layer.op, layer.bn = new, None
    out.qat = False
    return out


def weight_bytes(qm: QMobileNet) -> int:
    """Bytes of conv/linear weights at the configured width (bits * count / 8), biases at 32 bits."""
    total_bits = 0
    for layer in qlayers(qm).values():
        bits = layer.w_fq.spec.bits if layer.w_fq is not None else 16 if layer.w_half else 32
        total_bits += layer.op.weight.numel() * bits + layer.op.weight.shape[0] * 32
    return total_bits // 8
