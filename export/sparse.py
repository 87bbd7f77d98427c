"""Sparse weight storage in a .tflite file: CSR constants decoded by a DENSIFY op in front of the conv.

The layout is the one TensorFlow's converter writes (compiler/mlir/lite/transforms/dense_to_sparse_pass.cc,
PopulateEncodingParams with no blocks), read by the DENSIFY kernel (lite/kernels/densify.cc) and by XNNPACK, both
through FormatConverter::SparseToDense, which follows any traversal order:

    field                       value for a weight of shape (d0, d1, d2, d3), e.g. conv (O, kh, kw, I)
    traversal_order             [0, 1, 2, 3] (TensorFlow's), or another axis moved last (`_orders`) where that
                                is smaller; block_map empty
    dim_metadata[0 .. 2]        DENSE, dense_size = the size of the axis traversal_order names
    dim_metadata[3]             SPARSE_CSR: array_segments = row pointers over the rows of the dense levels
                                (rows + 1 of them, 0 to nnz), array_indices = the last level's index of each
                                non-zero, row by row; each vector in the narrowest of uint8 / uint16 / int32 that
                                holds its largest possible value
    the constant's buffer       the nnz non-zero values in traversal order, in the weight's type (int8 / float32)

The sparse constant keeps the weight's dense shape and type, without quantization; a new DENSIFY op, placed just
before the conv, writes the original weight tensor, which keeps its name, shape and per-channel quantization (the
conv reads its scales from there) and loses its buffer. The dense copy is made once, at the first run, in the
arena: only the file shrinks. XNNPACK takes the DENSIFY-fed convs as it takes dense ones (it densifies constant
DENSIFY inputs when it builds its graph): outputs bit-identical to the dense file's, same speed (ai_edge_litert
2.3.0, measured on the test model).

    storage   which conv / depthwise weights become sparse (the classifier stays dense, see _SPARSE_OPS)
    dense     none
    sparse    every one with at least one zero
    auto      those whose sparse form (values, indices, tables, DENSIFY op) takes fewer bytes than the dense one
"""
from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from .flatbuffer import _code, _opcode_index, buffer_readers
from .int4 import unpack

__all__ = ["STORAGES", "SPARSE_KINDS", "csr_encode", "csr_decode", "sparse_nbytes", "best_order", "sparsify", "stored_weights",
           "dense_array"]

STORAGES = ("auto", "dense", "sparse")
SPARSE_KINDS = ("fp32", "int8")         # files whose weights feed the conv directly (no DEQUANTIZE between)
# Bytes a sparse weight adds besides its values and index vectors: the DENSIFY operator and its opcode entry,
# one more tensor and buffer table, the SparsityParameters with n DimensionMetadata tables and two index-vector
# tables, vtables and alignment. Measured on the tiny test model (~150-190 bytes per 4-d weight); rounded up so
# that `auto` never picks a sparse form that ends larger.
TABLE_OVERHEAD = 256
# Convs only: XNNPACK refuses a FULLY_CONNECTED whose weight a DENSIFY writes ("failed to delegate
# FULLY_CONNECTED node", ai_edge_litert 2.3.0), and the file then does not load at all; the classifier stays dense.
_SPARSE_OPS = {schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D}
_WEIGHTED = _SPARSE_OPS | {schema.BuiltinOperator.FULLY_CONNECTED}
_DTYPES = {schema.TensorType.FLOAT32: np.dtype("<f4"), schema.TensorType.INT8: np.dtype("i1"),
           schema.TensorType.FLOAT16: np.dtype("<f2")}
_INDEX_TYPES = ((schema.SparseIndexVector.Uint8Vector, schema.Uint8VectorT, np.uint8),
                (schema.SparseIndexVector.Uint16Vector, schema.Uint16VectorT, np.uint16),
                (schema.SparseIndexVector.Int32Vector, schema.Int32VectorT, np.int32))


def _index_type(largest: int) -> tuple:
    return next(t for t in _INDEX_TYPES if largest <= np.iinfo(t[2]).max)


