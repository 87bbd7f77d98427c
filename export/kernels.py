"""The integer arithmetic of LiteRT's int8 kernels, op by op: what `intsim` runs our parameters through.

Two kernel sets (`KERNELS`):

    "xnnpack"  the default CPU path of ai_edge_litert 2.3.0 (the XNNPACK delegate takes the whole graph)
    "builtin"  TFLite's own int8 kernels (BUILTIN_WITHOUT_DEFAULT_DELEGATES): gemmlowp-style fixed point

Per op, XNNPACK (file paths in google/XNNPACK):

  CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED (qs8, qc8w per-channel or qs8 per-tensor weights)
    acc    = bias_q + sum (x_q - x_zp) * w_q                       int32, exact
    scale  = (float) ((float) (s_in * s_w[c]) / s_out)              src/operators/convolution-nhwc.c,
                                                                    src/operators/fully-connected-nc.c
                                                                    ("input_scale * kernel_scale[oc] / output_scale",
                                                                    C float arithmetic, left to right)
    y      = (float) acc * scale                                    fp32 requantization of the qs8 gemm / igemm /
    y      = min(max(y, out_min - zp), out_max - zp)                dwconv microkernels (..._fp32_..., magic-bias or
    q      = round_half_even(y) + zp                                cvtps2dq: both round half to even)
    fused ReLU6: out_min / out_max = xnn_qs8_quantize(0.0f / 6.0f) = lrintf(clamp(v / s_out + (float) zp))
                                                                    (src/xnnpack/quantization.h, used by
                                                                    src/subgraph/convolution-2d.c etc.)
  ADD (qs8 vadd)                                                    src/microparams-init.c
    a_os = (float) (s_a / s_out), b_os = (float) (s_b / s_out)      xnn_init_qs8_add_minmax_scalar_params
    shift = 20 - exponent(max(a_os, b_os))
    a_mul = lrintf(a_os * 2^shift), b_mul likewise
    bias  = 2^(shift-1) - a_mul * a_zp - b_mul * b_zp
    q     = clamp(((bias + a_mul * a_q + b_mul * b_q) >> shift) + zp, -128, 127)   (arithmetic shift: the
                                                                    rounding term makes it round half up)
  MEAN over H, W (qs8 mean)                                          src/operators/reduce-nd.c,
    see `mean_xnnpack` (int32 sum, then fp32 requantization like the convs)         xnn_init_qs8_mean_minmax_*

Builtin (tensorflow/lite/kernels): Q31 multiplier and shift from QuantizeMultiplier((double) s_in * s_w /
s_out); DEPTHWISE_CONV_2D and ADD round with gemmlowp MultiplyByQuantizedMultiplier (half away from zero),
CONV_2D / FULLY_CONNECTED go through ruy, whose rescale rounds ties up (`multiply_by_quantized_multiplier_ruy`);
ADD: add.cc (left shift 20, three multipliers); MEAN: reference_ops::QuantizedMeanOrSum (multiplier folded with
1 / n by integer division); ReLU6 bounds zp + TfLiteRound(6 / s_out).

The code range is the int8 activation spec's (quantize/spec.py): the kernels are the signed 8-bit ("qs8") ones.
"""
from __future__ import annotations

import math
import struct

import numpy as np
import torch

from quantize.spec import activation_spec

__all__ = ["KERNELS", "QMIN", "QMAX", "conv_scale_xnnpack", "qs8_quantize", "requant_fp32", "add_params_xnnpack",
           "add_xnnpack", "mean_xnnpack", "mean_scale_xnnpack", "quantize_multiplier",
           "multiply_by_quantized_multiplier", "multiply_by_quantized_multiplier_ruy", "tflite_quantize_act",
           "requant_builtin", "add_builtin", "mean_builtin"]

KERNELS = ("xnnpack", "builtin")
QMIN, QMAX = activation_spec(8).qmin, activation_spec(8).qmax   # -128, 127
f32 = np.float32


# ---------------------------------------------------------------------------------------------- helpers

def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(f32(x))))[0]


