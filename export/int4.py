"""Packed INT4 weight storage: 4-bit weight codes rewritten in the flatbuffer as real INT4 tensors.

The converter takes 4-bit codes only as int8 values in [-7, 7] (torch.int4 fails in torch.export), so the file
is converted that way and the chosen weights are rewritten afterwards: the buffer holds two codes a byte, the
first in the low nibble (tflite::tensor_utils::UnpackPackedIntToInt8; an odd count leaves the last high nibble
0), over the tensor flattened in its own (row-major) order, and the tensor type becomes INT4. The scales,
zero-points and quantized dimension stay as they were: the kernel unpacks the codes to int8 and then runs its
int8 arithmetic, so the outputs are those of the int8-stored file computed by that kernel.

Where ai_edge_litert 2.3.0 has a kernel for an INT4 weight (measured with its interpreter on the tiny test
model, tests/test_int4.py):

    op                   activations          INT4 weight runs on                    storage (auto)
    CONV_2D              static int8          builtin kernel only: XNNPACK rejects   int4 packed
                                              the node, which leaves the delegate
    DEPTHWISE_CONV_2D    static int8          builtin kernel only, likewise          int4 packed
    FULLY_CONNECTED      static int8          XNNPACK (and builtin)                  int4 packed
    DEQUANTIZE of a      float (weight-only)  builtin DEQUANTIZE, and the float      int4 packed
    conv / FC weight                          conv it feeds on builtin kernels too
                                              (with XNNPACK, outputs bit-identical
                                              to the builtin kernels': the weight
                                              is no constant for the delegate)

So with the XNNPACK delegate an INT4 conv runs on the builtin int8 kernels and the rest of the graph in
XNNPACK: `builtin_layers` names those layers for the integer simulation (export/intsim.py), which gives each
layer the arithmetic of the kernel that runs it.

ai-edge-quantizer's weight_only_wi4_afp32 writes the same INT4 + DEQUANTIZE pair (it leaves depthwise weights
float). A packed weight stays dense: DENSIFY has no INT4 output, so `sparse.sparsify` runs after this and only
sees the int8 weights.

    w4 storage   what 4-bit weights become
    auto         int4 packed wherever the table above has a kernel, int8 elsewhere (the default)
    int8         int8 values in [-7, 7] everywhere: exact on every kernel, no size gain
"""
from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from .flatbuffer import _code, buffer_readers

__all__ = ["W4_STORAGES", "pack", "unpack", "pack_weights", "builtin_layers", "INT4_MIN", "INT4_MAX"]

W4_STORAGES = ("auto", "int8")
INT4_MIN, INT4_MAX = -8, 7                  # the schema's INT4: two's complement nibbles
_OP = schema.BuiltinOperator
# The weight-reading ops whose INT4 weight XNNPACK rejects: they run on the builtin kernels.
_BUILTIN_ONLY = (_OP.CONV_2D, _OP.DEPTHWISE_CONV_2D)
_WEIGHTED = {_OP.CONV_2D: "CONV_2D", _OP.DEPTHWISE_CONV_2D: "DEPTHWISE_CONV_2D", _OP.FULLY_CONNECTED: "FULLY_CONNECTED"}


def pack(codes: np.ndarray) -> np.ndarray:
    """Codes in [-8, 7] (any shape) -> uint8 bytes, two codes a byte, the first in the low nibble, flattened in
    row-major order; an odd count leaves the last byte's high nibble 0."""
    c = np.asarray(codes).reshape(-1).astype(np.int64)
    if c.size and (c.min() < INT4_MIN or c.max() > INT4_MAX):
        raise ValueError(f"4-bit codes should lie in [{INT4_MIN}, {INT4_MAX}], not [{c.min()}, {c.max()}]")
    nib = (c & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, count: int) -> np.ndarray:
    """The first `count` codes of bytes written by `pack`, as int8 (sign-extended nibbles)."""
    b = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if len(b) != (count + 1) // 2:
        raise ValueError(f"{len(b)} bytes cannot hold {count} packed 4-bit codes (that takes {(count + 1) // 2})")
    nib = np.empty(2 * len(b), dtype=np.int16)
    nib[0::2], nib[1::2] = b & 0xF, b >> 4
    return np.where(nib > 7, nib - 16, nib)[:count].astype(np.int8)


