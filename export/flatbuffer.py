"""Edits of a converted .tflite flatbuffer, each one small and checked afterwards by validation.

    edit              why
    add_float_io      the converter folds the edge Q/DQ into int8 graph inputs/outputs; float io puts one
                      QUANTIZE before the first op and one DEQUANTIZE after the last
    biases_to_int64   int16-activation convs need int64 biases; the converter writes int32 ones, which
                      DEPTHWISE_CONV_2D refuses and CONV_2D runs with wrong results (no error); we write
                      our own integers as int64
    weights_direct    dynamic range: each conv / FC reads its int8 weight itself (no DEQUANTIZE), so LiteRT runs
                      its hybrid kernel, which quantizes the float input on every run (AEQ's dynamic_wi8_afp32
                      format)
    write             every file we edit is written with identical numeric vectors stored once: per-channel
                      zero-points (int64 zeros, 8 bytes a channel, on every weight and bias) would otherwise take
                      ~9 % of an INT8 MobileNetV2 file

Everything goes through `ai_edge_litert.tools.flatbuffer_utils` (object API of the schema), no TensorFlow; `read`
verifies the bytes first (export.tflite_file), since the object API follows every offset in them unchecked.
"""
from __future__ import annotations

from collections import Counter

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils as fbu

from .tflite_file import verify

__all__ = ["read", "write", "op_name", "add_float_io", "biases_to_int64", "weights_to_fp16", "weights_direct",
           "buffer_readers", "weight_storage",
           "TensorType", "BuiltinOperator", "TYPE_NAMES"]

TensorType = schema.TensorType
BuiltinOperator = schema.BuiltinOperator
TYPE_NAMES = {v: k for k, v in vars(TensorType).items() if not k.startswith("_")}
_OP_NAMES = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
_WEIGHTED = {BuiltinOperator.CONV_2D, BuiltinOperator.DEPTHWISE_CONV_2D, BuiltinOperator.FULLY_CONNECTED}


def read(data: bytes, where: str = "the model") -> schema.ModelT:
    """The object tree of a .tflite flatbuffer, after `tflite_file.verify` has checked every offset and index
    the unpacking follows (TfliteError naming `where` otherwise)."""
    verify(data, where)
    return fbu.read_model_from_bytearray(bytearray(data))


class _SharingBuilder(flatbuffers.Builder):
    """A flatbuffers builder that writes each distinct numeric vector once and points every later table that
    holds the same values at it. Flatbuffers allows any number of offsets to one vector (the readers, LiteRT's
    verifier and ours follow offsets, never own them); TensorFlow's converter does not share, so its INT8 files
    carry one int64 zero-point vector per weight and per bias."""

    def __init__(self, size: int = 1024):
        super().__init__(size)
        self._written: dict[tuple, int] = {}

    def CreateNumpyVector(self, x):  # noqa: N802 (the flatbuffers API's name)
        key = (x.dtype.str, x.shape, x.tobytes())
        if key not in self._written:
            self._written[key] = super().CreateNumpyVector(x)
        return self._written[key]


def write(model: schema.ModelT) -> bytes:
    builder = _SharingBuilder()
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _code(model, op) -> int:
    return fbu.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])


def op_name(model, op) -> str:
    return _OP_NAMES.get(_code(model, op), "CUSTOM")


def _opcode_index(model, code: int, version: int = 1) -> int:
    for i, oc in enumerate(model.operatorCodes):
        if fbu.get_builtin_code_from_operator_code(oc) == code:
            oc.version = max(oc.version, version)   # the kernel version the newest use of the op needs
            return i
    oc = schema.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def weight_storage(model) -> Counter:
    """(op, stored type) -> count over the convs and the FC of subgraph 0: the type of the constant each weight is
    read from, through the DEQUANTIZE or DENSIFY in front of it, e.g. ("DEPTHWISE_CONV_2D", "FLOAT32")."""
    sg = model.subgraphs[0]
    writer = {o: op for op in sg.operators for o in op.outputs}
    out = Counter()
    for op in sg.operators:
        if _code(model, op) in _WEIGHTED:
            t = op.inputs[1]
            while t in writer and op_name(model, writer[t]) in ("DEQUANTIZE", "DENSIFY"):
                t = writer[t].inputs[0]
            out[(op_name(model, op), TYPE_NAMES[sg.tensors[t].type])] += 1
    return out


