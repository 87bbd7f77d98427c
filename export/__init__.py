"""Export: a frozen QMobileNet -> a validated LiteRT (.tflite) file with our own scales, and its report."""
from .convert import KINDS, ExportError, convert, export_kind, static_int16
from .pipeline import ExportConfig, run_export
from .qdq import QDQMobileNet

__all__ = ["ExportError", "ExportConfig", "run_export", "convert", "export_kind", "static_int16", "QDQMobileNet",
           "KINDS"]