def _holder(model: schema.ModelT, sg: schema.SubGraphT, op: schema.OperatorT) -> tuple[int, bool]:
    """(tensor that holds the values of `op`'s weight, whether a DEQUANTIZE writes the weight from it)."""
    w = op.inputs[1]
    for p in sg.operators:
        if w in p.outputs and _code(model, p) == _OP.DEQUANTIZE:
            return p.inputs[0], True
    return w, False


def _weighted(model: schema.ModelT) -> list[schema.OperatorT]:
    return [op for op in model.subgraphs[0].operators if _code(model, op) in _WEIGHTED]


def pack_weights(model: schema.ModelT, layers: dict[str, int], storage: str) -> dict[str, str]:
    """Rewrite the 4-bit weights of subgraph 0's conv / FC ops (in graph order, named by `layers`, which maps each
    to its weight bits) as packed INT4 where `storage` and the kernels allow (module doc). Edits `model` in place;
    returns {layer: storage}, e.g. "int4 packed (builtin CONV_2D)", "int4 packed (XNNPACK FULLY_CONNECTED)",
    "int8 (8-bit weights)", "int8 (why)"."""
    if storage not in W4_STORAGES:
        raise ValueError(f"--w4-storage should be one of {', '.join(W4_STORAGES)} instead of {storage!r}")
    sg, weighted = model.subgraphs[0], _weighted(model)
    assert len(weighted) == len(layers), f"{len(weighted)} conv/FC ops, {len(layers)} layers"
    readers, out = buffer_readers(model), {}
    for op, (name, bits) in zip(weighted, layers.items()):
        holder, dequantized = _holder(model, sg, op)
        t = sg.tensors[holder]
        data = model.buffers[t.buffer].data
        if bits != 4:
            out[name] = f"int8 ({bits}-bit weights)"
            continue
        if storage == "int8":
            out[name] = "int8 (--w4-storage int8)"
            continue
        if t.type != schema.TensorType.INT8 or data is None or readers[t.buffer] > 1:
            out[name] = "int8 (not a constant int8 weight of its own)"
            continue
        codes = np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=np.int8)
        assert codes.size == 0 or (codes.min() >= -7 and codes.max() <= 7), "a 4-bit weight outside [-7, 7]"
        model.buffers[t.buffer].data = pack(codes)
        t.type = schema.TensorType.INT4
        out[name] = f"int4 packed ({_where(_code(model, op), dequantized)})"
    return out


def _where(code: int, dequantized: bool) -> str:
    name = _WEIGHTED[code]
    if dequantized:     # measured: with XNNPACK, outputs bit-identical to the builtin kernels' (module doc)
        return f"builtin DEQUANTIZE, float {name} on builtin kernels"
    return f"{'builtin' if code in _BUILTIN_ONLY else 'XNNPACK'} {name}"


def builtin_layers(model: schema.ModelT, layers: list[str]) -> set[str]:
    """The layers of an integer graph that run on the builtin kernels under the XNNPACK delegate, read from the
    file: those whose conv reads an INT4 weight directly (XNNPACK rejects the node)."""
    sg, weighted = model.subgraphs[0], _weighted(model)
    assert len(weighted) == len(layers), f"{len(weighted)} conv/FC ops, {len(layers)} layers"
    return {name for op, name in zip(weighted, layers)
            if _code(model, op) in _BUILTIN_ONLY and sg.tensors[op.inputs[1]].type == schema.TensorType.INT4}