def buffer_readers(model) -> Counter:
    """How many tensors read each buffer: an edit may drop a buffer's data only when one tensor reads it."""
    return Counter(t.buffer for g in model.subgraphs for t in g.tensors)


def _new_buffer(model, data: bytes | None = None) -> int:
    buf = schema.BufferT()
    buf.data = None if data is None else np.frombuffer(data, dtype=np.uint8).copy()
    model.buffers.append(buf)
    return len(model.buffers) - 1


def _float_twin(model, sg, t_idx: int, suffix: str) -> int:
    """A float32 tensor of the same shape as tensor t_idx (no quantization), appended to the subgraph."""
    src = sg.tensors[t_idx]
    t = schema.TensorT()
    t.shape, t.type, t.buffer = list(src.shape), TensorType.FLOAT32, _new_buffer(model)
    t.name = (src.name.decode() if isinstance(src.name, bytes) else (src.name or "")) + suffix
    if src.shapeSignature is not None:
        t.shapeSignature = list(src.shapeSignature)
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def add_float_io(model: schema.ModelT) -> schema.ModelT:
    """Make every integer input/output of subgraph 0 float: QUANTIZE at the inputs, DEQUANTIZE at the outputs.
    The integer tensors keep their scales, so the graph computes exactly what it did on integer io."""
    sg = model.subgraphs[0]
    q_op, dq_op = _opcode_index(model, BuiltinOperator.QUANTIZE), _opcode_index(model, BuiltinOperator.DEQUANTIZE)
    remap, head, tail = {}, [], []  # integer io tensor -> its float twin
    for t in sg.inputs:
        if sg.tensors[t].type != TensorType.FLOAT32:
            remap[t] = _float_twin(model, sg, t, "_float")
            head.append(_op(q_op, [remap[t]], [t]))
    for t in sg.outputs:
        if sg.tensors[t].type != TensorType.FLOAT32:
            remap[t] = _float_twin(model, sg, t, "_float")
            tail.append(_op(dq_op, [t], [remap[t]]))
    sg.operators = head + list(sg.operators) + tail
    sg.inputs = [remap.get(t, t) for t in sg.inputs]
    sg.outputs = [remap.get(t, t) for t in sg.outputs]
    for sig in model.signatureDefs or []:  # signatures name the io tensors by index
        for tm in list(sig.inputs or []) + list(sig.outputs or []):
            tm.tensorIndex = remap.get(tm.tensorIndex, tm.tensorIndex)
    return model


_WEIGHTED = (BuiltinOperator.CONV_2D, BuiltinOperator.DEPTHWISE_CONV_2D, BuiltinOperator.FULLY_CONNECTED)
DEQUANTIZE_FP16_VERSION = 3   # DEQUANTIZE of a float16 input (tflite/tools/versioning/op_version.cc)


