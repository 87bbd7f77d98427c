"""The integer target, said once. quantize/ (PTQ, QAT) and export/ both import it.

LiteRT's int8 kernels (the TFLite quantization spec) expect:

    tensor                 bits  range            zero-point   granularity
    conv / linear weight   8     [-127, 127]      0            per output channel (axis 0 in PyTorch;
                                                               depthwise: also per channel, stored by the
                                                               converter as [1, kh, kw, C] with quantized
                                                               dimension 3)
    activation             8     [-128, 127]      any          per tensor (asymmetric)
    activation, 16-bit     16    [-32767, 32767]  0            per tensor (symmetric: the int16 conv kernel
                                                               rejects non-zero zero-points)
    bias                   32    int32            0            per output channel, scale = s_in * s_w

Other bit widths (2..16) follow the same rules: weights symmetric narrow-range, activations asymmetric.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QSpec", "weight_spec", "activation_spec", "BIAS_BITS", "MIN_BITS", "MAX_BITS", "check_bits",
           "WEIGHT_AXIS", "TFLITE_DEPTHWISE_AXIS"]

MIN_BITS, MAX_BITS = 2, 16
BIAS_BITS = 32
WEIGHT_AXIS = 0            # PyTorch conv/linear weights: (C_out, C_in/groups, kh, kw); depthwise: (C, 1, kh, kw)
TFLITE_DEPTHWISE_AXIS = 3  # LiteRT depthwise weights: (1, kh, kw, C)


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} should be an integer in [{MIN_BITS}, {MAX_BITS}] instead of {bits!r}")
    return bits


@dataclass(frozen=True)
class QSpec:
    """How one kind of tensor is quantized: the integer range and whether the zero-point is pinned at 0."""
    bits: int
    symmetric: bool       # zero-point fixed at 0, range centred on 0
    narrow_range: bool    # drop the most negative code (-127..127 rather than -128..127)
    per_channel: bool     # one scale per slice along `axis`, else one per tensor
    axis: int = WEIGHT_AXIS

    def __post_init__(self):
        check_bits(self.bits)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def granularity(self) -> str:
        return "per-channel" if self.per_channel else "per-tensor"


def weight_spec(bits: int = 8, per_channel: bool = True) -> QSpec:
    return QSpec(bits, symmetric=True, narrow_range=True, per_channel=per_channel, axis=WEIGHT_AXIS)


def activation_spec(bits: int = 8) -> QSpec:
    """8-bit (and other widths below 16): asymmetric; 16-bit: symmetric narrow with zero-point 0 (LiteRT int16)."""
    if bits == 16:
        return QSpec(16, symmetric=True, narrow_range=True, per_channel=False)
    return QSpec(bits, symmetric=False, narrow_range=False, per_channel=False)
