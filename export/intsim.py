"""Integer reference simulation of our int8 static graph: the int8 codes the LiteRT interpreter computes.

The float fake-quant simulation (`validate.sim_outputs`) rounds where the real kernels round, but not the way
they round: a 1-LSB difference at a rounding tie in one layer moves the next layer's input, and over 52 layers
the output drifts by up to 2 LSB. This module reproduces the runtime's integer arithmetic instead, op by op
(export/kernels.py: XNNPACK's or the builtin kernels'), from our own frozen QMobileNet parameters (never from the
file: it is the independent reference the file is checked against), in the order of the one graph walk
(quantize/graph.py). The kernel set is chosen for the whole network, except for the layers named in
`builtin_layers`: a file's INT4 convs leave the XNNPACK delegate (export/int4.py), so under XNNPACK those layers
get the builtin arithmetic and everything else XNNPACK's.

Edges: the NCHW input TRANSPOSE and PAD move codes without arithmetic (PAD fills with the input zero-point,
which is what zero-padding of x_q - x_zp means here). Float-io QUANTIZE / DEQUANTIZE are not modelled: the
int8 input codes are `quantize(images)` with the input quantizer, as `validate.run_file` feeds them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from quantize import graph
from quantize.core import quantize
from quantize.fakequant import FakeQuant
from quantize.qmodel import QLayer, QMobileNet, qlayers

from . import kernels as K
from .kernels import KERNELS, f32

__all__ = ["int_outputs", "int_forward", "int_matmul", "layer_int", "KERNELS"]


# ---------------------------------------------------------------------------------------------- the graph

def _act(fq) -> tuple[float, int]:
    return float(f32(fq.scale)), int(fq.zero_point)


_F32_EXACT = 1 << 24  # every integer of magnitude <= 2^24 is a float32


def _apply(op: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(op, nn.Conv2d):
        return F.conv2d(x, w, None, op.stride, op.padding, op.dilation, op.groups)
    return F.linear(x, w)


def int_matmul(xc: torch.Tensor, wq: torch.Tensor, op: nn.Module, exact64: bool = False) -> torch.Tensor:
    """The exact integer accumulators sum (x_q - x_zp) * w_q of a conv or linear `op` (no bias): float32 when
    every value is below 2^24, float64 otherwise (exact either way). xc and wq hold integers (any dtype).

    Fast and still exact: in float32, a sum of integer products is exact in any order (direct convolution,
    blocked GEMM, FMA) as long as every partial sum stays below 2^24 in magnitude, which holds when
    max|x| * max_c sum_k |w[c, k]| < 2^24. Layers whose bound is larger (a wide pointwise conv, the classifier)
    are split along their input channels into chunks that each meet it; the chunks are summed in float64.
    Depthwise convs (9 taps) always fit. `exact64=True` computes everything in float64 instead (exact below
    2^53, several times slower): the reference the fast path is tested against. The fast result is checked to be
    integral, which catches a non-direct algorithm (e.g. Winograd) that would not be exact.
    """
    if exact64:
        return _apply(op, xc.double(), wq.double())
    xmax = int(xc.abs().max()) if xc.numel() else 0
    wq = wq.float()
    groups = getattr(op, "groups", 1)
    cin = wq.shape[1]  # input channels per group
    bound = xmax * int(wq.abs().flatten(1).sum(1).max())
    if groups > 1 and bound >= _F32_EXACT:  # not met by depthwise convs (9 taps); other grouped convs: exact path
        return int_matmul(xc, wq, op, exact64=True)
    chunks = [(0, cin)]
    if groups == 1 and bound >= _F32_EXACT:
        # per input channel, its largest |w| sum over its taps for any output channel bounds its contribution
        per_cin = (wq.abs().flatten(2).sum(2) if wq.dim() > 2 else wq.abs()).double()        # (cout, cin)
        chunks, start, running = [], 0, torch.zeros(wq.shape[0], dtype=torch.float64)
        for i in range(cin):
            nxt = running + per_cin[:, i]
            if xmax * float(nxt.max()) >= _F32_EXACT and i > start:
                chunks.append((start, i))
                start, nxt = i, per_cin[:, i].clone()
            running = nxt
        chunks.append((start, cin))
    xc = xc.float()
    acc = None
    for a, b in chunks:
        xs, ws = (xc, wq) if len(chunks) == 1 else (xc[:, a:b], wq[:, a:b])
        part = _apply(op, xs, ws)
        if not torch.equal(part, part.round()):
            raise RuntimeError("float32 accumulation was not exact (a non-direct convolution algorithm?)")
        acc = part if acc is None else acc.double() + part.double()
    return acc


def layer_int(layer: QLayer, x: torch.Tensor, in_qp: tuple[float, int], kernels: str,
              exact64: bool = False) -> torch.Tensor:
    """One conv / linear with its fused ReLU6 on codes x (N, C, H, W) or (N, C) -> codes: float32 holding
    integers (xnnpack; exact, and much faster than int64 arithmetic) or int64 (builtin)."""
    s_in, zp_in = in_qp
    s_out, zp_out = _act(layer.out_fq)
    xc = x.float() - zp_in  # exact; zero padding of x - zp = PAD / implicit padding with zp
    bias = layer.bias_codes().reshape([1, -1] + [1] * (x.dim() - 2))
    acc = int_matmul(xc, layer.weight_codes(), layer.op, exact64)  # float64 or float32 (see int_matmul), exact
    if acc.dtype == torch.float32 and kernels == "xnnpack" and int(bias.abs().max()) <= _F32_EXACT:
        # both terms exact in float32, so one float32 addition is (float) of the exact int32 sum, rounded to
        # nearest even: what requant_fp32 does to the int32 accumulator anyway
        acc = acc + bias.float()
    else:
        acc = acc.double() + bias.double()   # exact int32 accumulators
    s_w = layer.w_fq.scale.detach().float().reshape(-1).numpy()
    lo, hi = K.QMIN, K.QMAX
    if kernels == "xnnpack":
        if layer.relu6:
            lo, hi = K.qs8_quantize(0.0, s_out, zp_out), K.qs8_quantize(6.0, s_out, zp_out)
        return K.requant_fp32(acc, K.conv_scale_xnnpack(s_in, s_w, s_out), zp_out, lo, hi, codes_dtype=torch.float32)
    if layer.relu6:
        lo = max(lo, K.tflite_quantize_act(0.0, s_out, zp_out))
        hi = min(hi, K.tflite_quantize_act(6.0, s_out, zp_out))
    # DEPTHWISE_CONV_2D: TFLite's own per-channel kernel (gemmlowp rounding); CONV_2D / FULLY_CONNECTED: ruy
    return K.requant_builtin(acc.to(torch.int64), s_in, s_w, s_out, zp_out, lo, hi, ruy=not layer.is_depthwise)


class _IntOps(graph.Ops):
    """A value is (codes, (scale, zero-point)): the codes of a tensor and the quantization they are in.
    `builtin`: the conv / linear modules that run on the builtin kernels whatever `kernels` says (an INT4 weight
    that XNNPACK rejects, export/int4.py)."""

    def __init__(self, kernels: str, exact64: bool, builtin: frozenset = frozenset()):
        self.kernels, self.exact64, self.builtin = kernels, exact64, builtin
        self.add_op = K.add_xnnpack if kernels == "xnnpack" else K.add_builtin
        self.mean_op = K.mean_xnnpack if kernels == "xnnpack" else K.mean_builtin

    def input(self, net, codes):
        return codes.to(torch.int64), _act(net.quant_in)

    def layer(self, layer, v):
        kernels = "builtin" if id(layer) in self.builtin else self.kernels
        return layer_int(layer, v[0], v[1], kernels, self.exact64), _act(layer.out_fq)

    def add(self, block, skip, v):
        (a, (s_a, zp_a)), (b, (s_b, zp_b)), (s_out, zp_out) = skip, v, _act(block.add_fq)
        return self.add_op(a, zp_a, s_a, b, zp_b, s_b, s_out, zp_out), (s_out, zp_out)

    def pool(self, net, v):
        (x, (s_in, zp_in)), (s_out, zp_out) = v, _act(net.pool_fq)
        return self.mean_op(x, zp_in, s_in, s_out, zp_out), (s_out, zp_out)


def _builtin_modules(qm: QMobileNet, builtin_layers) -> frozenset:
    layers = qlayers(qm)
    unknown = sorted(set(builtin_layers) - set(layers))
    if unknown:
        raise ValueError(f"builtin_layers names layers the model does not have: {unknown[:3]}")
    return frozenset(id(layers[n]) for n in builtin_layers)


@torch.no_grad()
def int_forward(qm: QMobileNet, codes: torch.Tensor, kernels: str = "xnnpack", exact64: bool = False,
                builtin_layers=()) -> torch.Tensor:
    """Input codes (N, 3, H, W) of the input quantizer -> output codes (N, classes), int64. `builtin_layers`:
    names (quantize.qmodel.qlayers) of the conv / linear layers computed with the builtin arithmetic whatever
    `kernels` says: in a file whose INT4 convs leave the XNNPACK delegate, the kernels that run them."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels should be one of {KERNELS}, not {kernels!r}")
    ops = _IntOps(kernels, exact64, _builtin_modules(qm, builtin_layers))
    codes, _ = graph.network(qm, codes, ops)
    return codes.to(torch.int64)


