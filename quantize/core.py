"""Pure quantization arithmetic. Every function takes its parameters explicitly; modules only hold state.

Granularity is one argument, `axis`:

    axis      scale / zero_point shape        meaning
    None      () (0-dim or Python number)     one pair for the whole tensor (per tensor)
    k         (x.shape[k],)                   one pair per slice along dimension k (per channel)

Conventions follow `torch.ops.quantized_decomposed` (what the exported graph executes):
q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax), round half to even; x_hat = (q - zero_point) * scale.
"""
from __future__ import annotations

import torch

from .spec import BiasSpec, bias_spec

__all__ = ["choose_qparams", "dynamic_qparams", "quantize", "dequantize", "fake_quantize", "bias_scale", "bias_codes",
           "quantize_bias"]

_EPS = torch.finfo(torch.float32).eps
BIAS = bias_spec(8)  # the int32 bias range; what the file stores it in (int32 / int64) does not change the codes


def _shape_for(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape per-channel parameters (C,) so they broadcast along `axis` of x."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int,
                   symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero-point (int64) covering [min_val, max_val], which is first widened to hold 0.

    symmetric: scale = max(|min|, |max|) / qmax, zero-point 0 (the weight rule of the LiteRT spec); a channel
    of zeros among others takes the largest scale;
    asymmetric: scale = (max - min) / (qmax - qmin), zero-point = qmin - round(min / scale), clamped into range.
    Works elementwise, so per-channel ranges (C,) give per-channel parameters (C,).
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if torch.any(min_val > max_val):
        raise ValueError(f"min_val must not exceed max_val (got {min_val} > {max_val})")
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    if symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp(amax / float(qmax), min=_EPS)
        # A channel that is all zeros (pruned away whole) codes to 0 at any scale, but its bias is coded at
        # s_in * s_w: at the floor scale that overflows int32 and the converter rounds it its own way. The
        # layer's largest scale keeps such a bias on the grid the other channels use.
        empty = amax == 0
        if scale.dim() > 0 and bool(empty.any()) and not bool(empty.all()):
            scale = torch.where(empty, scale.max(), scale)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=_EPS)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax).to(torch.int64)
    return scale.to(torch.float32), zero_point


def dynamic_qparams(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-time parameters, one (scale, zero-point) per sample along dim 0, each shape (N,): `choose_qparams` of
    the sample's own min and max. This is what LiteRT's hybrid kernels do to a float input on every run, batch row
    by batch row (a batch-1 image: the whole tensor): tflite `AsymmetricQuantizeFloats` (conv, depthwise, per-
    channel weights) and XNNPACK's qd8 convert (`xnn_qd8_asymmetric_quantization_params`) both take
    [min(0, x), max(0, x)] onto [-128, 127]. They differ from this float32 rule only in the last rounding
    (double vs float scale, ties away from zero vs to even): the drift export's validation measures."""
    flat = x.detach().reshape(x.shape[0], -1)
    return choose_qparams(flat.amin(1), flat.amax(1), qmin, qmax, symmetric)


def quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """Float -> integer codes (returned as int32). `scale`/`zero_point`: numbers or tensors, see the table above."""
    scale = _shape_for(torch.as_tensor(scale, dtype=torch.float32, device=x.device), x, axis)
    zp = _shape_for(torch.as_tensor(zero_point, device=x.device), x, axis)
    return torch.clamp(torch.round(x.float() * (1.0 / scale)) + zp, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale, zero_point, axis: int | None = None) -> torch.Tensor:
    scale = _shape_for(torch.as_tensor(scale, dtype=torch.float32, device=q.device), q, axis)
    zp = _shape_for(torch.as_tensor(zero_point, device=q.device), q, axis)
    return (q.to(torch.float32) - zp.to(torch.float32)) * scale


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """dequantize(quantize(x)) in float, differentiable with the clipped straight-through estimator:
    d out / d x = 1 where the code falls inside [qmin, qmax], else 0 (as torch.fake_quantize_*_affine)."""
    scale = _shape_for(torch.as_tensor(scale, dtype=torch.float32, device=x.device), x, axis)
    zp = _shape_for(torch.as_tensor(zero_point, device=x.device), x, axis).to(torch.float32)
    code = torch.round(x * (1.0 / scale)) + zp
    inside = (code >= qmin) & (code <= qmax)
    out = (torch.clamp(code, qmin, qmax) - zp) * scale
    return out.detach() + (x - x.detach()) * inside


def bias_scale(input_scale, weight_scale) -> torch.Tensor:
    """s_in * s_w per output channel (C_out,), float32: the scale of an integer conv's accumulator and bias."""
    return (torch.as_tensor(weight_scale, dtype=torch.float32) * float(input_scale)).reshape(-1)


def bias_codes(bias: torch.Tensor, input_scale, weight_scale, spec: BiasSpec = BIAS) -> torch.Tensor:
    """The integer bias (int64 tensor of values in the spec's int32 range, zero-point 0): round(b / (s_in * s_w)),
    rounded in float32 and clamped in float64 (2^31 - 1 is not a float32)."""
    q = torch.round(bias.float() / bias_scale(input_scale, weight_scale))
    return torch.clamp(q.double(), spec.qmin, spec.qmax).to(torch.int64)


def quantize_bias(bias: torch.Tensor, input_scale, weight_scale, spec: BiasSpec = BIAS) -> torch.Tensor:
    """The float value of `bias_codes`: codes * s_in * s_w per output channel.

    This is the value an integer LiteRT conv adds to its int32 accumulator, so the simulation adds the same.
    """
    return bias_codes(bias, input_scale, weight_scale, spec).to(torch.float32) * bias_scale(input_scale, weight_scale)