def _f32_from_bits(b: int) -> float:
    return float(struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0])


def _lrintf(x: float) -> int:
    """C lrintf in the default rounding mode: nearest, ties to even (Python round does the same)."""
    return int(round(float(x)))


# ---------------------------------------------------------------------------------------------- XNNPACK

def conv_scale_xnnpack(s_in: float, s_w, s_out: float) -> np.ndarray:
    """Requantization scale per output channel, float32 as XNNPACK computes it:
    `input_scale * kernel_scale[oc] / output_scale` (convolution-nhwc.c / fully-connected-nc.c), each
    operation rounded to float32, the product first."""
    s_w = np.atleast_1d(np.asarray(s_w, dtype=f32))
    return (f32(s_in) * s_w).astype(f32) / f32(s_out)


def qs8_quantize(v: float, scale: float, zp: int) -> int:
    """xnn_qs8_quantize (src/xnnpack/quantization.h): lrintf(fminf(fmaxf(v / scale + (float) zp, -128), 127)),
    float32 throughout; how the subgraph turns a fused activation's float range into int8 bounds."""
    y = f32(f32(f32(v) / f32(scale)) + f32(zp))
    return _lrintf(min(max(y, f32(QMIN)), f32(QMAX)))


def requant_fp32(acc: torch.Tensor, scale, zp: int, qmin: int = QMIN, qmax: int = QMAX,
                 codes_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The fp32 requantization of XNNPACK's qs8 gemm / igemm / dwconv microkernels.

    acc: exact integer accumulators (any dtype holding integers exactly), channel on dimension 1 for a
    per-channel `scale` (a float32 array / tensor of C values, or one number). (float) acc rounds to nearest
    even when |acc| > 2^24, exactly as cvtdq2ps; the product is one float32 multiply; clamping to the bounds
    less the zero-point happens in float, rounding is half to even (cvtps2dq, or the magic-bias trick of the
    scalar kernels, which is the same), then the zero-point is added.
    """
    s = torch.as_tensor(np.asarray(scale, dtype=f32))
    if s.dim() == 1 and acc.dim() > 1:
        s = s.reshape([1, -1] + [1] * (acc.dim() - 2))
    y = (acc if acc.dtype == torch.float32 else acc.to(torch.float64).to(torch.float32)) * s
    y = torch.clamp(y, float(qmin - zp), float(qmax - zp))
    return torch.round(y).to(codes_dtype) + zp  # codes_dtype float32: the same integers, held exactly


def add_params_xnnpack(s_a: float, zp_a: int, s_b: float, zp_b: int, s_out: float) -> dict:
    """xnn_init_qs8_add_minmax_scalar_params (src/microparams-init.c): multipliers of 21 bits and one shift."""
    a_os = f32(f32(s_a) / f32(s_out))
    b_os = f32(f32(s_b) / f32(s_out))
    max_os = max(abs(a_os), abs(b_os))
    exponent = (_f32_bits(max_os) >> 23) - 127
    shift = 20 - exponent
    if not 12 <= shift <= 30:
        raise ValueError(f"ADD scale ratios {a_os}, {b_os} are outside what XNNPACK accepts")
    a_mul = _lrintf(_f32_from_bits(_f32_bits(abs(a_os)) + (shift << 23)))
    b_mul = _lrintf(_f32_from_bits(_f32_bits(abs(b_os)) + (shift << 23)))
    a_mul, b_mul = (-a_mul if a_os < 0 else a_mul), (-b_mul if b_os < 0 else b_mul)
    bias = (1 << (shift - 1)) - a_mul * zp_a - b_mul * zp_b
    return {"a_mul": a_mul, "b_mul": b_mul, "shift": shift, "bias": bias}


def add_xnnpack(a: torch.Tensor, zp_a: int, s_a: float, b: torch.Tensor, zp_b: int, s_b: float,
                s_out: float, zp_out: int) -> torch.Tensor:
    """qs8 vadd microkernels (src/qs8-vadd/*): acc = bias + a*a_mul + b*b_mul; out = (acc >> shift) + zp,
    clamped. int32 arithmetic: no overflow for int8 inputs and 21-bit multipliers."""
    p = add_params_xnnpack(s_a, zp_a, s_b, zp_b, s_out)
    acc = p["bias"] + a.to(torch.int64) * p["a_mul"] + b.to(torch.int64) * p["b_mul"]
    out = (acc >> p["shift"]) + zp_out  # >> on int64 tensors is arithmetic: floor division by 2^shift
    return torch.clamp(out, QMIN, QMAX)


def mean_xnnpack(x: torch.Tensor, zp_in: int, s_in: float, s_out: float, zp_out: int) -> torch.Tensor:
    """MEAN over H, W of (N, C, H, W) codes -> (N, C): qs8 mean of XNNPACK (src/operators/reduce-nd.c with
    xnn_init_qs8_mean_minmax_scalar_params): an exact int32 sum of (x_q - x_zp) over the n = H*W elements,
    then the fp32 requantization with scale = (float) s_in / ((float) s_out * n) ... see MEAN_SCALE."""
    n = x.shape[2] * x.shape[3]
    acc = (x.to(torch.int64) - zp_in).sum((2, 3))
    return requant_fp32(acc, mean_scale_xnnpack(s_in, s_out, n), zp_out)


def mean_scale_xnnpack(s_in: float, s_out: float, n: int) -> np.float32:
    return f32(f32(s_in) / f32(f32(s_out) * f32(n)))


# ---------------------------------------------------------------------------------------------- builtin

def quantize_multiplier(m: float) -> tuple[int, int]:
    """tflite::QuantizeMultiplier (kernels/internal/quantization_util.cc): Q31 significand and shift,
    m = q * 2^shift with q in [0.5, 1); the significand rounded half away from zero (std::round)."""
    if m == 0.0:
        return 0, 0
    q, shift = math.frexp(m)
    q_fixed = int(math.floor(abs(q) * (1 << 31) + 0.5)) * (1 if q >= 0 else -1)
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    if shift > 30:
        shift, q_fixed = 30, (1 << 31) - 1
    return q_fixed, shift


def _rounding_divide_by_pot(x: torch.Tensor, exponent) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT: round half away from zero. `exponent` a number or a broadcastable tensor."""
    e = torch.as_tensor(exponent, dtype=torch.int64)
    mask = (torch.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x: torch.Tensor, mult, shift) -> torch.Tensor:
    """tflite::MultiplyByQuantizedMultiplier (double rounding): RoundingDivideByPOT(SRDHM(x << left, M), right).
    mult / shift: numbers or tensors broadcastable against x (per channel)."""
    mult = torch.as_tensor(mult, dtype=torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    left = torch.clamp(shift, min=0)
    right = torch.clamp(-shift, min=0)
    return _rounding_divide_by_pot(_srdhm_t(x * (torch.ones_like(left) << left), mult), right)


def _srdhm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values held in int64 (the saturating case,
    a = b = INT32_MIN, cannot occur: multipliers are positive)."""
    ab = a * b
    s = ab + torch.where(ab >= 0, torch.full_like(ab, 1 << 30), torch.full_like(ab, 1 - (1 << 30)))
    return torch.where(s >= 0, s // (1 << 31), -((-s) // (1 << 31)))  # C division: truncation toward zero


def tflite_quantize_act(v: float, scale: float, zp: int) -> int:
    """CalculateActivationRangeQuantized: zp + (int) TfLiteRound(v / scale) (float32, half away from zero)."""
    r = f32(f32(v) / f32(scale))
    return zp + int(math.copysign(math.floor(abs(float(r)) + 0.5), float(r)))


def multiply_by_quantized_multiplier_ruy(x: torch.Tensor, mult, shift) -> torch.Tensor:
    """The same rescale as ruy's x86 int8 gemm kernels apply it (the builtin CONV_2D / FULLY_CONNECTED go
    through cpu_backend_gemm -> ruy): x << left, (x * M + 2^30) >> 31, then a rounding right shift with ties
    toward +inf (arithmetic shifts: both roundings half up, where gemmlowp rounds half away from zero).
    Found by comparing layer outputs: negative exact ties -k.5 after the high multiply come out -k."""
    mult = torch.as_tensor(mult, dtype=torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    left = torch.clamp(shift, min=0)
    right = torch.clamp(-shift, min=0)
    hi = (x * (torch.ones_like(left) << left) * mult + (1 << 30)) >> 31
    rnd = torch.where(right > 0, torch.ones_like(right) << torch.clamp(right - 1, min=0), torch.zeros_like(right))
    return (hi + rnd) >> right


def requant_builtin(acc: torch.Tensor, s_in: float, s_w, s_out: float, zp: int, qmin: int, qmax: int,
                    ruy: bool = False):
    """Per-channel (or per-tensor) int8 conv / FC of the builtin kernels: effective scale in double
    (PopulateConvolutionQuantizationParams: (double) s_in * (double) s_w / (double) s_out), then
    MultiplyByQuantizedMultiplier, + zp, clamp to the activation range."""
    s_w = np.atleast_1d(np.asarray(s_w, dtype=f32)).astype(np.float64)
    ms = [quantize_multiplier(float(np.float64(f32(s_in)) * sw / np.float64(f32(s_out)))) for sw in s_w]
    mult = torch.tensor([m for m, _ in ms], dtype=torch.int64)
    shift = torch.tensor([s for _, s in ms], dtype=torch.int64)
    if len(ms) > 1 and acc.dim() > 1:
        shape = [1, -1] + [1] * (acc.dim() - 2)
        mult, shift = mult.reshape(shape), shift.reshape(shape)
    elif len(ms) == 1:
        mult, shift = mult[0], shift[0]
    mbqm = multiply_by_quantized_multiplier_ruy if ruy else multiply_by_quantized_multiplier
    out = mbqm(acc.to(torch.int64), mult, shift) + zp
    return torch.clamp(out, qmin, qmax)


def add_builtin(a, zp_a, s_a, b, zp_b, s_b, s_out, zp_out):
    """tflite add.cc PrepareGeneralSubOp / reference_integer_ops::Add: left shift 20, three multipliers."""
    left_shift = 20
    twice_max = 2.0 * float(max(f32(s_a), f32(s_b)))
    m_a = quantize_multiplier(float(f32(s_a)) / twice_max)
    m_b = quantize_multiplier(float(f32(s_b)) / twice_max)
    m_o = quantize_multiplier(twice_max / (float(1 << left_shift) * float(f32(s_out))))
    xa = (a.to(torch.int64) - zp_a) * (1 << left_shift)
    xb = (b.to(torch.int64) - zp_b) * (1 << left_shift)
    sa = multiply_by_quantized_multiplier(xa, m_a[0], m_a[1])
    sb = multiply_by_quantized_multiplier(xb, m_b[0], m_b[1])
    out = multiply_by_quantized_multiplier(sa + sb, m_o[0], m_o[1]) + zp_out
    return torch.clamp(out, QMIN, QMAX)


def mean_builtin(x, zp_in, s_in, s_out, zp_out):
    """tflite reduce.cc int8 MEAN (keep_dims false: reference_ops::QuantizedMeanOrSum, internal/reference/
    reduce.h): multiplier from QuantizeMultiplier((double) s_in / (double) s_out), then folded with 1 / n as
    M' = (M << k) / n (integer division), shift - k, k = min(floor(log2 n), 32, 31 + shift);
    out = MultiplyByQuantizedMultiplier(sum x_q - zp_in * n, M', shift') + zp_out."""
    n = x.shape[2] * x.shape[3]
    m, sh = quantize_multiplier(float(np.float64(f32(s_in)) / np.float64(f32(s_out))))
    k = min(n.bit_length() - 1, 32, 31 + sh)
    m, sh = (m << k) // n, sh - k
    acc = x.to(torch.int64).sum((2, 3)) - zp_in * n
    return torch.clamp(multiply_by_quantized_multiplier(acc, m, sh) + zp_out, QMIN, QMAX)
