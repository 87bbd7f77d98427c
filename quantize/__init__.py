"""Hand-written fake quantization: pure numerics (core), the integer target (spec), observers, the MobileNetV2
simulation (qmodel), PTQ and QAT."""
from .config import RECIPES, QuantConfig, recipe
from .core import choose_qparams, dequantize, fake_quantize, qrange, quantize, quantize_bias
from .qmodel import QMobileNet, calibrate, freeze, prepare, to_ptq

__all__ = ["QuantConfig", "RECIPES", "recipe", "qrange", "choose_qparams", "quantize", "dequantize",
           "fake_quantize", "quantize_bias", "QMobileNet", "prepare", "calibrate", "freeze", "to_ptq"]
