"""From a frozen QMobileNet to .tflite bytes with litert-torch, per configuration of the study.

    config   what the file is                                       how
    FP32     float32 weights and compute                            plain convert
    W8A32    int8 weights (our scales) + DEQUANTIZE, float compute  static Q/DQ on weights only; classifier as 1x1
    W8A8     fully int8: int8 weights, int8 activations, int32      static Q/DQ everywhere
             biases; int8 input and output unless float io
    W8A16    int16 activations (symmetric, zero-point 0, STATIC     calibrate static int16 ranges at export, Q/DQ,
    static   ranges), int8 weights, int64 biases                    then rewrite the int32 biases as int64
    W8A8-    dynamic range ("dynamic" kind; AEQ dynamic_wi8_afp32,  the weight-only graph, then each conv reads its
    dynamic  the study's "W8A16 dynamic"): int8 weights (our        int8 weight directly (its DEQUANTIZE dropped,
             scales), float activations and biases; each conv       export/flatbuffer.py): LiteRT's hybrid kernels
             quantizes its float input to int8 on every run (per    (XNNPACK qd8 for CONV_2D / FC, builtin for
             image, asymmetric) and rescales by s_in * s_w          DEPTHWISE_CONV_2D); classifier as a 1x1 conv
    W4A8     4-bit weights: packed INT4 (two codes a byte) where   converted as int8 values in [-7, 7], then
             LiteRT has a kernel for them, int8 elsewhere; the      rewritten as INT4 (export/int4.py) unless
             INT4 convs run on builtin kernels, not XNNPACK;        w4_storage="int8" (exact, no size gain)
             depthwise weights int8 unless dw_bits is 4
             (QuantConfig.depthwise_bits)
    W4A32    packed INT4 behind each DEQUANTIZE (as ai-edge-        the same; every weight has a kernel
             quantizer's weight_only_wi4_afp32, which keeps
             depthwise weights float; ours are int8 unless
             dw_bits is 4), float compute
    W16A32   fp16 weights + DEQUANTIZE, float compute:             plain convert of the half-rounded weights, then
    (fp16)   LiteRT's 16-bit weight format (its DEQUANTIZE takes    each float32 weight stored as float16 behind a
             no per-channel int16); the simulation rounds the       DEQUANTIZE (export/flatbuffer.py)
             folded weights to half

W8A16 in the simulation is dynamic (per-sample ranges at run time); LiteRT's int16 kernels use fixed ranges,
so the export is a *static* int16 model (reported as "W8A16 static"), validated against a static int16
simulation with the same weights. LiteRT's only run-time activation quantization is to int8: W8A8-dynamic.
Nothing ever falls back to another precision: a configuration that cannot be a real LiteRT file is refused.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from quantize.config import QuantConfig
from quantize.fakequant import DynamicFakeQuant, FakeQuant
from quantize.graph import link_inputs
from quantize.qmodel import QMobileNet, calibrate, freeze, qlayers

from . import flatbuffer as fb
from . import int4, sparse
from .qdq import QDQMobileNet

__all__ = ["ExportError", "export_kind", "check_storage", "static_int16", "litert_bytes", "convert",
           "KINDS"]

KINDS = ("fp32", "fp16", "weight-only", "int8", "int16", "dynamic")


class ExportError(ValueError):
    """A model or configuration that cannot become a real LiteRT file (or a file that failed validation)."""


def export_kind(cfg: QuantConfig, w4_storage: str = "auto") -> str:
    """Which kind of file `cfg` becomes, or ExportError saying why LiteRT cannot run it (or naming a
    `w4_storage` that is not one of int4.W4_STORAGES)."""
    if w4_storage not in int4.W4_STORAGES:
        raise ExportError(f"--w4-storage should be one of {', '.join(int4.W4_STORAGES)} instead of "
                          f"{w4_storage!r}")
    if cfg.is_float:
        return "fp32"
    if cfg.fp16_weights:
        return "fp16"
    if cfg.w_bits is None:
        raise ExportError(f"{cfg.name}: float weights with quantized activations has no LiteRT kernel")
    if cfg.w_bits == 16:
        raise ExportError(
            f"{cfg.name}: LiteRT has no int16 weight path (its DEQUANTIZE rejects per-channel int16); its 16-bit "
            "weights are fp16: use w_format fp16 (the W16A32 recipe)")
    elif cfg.w_bits not in (4, 8):
        raise ExportError(f"{cfg.name}: {cfg.w_bits}-bit weights have no LiteRT storage type")
    if cfg.depthwise_bits not in (4, 8):
        raise ExportError(f"{cfg.name}: {cfg.depthwise_bits}-bit depthwise weights (dw_bits) have no LiteRT "
                          "storage type; use 4 or 8")
    if cfg.depthwise_bits == 4 and cfg.a_bits is not None and not (cfg.a_bits == 8 and cfg.act_mode == "static"):
        raise ExportError(f"{cfg.name}: 4-bit depthwise weights run only behind a DEQUANTIZE or with static int8 "
                          "activations (LiteRT's DEPTHWISE_CONV_2D takes INT4 nowhere else); use dw_bits 8")
    if cfg.a_bits is None:
        return "weight-only"
    if cfg.a_bits == 8 and cfg.act_mode == "static":
        return "int8"
    if cfg.a_bits == 8 and cfg.act_mode == "dynamic" and cfg.w_bits == 8:
        if not cfg.per_channel:
            # measured (tiny model, ai_edge_litert 2.3.0): such a file runs, but its outputs are off by 8-25x
            # the largest logit with XNNPACK and with the builtin kernels; per-channel weights agree to ~1 %
            raise ExportError(f"{cfg.name}: dynamic range with per-tensor weights is refused: LiteRT's hybrid "
                              "kernels run such a file with wrong outputs (no error); use per-channel weights")
        return "dynamic"
    if cfg.a_bits == 16 and cfg.w_bits == 8:
        return "int16"
    raise ExportError(f"{cfg.name}: {cfg.a_bits}-bit {cfg.act_mode} activations have no LiteRT kernels "
                      "(LiteRT runs int8 or symmetric int16 activations with fixed ranges)")


@torch.no_grad()
def static_int16(qm: QMobileNet, batches) -> QMobileNet:
    """A copy of a (dynamic or static) 16-bit-activation simulation with static symmetric int16 ranges calibrated
    on `batches` (min/max), the same quantized weights, and int32-grid biases at s_in * s_w like the file."""
    out = copy.deepcopy(qm).eval()
    out.qcfg = replace(qm.qcfg, act_mode="static")
    target = out.qcfg.target   # int16 activations, static: symmetric int16 points and int64-held biases

    def swap(parent: nn.Module, name: str):
        if isinstance(getattr(parent, name), DynamicFakeQuant):
            setattr(parent, name, FakeQuant(target.activation, "minmax"))

    swap(out, "quant_in")
    swap(out, "pool_fq")
    for m in out.modules():
        for name in ("out_fq", "add_fq"):
            if hasattr(m, name):
                swap(m, name)
    for layer in qlayers(out).values():
        layer.bias_spec = target.bias
    link_inputs(out)
    n = calibrate(out, batches)
    if n == 0:
        raise ExportError("W8A16 export needs calibration images for its static int16 ranges")
    return freeze(out)


def _quantizer():
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig as LiteQuantConfig
    # Never run: it only switches the converter into static Q/DQ mode, which keeps our own Q/DQ ops.
    return LiteQuantConfig(pt2e_quantizer=PT2EQuantizer().set_global(get_symmetric_quantization_config()))


def check_storage(kind: str, storage: str) -> str:
    """The weight storage `kind` gets when `storage` is asked for, or ExportError: sparse weights (CSR + DENSIFY)
    only in FP32 and INT8 files, whose convs read their weights directly; auto keeps the others dense."""
    if storage not in sparse.STORAGES:
        raise ExportError(f"--weights-storage should be one of {', '.join(sparse.STORAGES)} instead of {storage!r}")
    if kind in sparse.SPARSE_KINDS or storage != "sparse":
        return storage if kind in sparse.SPARSE_KINDS else "dense"
    raise ExportError(f"--weights-storage sparse: {kind} files keep dense weights (sparse storage is made for "
                      f"{' and '.join(sparse.SPARSE_KINDS)} files)")


def litert_bytes(qm: QMobileNet, kind: str, nhwc: bool) -> bytes:
    """What litert-torch makes of `qm` (frozen) as `kind`, batch 1, before any edit of ours (the slow part)."""
    import litert_torch
    module = QDQMobileNet(qm, nhwc=nhwc).eval()
    size = qm.model_cfg.input_size
    x = torch.zeros(1, size, size, 3) if nhwc else torch.zeros(1, 3, size, size)  # batch 1, fixed by export
    quant_config = None if kind in ("fp32", "fp16") else _quantizer()
    return bytes(litert_torch.convert(module, (x,), quant_config=quant_config).model_content())


def convert(qm: QMobileNet, kind: str, *, float_io: bool = False, nhwc: bool = False,
            weights_storage: str = "dense", w4_storage: str = "auto") -> tuple[bytes, dict]:
    """The .tflite bytes of `qm` (frozen) as `kind`, batch 1, conv weights stored as `weights_storage` says
    (export/sparse.py), 4-bit weights as `w4_storage` says (export/int4.py). Returns (bytes, notes on what was
    edited)."""
    if kind not in KINDS:
        raise ExportError(f"unknown export kind {kind!r}; expected one of {KINDS}")
    storage = check_storage(kind, weights_storage)
    bits = {name: layer.w_fq.spec.bits for name, layer in qlayers(qm).items() if layer.w_fq is not None}
    w4 = 4 in bits.values()
    data = litert_bytes(qm, kind, nhwc)
    float_io = float_io or kind in ("fp32", "fp16", "weight-only", "dynamic")  # float graphs have float io anyway
    notes = {"batch": 1, "layout": "NHWC" if nhwc else "NCHW", "float_io": float_io}
    if kind == "fp16":
        model = fb.read(data)
        notes["weights_stored_fp16"] = fb.weights_to_fp16(model)
        data = fb.write(model)
    if kind == "dynamic":
        model = fb.read(data)
        notes["weights_read_directly"] = fb.weights_direct(model)
        data = fb.write(model)
    quantized = kind in ("int8", "int16", "weight-only")    # per-channel zero-points that fb.write shares
    if quantized or storage != "dense":
        model = fb.read(data)
        if kind == "int16":
            codes = [layer.bias_codes().numpy() for layer in qlayers(qm).values()]
            notes["biases_rewritten_int64"] = fb.biases_to_int64(model, codes)
        if float_io and kind in ("int8", "int16"):
            fb.add_float_io(model)
        if w4:   # before sparsify: a packed weight stays dense (DENSIFY has no INT4 output), the rest may not
            notes["w4_storage"] = int4.pack_weights(model, bits, w4_storage)
        notes["weights"] = sparse.sparsify(model, storage)
        if quantized or notes["weights"]["sparse_weights"]:   # float files: bytes as converted
            data = fb.write(model)
    return data, notes