def weights_to_fp16(model: schema.ModelT) -> int:
    """Store every float32 conv / FC weight of subgraph 0 as float16 behind a DEQUANTIZE (LiteRT's 16-bit weight
    format: XNNPACK unpacks it once at load, the builtin kernels read the DEQUANTIZE output). The weights must
    already be half values, so the file computes what the float32 file did. Returns the number of weights
    stored."""
    sg = model.subgraphs[0]
    dq = _opcode_index(model, BuiltinOperator.DEQUANTIZE, DEQUANTIZE_FP16_VERSION)
    readers = buffer_readers(model)
    head, done = [], set()
    for op in sg.operators:
        if _code(model, op) not in _WEIGHTED or op.inputs[1] in done:
            continue
        w_idx = op.inputs[1]
        w = sg.tensors[w_idx]
        data = model.buffers[w.buffer].data if w.buffer else None
        if w.type != TensorType.FLOAT32 or data is None or len(data) == 0:
            continue
        values = np.frombuffer(bytes(data), dtype=np.float32)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            raise ValueError(f"weight {w.name!r} holds values that float16 cannot hold exactly: the model's weights "
                             "must be rounded to half precision before export")
        t = schema.TensorT()
        t.shape, t.type, t.name = list(w.shape), TensorType.FLOAT16, w.name
        if readers[w.buffer] == 1:              # the float32 copy leaves the file: its buffer takes the halves
            model.buffers[w.buffer].data = np.frombuffer(half.tobytes(), dtype=np.uint8).copy()
            t.buffer = w.buffer
        else:                                   # another tensor reads the float32 values: keep them
            t.buffer = _new_buffer(model, half.tobytes())
        w.buffer = 0                            # no data (buffer 0 is the schema's empty one): DEQUANTIZE writes it
        sg.tensors.append(t)
        head.append(_op(dq, [len(sg.tensors) - 1], [w_idx]))
        done.add(w_idx)
    sg.operators = head + list(sg.operators)
    return len(head)


def weights_direct(model: schema.ModelT) -> int:
    """Dynamic range: every conv / FC of subgraph 0 whose weight is the DEQUANTIZE of an int8 constant reads the
    int8 tensor itself (its per-channel scales and axis as they are), and a DEQUANTIZE left with no reader goes.
    With float input and int8 weight the op is LiteRT's hybrid kernel; FULLY_CONNECTED is told to quantize its
    input asymmetrically, as the convs always do (tflite conv.cc / depthwise_conv.cc EvalHybridPerChannel), so
    one rule holds for every layer. Returns the number of ops that now read int8 weights."""
    sg = model.subgraphs[0]
    dq = {op.outputs[0]: op for op in sg.operators if _code(model, op) == BuiltinOperator.DEQUANTIZE}
    n = 0
    for op in sg.operators:
        if _code(model, op) not in _WEIGHTED or op.inputs[1] not in dq:
            continue
        src = dq[op.inputs[1]].inputs[0]
        if sg.tensors[src].type != TensorType.INT8:
            continue
        op.inputs[1] = src
        if _code(model, op) == BuiltinOperator.FULLY_CONNECTED:
            op.builtinOptions.asymmetricQuantizeInputs = True
        n += 1
    read = {i for op in sg.operators for i in op.inputs} | set(sg.outputs)
    sg.operators = [op for op in sg.operators
                    if _code(model, op) != BuiltinOperator.DEQUANTIZE or op.outputs[0] in read]
    return n


def _op(opcode: int, inputs: list[int], outputs: list[int]) -> schema.OperatorT:
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = opcode, inputs, outputs
    return op


def biases_to_int64(model: schema.ModelT, codes: list[np.ndarray]) -> int:
    """Write `codes` (one int array per conv / FC op, in graph order) as the int64 bias of every such op whose
    input is int16. Our own integers, not the converter's: it derives them from the float32 bias, which cannot
    carry the large int16-activation bias integers (|q| up to ~1e7) exactly. Returns the count rewritten."""
    n = 0
    for sg in model.subgraphs[:1]:
        weighted = [op for op in sg.operators if _code(model, op) in _WEIGHTED]
        assert len(weighted) == len(codes), f"{len(weighted)} conv/FC ops, {len(codes)} bias arrays"
        for op, q in zip(weighted, codes):
            if sg.tensors[op.inputs[0]].type != TensorType.INT16 or len(op.inputs) < 3 or op.inputs[2] < 0:
                continue
            bias = sg.tensors[op.inputs[2]]
            assert bias.type == TensorType.INT32 and bias.shape[0] == len(q), "unexpected bias tensor"
            bias.buffer = _new_buffer(model, np.asarray(q, dtype="<i8").tobytes())  # fresh: buffers may be shared
            bias.type = TensorType.INT64
            n += 1
    return n