def _check_supported(qm: QMobileNet):
    if not isinstance(qm.quant_in, FakeQuant) or qm.quant_in.spec.bits != 8:
        raise ValueError("the integer simulation covers static int8 activations (W8A8) only")
    for layer in qlayers(qm).values():
        if layer.w_fq is None or layer.w_fq.spec.bits > 8 or not layer.w_fq.frozen:
            raise ValueError("the integer simulation needs frozen weight quantizers of 8 bits or fewer "
                             "(4-bit codes are int8 values in [-7, 7] to the kernels, packed in the file or not)")


@torch.no_grad()
def int_outputs(qm: QMobileNet, images: torch.Tensor, kernels: str = "xnnpack", batch: int = 64,
                exact64: bool = False, builtin_layers=()) -> torch.Tensor:
    """int8 output codes (N, classes), as int64, that the file computes for float images (N, 3, H, W) fed as
    the input quantizer's codes (what `validate.run_file` does with an int8-input file); `builtin_layers` as in
    `int_forward`."""
    _check_supported(qm)
    fq = qm.quant_in
    outs = []
    for i in tqdm(range(0, len(images), batch), desc=f"integer simulation ({kernels})", unit="batch",
                  leave=False, disable=None, mininterval=1.0):
        codes = quantize(images[i:i + batch], fq.scale, fq.zero_point, fq.spec.qmin, fq.spec.qmax)
        outs.append(int_forward(qm, codes, kernels, exact64, builtin_layers))
    return torch.cat(outs) if outs else torch.zeros(0, qm.classifier.op.out_features, dtype=torch.int64)