def csr_encode(dense: np.ndarray, order=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, row pointers, column indices) of `dense` traversed in `order` (default: its own axis order), every
    level but the last dense, the last CSR; index arrays in their storage dtype (the narrowest that holds the
    largest possible value)."""
    t = dense if order is None else np.transpose(dense, order)
    rows = t.reshape(-1, t.shape[-1])                   # (product of the dense levels, last level)
    nz = rows != 0
    segments = np.concatenate([[0], np.cumsum(nz.sum(1))])
    indices = np.nonzero(nz)[1]
    seg_dt = _index_type(int(segments[-1]))[2]
    idx_dt = _index_type(t.shape[-1] - 1)[2]
    return rows[nz], segments.astype(seg_dt), indices.astype(idx_dt)


def csr_decode(values: np.ndarray, segments: np.ndarray, indices: np.ndarray, shape, order=None) -> np.ndarray:
    """The dense array of `shape` that `csr_encode(..., order)` encoded (zeros where no value is stored)."""
    order = list(range(len(shape))) if order is None else list(order)
    t_shape = [shape[d] for d in order]
    rows = np.zeros((int(np.prod(t_shape[:-1])), t_shape[-1]), dtype=values.dtype)
    row_of = np.repeat(np.arange(len(segments) - 1), np.diff(segments.astype(np.int64)))
    rows[row_of, indices.astype(np.int64)] = values
    return np.transpose(rows.reshape(t_shape), np.argsort(order))


def _orders(ndim: int) -> list[list[int]]:
    """Traversal orders tried: each axis as the CSR level, the others in their own order before it. TensorFlow's
    converter always takes the last axis; another one pays when the last axis is over 256 long (uint16
    column indices: 3 bytes an int8 non-zero instead of 2), e.g. a 1x1 projection conv 960 -> 160."""
    return [[d for d in range(ndim) if d != last] + [last] for last in reversed(range(ndim))]


def sparse_nbytes(dense: np.ndarray, order=None) -> int:
    """Bytes the sparse form of `dense` adds to a file (values, index vectors, tables), for `auto`."""
    values, segments, indices = csr_encode(dense, order)
    return values.nbytes + segments.nbytes + indices.nbytes + TABLE_OVERHEAD + 4 * dense.ndim


def best_order(dense: np.ndarray) -> tuple[list[int], int]:
    """(traversal order, bytes) of the smallest sparse form of `dense` (the first of `_orders` on a tie)."""
    return min(((o, sparse_nbytes(dense, o)) for o in _orders(dense.ndim)), key=lambda c: c[1])


def _sparsity(shape, order, segments: np.ndarray, indices: np.ndarray) -> schema.SparsityParametersT:
    sp = schema.SparsityParametersT()
    sp.traversalOrder, sp.dimMetadata = list(order), []      # no block map: no blocks
    for d in order[:-1]:
        dm = schema.DimensionMetadataT()
        dm.format, dm.denseSize = schema.DimensionType.DENSE, int(shape[d])
        sp.dimMetadata.append(dm)
    dm = schema.DimensionMetadataT()
    dm.format = schema.DimensionType.SPARSE_CSR
    dm.arraySegmentsType, dm.arraySegments = _index_vector(segments)
    dm.arrayIndicesType, dm.arrayIndices = _index_vector(indices)
    sp.dimMetadata.append(dm)
    return sp


def _index_vector(a: np.ndarray) -> tuple[int, object]:
    code, cls, _ = next(t for t in _INDEX_TYPES if t[2] == a.dtype)
    v = cls()
    v.values = a
    return code, v


def _index_values(kind: int, v) -> np.ndarray:
    dt = next(t[2] for t in _INDEX_TYPES if t[0] == kind)
    return np.asarray(v.values if v is not None and v.values is not None else [], dtype=dt)


def dense_array(model: schema.ModelT, tensor: schema.TensorT) -> np.ndarray:
    """The values of a constant tensor in its shape: from its buffer (INT4: unpacked to int8), or decoded from
    CSR when it is sparse.
    Only the layout `csr_encode` writes is decoded (AssertionError otherwise: a file of ours changed shape)."""
    raw = model.buffers[tensor.buffer].data
    shape = [int(d) for d in tensor.shape]
    if tensor.type == schema.TensorType.INT4:        # packed codes (export/int4.py), never sparse: as int8
        assert tensor.sparsity is None, "a sparse INT4 tensor"
        return unpack(np.zeros(0, np.uint8) if raw is None else raw, int(np.prod(shape))).reshape(shape)
    dt = _DTYPES[tensor.type]
    values = np.frombuffer(np.asarray(raw, dtype=np.uint8).tobytes(), dtype=dt) if raw is not None \
        else np.zeros(0, dt)
    sp = tensor.sparsity
    if sp is None:
        return values.reshape(shape)
    order, dims = [int(d) for d in sp.traversalOrder], sp.dimMetadata
    assert sorted(order) == list(range(len(shape))) and not len(sp.blockMap if sp.blockMap is not None else []), \
        "a sparse layout with blocks"
    assert all(dm.format == schema.DimensionType.DENSE and dm.denseSize == shape[d]
               for dm, d in zip(dims[:-1], order)), "dense levels that do not match the shape"
    last = dims[-1]
    assert last.format == schema.DimensionType.SPARSE_CSR
    return csr_decode(values, _index_values(last.arraySegmentsType, last.arraySegments),
                      _index_values(last.arrayIndicesType, last.arrayIndices), shape, order)




def stored_weights(model: schema.ModelT) -> list[tuple[int, int, np.ndarray]]:
    """(weight tensor the op reads, tensor that holds the values, the values in the weight's shape) for every
    conv / FC op of subgraph 0 in graph order. The holder is the weight itself, the input of the DEQUANTIZE
    (weight-only files) or the sparse input of the DENSIFY (decoded here from CSR) that writes it."""
    sg = model.subgraphs[0]
    producer = {o: op for op in sg.operators for o in op.outputs}
    out = []
    for op in sg.operators:
        if _code(model, op) not in _WEIGHTED:
            continue
        w = src = op.inputs[1]
        if src in producer and _code(model, producer[src]) in (schema.BuiltinOperator.DEQUANTIZE,
                                                               schema.BuiltinOperator.DENSIFY):
            src = producer[src].inputs[0]
        out.append((w, src, dense_array(model, sg.tensors[src])))
    return out






def sparsify(model: schema.ModelT, storage: str) -> dict:
    """Store the conv / FC weights of subgraph 0 as CSR + DENSIFY where `storage` says (see the module doc).
    Edits `model` in place; returns {"storage", "sparse_weights", "dense_weights", "bytes_saved_estimate"}."""
    assert storage in STORAGES, storage
    note = {"storage": storage, "sparse_weights": 0, "dense_weights": 0, "bytes_saved_estimate": 0}
    if storage == "dense":
        return note
    sg, users = model.subgraphs[0], buffer_readers(model)
    ops = []
    for op in sg.operators:
        w = op.inputs[1] if _code(model, op) in _SPARSE_OPS and len(op.inputs) > 1 else -1
        t = sg.tensors[w] if w >= 0 else None
        data = model.buffers[t.buffer].data if t is not None else None
        if t is None or data is None or t.type not in _DTYPES or t.sparsity is not None:
            ops.append(op)
            continue
        dense = dense_array(model, t)
        order, nbytes = best_order(dense)
        saved = dense.nbytes - nbytes
        if not np.any(dense == 0) or (storage == "auto" and saved <= 0) or users[t.buffer] > 1:
            note["dense_weights"] += 1
            ops.append(op)
            continue
        ops += [_densify_op(model, sg, w, dense, order), op]
        note["sparse_weights"] += 1
        note["bytes_saved_estimate"] += saved
    sg.operators = ops
    return note


def _empty_buffer(model: schema.ModelT) -> int:
    """Buffer 0, the schema's empty sentinel, which every tensor without constant data names; a new one if a
    file breaks that convention."""
    b = model.buffers[0]
    if b.data is None and not b.offset:
        return 0
    model.buffers.append(schema.BufferT())
    return len(model.buffers) - 1


def _densify_op(model: schema.ModelT, sg: schema.SubGraphT, w: int, dense: np.ndarray, order) -> schema.OperatorT:
    """Move weight tensor w's values into a new sparse constant (traversed in `order`) and return the DENSIFY op
    that writes w."""
    t = sg.tensors[w]
    values, segments, indices = csr_encode(dense, order)
    s = schema.TensorT()
    # No quantization on the sparse constant: the conv reads its scales from the DENSIFY output (tensor w, which
    # keeps them), DENSIFY only copies codes, and a copy would cost 12 bytes per output channel (float32 scale,
    # int64 zero-point). Measured with ai_edge_litert 2.3.0: outputs bit-identical to the dense file's, XNNPACK
    # and builtin kernels alike, with or without it.
    s.shape, s.type = list(t.shape), t.type
    s.name = f"{w}_csr"                   # the weight tensor keeps its own name; converter names run ~190 bytes
    s.sparsity = _sparsity(dense.shape, order, segments, indices)
    s.buffer = t.buffer                                  # the weight's own buffer, now holding only the values
    model.buffers[t.buffer].data = np.frombuffer(values.astype(values.dtype.newbyteorder("<")).tobytes(),
                                                 dtype=np.uint8).copy()
    t.buffer = _empty_buffer(model)       # written at run time by DENSIFY
    sg.tensors.append(s)
    op = schema.OperatorT()
    op.opcodeIndex = _opcode_index(model, schema.BuiltinOperator.DENSIFY)
    op.inputs, op.outputs = [len(sg.tensors) - 1], [w]
    return op
