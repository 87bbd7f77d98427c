"""Hand-written fake quantization: pure numerics (core), the integer target (spec), the one graph walk (graph),
observers, the MobileNetV2 simulation (qmodel), PTQ and QAT."""
from .config import RECIPES, QuantConfig, recipe
from .core import bias_codes, choose_qparams, dequantize, fake_quantize, quantize, quantize_bias
from .qmodel import QMobileNet, calibrate, freeze, prepare, to_ptq

__all__ = ["QuantConfig", "RECIPES", "recipe", "choose_qparams", "quantize", "dequantize", "fake_quantize",
           "bias_codes", "quantize_bias", "QMobileNet", "prepare", "calibrate", "freeze", "to_ptq"]
