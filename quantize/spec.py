"""The integer target, said once: what an exported LiteRT file holds, and so what the simulation reproduces.
The simulation (quantize/), the Q/DQ export model, the integer simulation and the validator (export/) read it here.

LiteRT's integer kernels (the TFLite quantization spec) expect:

    tensor              bits  codes             zero-point  granularity                        held as
    conv / FC weight    8     [-127, 127]       0           per output channel, or per tensor  int8
    activation          8     [-128, 127]       any         per tensor (asymmetric)            int8
    activation, 16-bit  16    [-32767, 32767]   0           per tensor (symmetric: the int16   int16
                                                            conv kernel rejects zero-points)
    bias                32    int32             0           per output channel,                int32; int64 beside
                                                            scale s_in * s_w                   int16 activations
    dynamic activation  8     [-128, 127]       from the    per tensor per image, taken by     never stored: the
    (dynamic range)                             tensor      each conv / FC from its own float  file's activations
                                                            input on every run (asymmetric)    are float32

Other widths (2..16) follow the same rules: weights symmetric narrow-range (4-bit: [-7, 7], held as int8),
activations asymmetric. Depthwise convs may hold wider weights than the rest (Target.weight_of): below 8 bits
they stay at 8 unless asked (QuantConfig.depthwise_bits). Which widths can become a file is export's decision
(export/convert.py: export_kind).

Channel axis of per-channel weights:

    framework  layout                                                         axis
    PyTorch    conv (C_out, C_in/groups, kh, kw), depthwise (C, 1, kh, kw),   0   WEIGHT_AXIS
               linear (C_out, C_in)
    LiteRT     conv (C_out, kh, kw, C_in), fully connected (C_out, C_in)     0   tflite_weight_axis(False)
    LiteRT     depthwise (1, kh, kw, C), as the converter writes it           3   tflite_weight_axis(True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QSpec", "BiasSpec", "Target", "weight_spec", "activation_spec", "bias_spec", "target", "check_bits",
           "tflite_weight_axis", "MIN_BITS", "MAX_BITS", "WEIGHT_AXIS"]

MIN_BITS, MAX_BITS = 2, 16
WEIGHT_AXIS = 0            # PyTorch: output channels first (see the table above)
_TFLITE_AXIS = {False: 0, True: 3}   # LiteRT, by "is depthwise"


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} should be an integer in [{MIN_BITS}, {MAX_BITS}] instead of {bits!r}")
    return bits


def tflite_weight_axis(depthwise: bool) -> int:
    """The quantized dimension of a per-channel weight in the file (see the table above)."""
    return _TFLITE_AXIS[bool(depthwise)]


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

    @property
    def storage_bits(self) -> int:
        """Width of the integer type the file holds these codes in: 8 up to 8 bits (4-bit codes too), else 16."""
        return 8 if self.bits <= 8 else 16

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.storage_bits == 8 else torch.int16


@dataclass(frozen=True)
class BiasSpec:
    """The bias of an integer conv / FC: codes round(b / (s_in * s_w[c])) clamped to int32, zero-point 0, one scale
    per output channel (the accumulator's scale, so the kernel adds the codes to its int32 sums as they are)."""
    storage_bits: int = 32   # int32; LiteRT's int16-activation (16x8) kernels take int64 biases
    bits: int = 32

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


@dataclass(frozen=True)
class Target:
    """The integer format of one model configuration; None where tensors stay float."""
    weight: QSpec | None
    activation: QSpec | None
    static: bool             # activation ranges fixed by calibration (an integer graph), not taken per input
    depthwise_weight: QSpec | None = None   # the depthwise convs' weights where their width differs from `weight`

    def weight_of(self, depthwise: bool) -> QSpec | None:
        """The weight spec of a conv / FC layer: depthwise convs may be held wider (QuantConfig.depthwise_bits)."""
        return self.depthwise_weight if depthwise and self.depthwise_weight is not None else self.weight

    @property
    def dynamic_inputs(self) -> bool:
        """LiteRT's dynamic-range (hybrid) kernels: integer weights, float activations that each conv / FC
        quantizes at its own input on every run (8 bits: there is no 16-bit run-time path, so 16-bit dynamic
        activations keep their points at op outputs and are exported as a static int16 graph instead)."""
        return (not self.static and self.weight is not None and self.activation is not None
                and self.activation.bits <= 8)

    @property
    def bias(self) -> BiasSpec | None:
        """Integer biases only where the kernel is integer end to end: quantized weights, static activations."""
        if self.static and self.weight is not None and self.activation is not None:
            return bias_spec(self.activation.bits)
        return None


def weight_spec(bits: int = 8, per_channel: bool = True) -> QSpec:
    return QSpec(bits, symmetric=True, narrow_range=True, per_channel=per_channel, axis=WEIGHT_AXIS)


def activation_spec(bits: int = 8) -> QSpec:
    """8-bit (and other widths below 16): asymmetric; 16-bit: symmetric narrow with zero-point 0 (LiteRT int16)."""
    if bits == 16:
        return QSpec(16, symmetric=True, narrow_range=True, per_channel=False)
    return QSpec(bits, symmetric=False, narrow_range=False, per_channel=False)


def bias_spec(a_bits: int = 8) -> BiasSpec:
    return BiasSpec(storage_bits=64 if a_bits == 16 else 32)


def target(w_bits: int | None, a_bits: int | None, per_channel: bool = True, static: bool = True,
           dw_bits: int | None = None) -> Target:
    """The Target of weights of `w_bits` (depthwise convs: `dw_bits`, None: the same) and activations of `a_bits`
    (None: float), static or dynamic ranges."""
    weight = weight_spec(w_bits, per_channel) if w_bits is not None else None
    dw = weight_spec(dw_bits, per_channel) if weight is not None and dw_bits not in (None, w_bits) else None
    return Target(weight, activation_spec(a_bits) if a_bits is not None else None, static and a_bits is not None, dw)
