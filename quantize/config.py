"""Quantization configurations: the study's named recipes and free bit widths."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .spec import Target, check_bits
from .spec import target as spec_target

__all__ = ["QuantConfig", "RECIPES", "recipe", "GRANULARITIES", "ACT_MODES", "CALIB_SOURCES", "W_FORMATS",
           "DW_MIN_BITS"]

GRANULARITIES = ("per-channel", "per-tensor")
ACT_MODES = ("none", "static", "dynamic")   # float activations | calibrated ranges | ranges taken at run time
CALIB_SOURCES = ("real", "random")
W_FORMATS = ("int", "fp16")   # integer codes on a scale grid | IEEE half-precision values (LiteRT's 16-bit weights)
DW_MIN_BITS = 8   # the narrowest depthwise weights unless dw_bits says otherwise (QuantConfig.depthwise_bits)


@dataclass
class QuantConfig:
    name: str = "W8A8"
    w_bits: int | None = 8               # None: float weights
    a_bits: int | None = 8               # None: float activations
    act_mode: str = "static"             # none | static | dynamic
    granularity: str = "per-channel"     # of the weights; activations are always per tensor
    calib: str = "real"                  # real: calibration split of the training set; random: N(0, 1) images
    calib_size: int = 1000               # images
    act_observer: str = "minmax"         # minmax | ema | percentile | mse
    weight_observer: str = "minmax"      # minmax | mse
    cle: bool = False                    # cross-layer equalization (before weight ranges are taken)
    bias_correction: bool = False        # empirical bias correction on the calibration set
    adaround: bool = False               # learned rounding, layer by layer
    adaround_iters: int = 1000           # optimizer steps per layer
    seed: int = 0
    w_format: str = "int"                # int | fp16 (w_bits 16, float activations: no scale, no granularity)
    dw_bits: int | None = None           # depthwise conv weights; None: w_bits, but never below 8 (depthwise_bits)

    def __post_init__(self):
        if self.w_bits is not None:
            check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; expected one of {GRANULARITIES}")
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"unknown act_mode {self.act_mode!r}; expected one of {ACT_MODES}")
        if self.calib not in CALIB_SOURCES:
            raise ValueError(f"unknown calibration source {self.calib!r}; expected one of {CALIB_SOURCES}")
        if (self.a_bits is None) != (self.act_mode == "none"):
            raise ValueError(f"a_bits={self.a_bits} does not fit act_mode={self.act_mode!r}")
        if self.w_format not in W_FORMATS:
            raise ValueError(f"unknown w_format {self.w_format!r}; expected one of {W_FORMATS}")
        if self.w_format == "fp16" and (self.w_bits != 16 or self.a_bits is not None):
            raise ValueError(f"fp16 weights are 16 bits with float activations, not w_bits={self.w_bits} "
                             f"a_bits={self.a_bits}")
        if self.dw_bits is not None:
            check_bits(self.dw_bits, "dw_bits")
            if self.w_bits is None or self.fp16_weights:
                raise ValueError(f"dw_bits={self.dw_bits} needs integer weights, not "
                                 f"{'fp16' if self.fp16_weights else 'float'} ones")
        if self.calib_size < 1:
            raise ValueError(f"calib_size should be >= 1 instead of {self.calib_size}")

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per-channel"

    @property
    def is_float(self) -> bool:
        return self.w_bits is None and self.a_bits is None

    @property
    def fp16_weights(self) -> bool:
        return self.w_format == "fp16"

    @property
    def depthwise_bits(self) -> int | None:
        """Weight bits of the depthwise convs: dw_bits, else w_bits raised to DW_MIN_BITS. A 3x3 depthwise kernel
        has 9 weights a channel, so a coarse grid costs it far more than a pointwise conv's hundreds: on the
        reference, W4A32 with 4-bit depthwise weights gives 15.9 dB logits SNR, with 8-bit ones 19.1 dB, for 32 KB
        (benchmarks/RESULTS.md). ai-edge-quantizer's INT4 recipes keep them float instead."""
        if self.w_bits is None or self.fp16_weights:
            return None
        return self.dw_bits if self.dw_bits is not None else self._default_dw_bits

    @property
    def _default_dw_bits(self) -> int:
        return max(self.w_bits, DW_MIN_BITS)

    @property
    def label(self) -> str:
        """The name a report shows: the recipe name, with the number format where bits alone would mislead.
        16-bit activations become a *static* int16 file whatever the simulation's act_mode (LiteRT has no run-time
        16-bit path): "W8A16 static", apart from the dynamic-range file (W8A8-dynamic). Depthwise weights of
        other than the default width (depthwise_bits) add " dw<bits>": "W4A8 dw4"."""
        if self.fp16_weights:
            return f"{self.name} (fp16)"
        label = self.name
        if self.a_bits == 16 and not self.name.lower().endswith("static"):
            label += " static"
        if self.dw_bits is not None and self.dw_bits != self._default_dw_bits:
            label += f" dw{self.dw_bits}"
        return label

    @property
    def target(self) -> Target:
        """The integer format this configuration simulates (quantize/spec.py): weight, activation, bias specs.
        fp16 weights have no integer spec: the simulation rounds them to half precision instead."""
        w_bits = None if self.fp16_weights else self.w_bits
        return spec_target(w_bits, self.a_bits, self.per_channel, static=self.act_mode == "static",
                           dw_bits=self.depthwise_bits)

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES: dict[str, QuantConfig] = {
    "FP32": QuantConfig("FP32", None, None, "none"),
    "W8A32": QuantConfig("W8A32", 8, None, "none"),
    "W16A32": QuantConfig("W16A32", 16, None, "none", w_format="fp16"),   # LiteRT stores 16-bit weights as fp16
    "W4A32": QuantConfig("W4A32", 4, None, "none"),
    "W8A16": QuantConfig("W8A16", 8, 16, "dynamic"),   # label "W8A16 static": exported as a static int16 file
    # dynamic range (AEQ dynamic_wi8_afp32, the study's "W8A16 dynamic"): int8 weights, float activations that
    # LiteRT's hybrid kernels quantize to int8 at each conv / FC input on every run
    "W8A8-dynamic": QuantConfig("W8A8-dynamic", 8, 8, "dynamic"),
    "W8A8": QuantConfig("W8A8", 8, 8, "static"),
    "W4A8": QuantConfig("W4A8", 4, 8, "static"),
}


def recipe(name: str, **overrides) -> QuantConfig:
    keys = {k.upper(): k for k in RECIPES}
    if str(name).upper() not in keys:
        raise ValueError(f"unknown quantization config {name!r}; expected one of {tuple(RECIPES)}")
    return replace(RECIPES[keys[str(name).upper()]], **overrides)
