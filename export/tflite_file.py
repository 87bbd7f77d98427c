"""Reading a .tflite file that came from elsewhere: every offset is checked before anything follows it.

A .tflite file is a flatbuffer of the LiteRT schema. Its readers (the object API that export.flatbuffer edits
through, the interpreter's loader) trust the offsets inside it: a corrupt or hostile file sends them past its
end, into a numpy or struct error deep inside, a hang on a vector "length" of 2^32, or a crash of the native
loader. `verify` walks the whole file first, as flatbuffers' own C++ Verifier does, then checks the indices
that the edits and the interpreter follow:

    check                                                          limit / why
    size; identifier "TFL3" at bytes 4..8; schema version 3        a LiteRT model at all
    every table and its vtable inside the file, aligned            the reader looks fields up through them
    every field, string and vector inside the file, aligned;       a read past the end
      strings NUL-terminated
    every table reached: vectors of tables, union members          depth <= 64, tables <= 1,000,000 (the C++
                                                                   Verifier's defaults: nesting and sharing)
    tensor, metadata -> buffer; operator -> opcode and tensors;    indices the edits and the interpreter use
      subgraph io and signatures -> tensors; data kept after the
      flatbuffer (by offset) inside the file
    a sparse tensor's tables (traversal order, block map, dense    DENSIFY and the sparse kernels index the
      sizes, CSR row pointers and column indices) consistent       values and the dense output with them,
      with its shape and with the number of values its buffer      unchecked (export/sparse.py writes them)
      holds
    a constant INT4 tensor: its buffer holds ceil(n / 2) bytes   the kernels unpack two codes a byte for the
      for its n elements (two codes a byte, export/int4.py)        n the shape says, unchecked

Which field of which table is a scalar (of which width), a string, a vector (of what) or a table (of which
type), and which tables a union holds, is read from the generated schema module (ai_edge_litert's
schema_py_generated), so the walk follows the installed schema version rather than a copy of it.
"""
from __future__ import annotations

import functools
import inspect
import re
import struct
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

__all__ = ["TfliteError", "verify", "read_tflite", "IDENTIFIER"]

IDENTIFIER = b"TFL3"        # flatbuffer file identifier, bytes 4..8 of every .tflite
SCHEMA_VERSION = 3          # Model.version the interpreter accepts
MAX_DEPTH = 64              # flatbuffers::Verifier defaults
MAX_TABLES = 1_000_000


class TfliteError(ValueError):
    """A .tflite file that is missing, unreadable or malformed; the message names the file and the fault."""


# ---------------------------------------------------------------------------------------------- the schema

_METHOD = re.compile(r"^    def (\w+)\(self(?:, j)?\):\n((?:        .*\n|\s*\n)+)", re.M)
_SLOT = re.compile(r"self\._tab\.Offset\((\d+)\)")
_FLAGS = re.compile(r"self\._tab\.Get\(flatbuffers\.number_types\.(\w+Flags)")
_OBJ = re.compile(r"obj = (\w+)\(\)")


def _width(body: str) -> int:
    return getattr(flatbuffers.number_types, _FLAGS.search(body).group(1)).bytewidth


def _field(body: str) -> tuple:
    """What one generated accessor reads: ("scalar", width) | ("string",) | ("table", type) | ("union", method)
    | ("vector", width) | ("strings",) | ("tables", type)."""
    if "self._tab.Union(" in body:
        return ("union",)
    if "self._tab.Vector(o)" in body:
        if "self._tab.Indirect(x)" in body:
            return ("tables", _OBJ.search(body).group(1))
        if "self._tab.String(a" in body:
            return ("strings",)
        if "self._tab.Get(" in body:
            return ("vector", _width(body))
    elif "self._tab.Indirect(o + self._tab.Pos)" in body:
        return ("table", _OBJ.search(body).group(1))
    elif "self._tab.String(o + self._tab.Pos)" in body:
        return ("string",)
    elif "self._tab.Get(" in body and "o + self._tab.Pos" in body:
        return ("scalar", _width(body))
    raise AssertionError(f"an accessor of a kind this walk does not know:\n{body}")


@functools.lru_cache(maxsize=1)
def _schema() -> tuple[dict, dict]:
    """({table: {vtable slot: field}}, {union enum: {type code: table}}) from the generated module's source.
    A union field is stored as ("union", enum, slot of its type field)."""
    src = inspect.getsource(schema)
    union_of = {m: enum for enum, m in re.findall(r" = (\w+)Creator\(self\.\w+, \w+\.(\w+)\(\)\)", src)}
    tables: dict[str, dict[int, tuple]] = {}
    for chunk in re.split(r"^(?=class )", src, flags=re.M):
        name = re.match(r"class (\w+)\(object\):", chunk)
        if not name or name.group(1).endswith("T") or "def Init(self, buf, pos)" not in chunk:
            continue                                                # enums and the object-API classes
        fields, slots = {}, {}
        for method, body in _METHOD.findall(chunk):
            slot = _SLOT.search(body)
            if slot is None or method.endswith(("Length", "IsNone", "AsNumpy")):
                continue
            slots[method] = int(slot.group(1))
            fields[method] = _field(body)
        tables[name.group(1)] = {slots[m]: f for m, f in fields.items()}
        for m, f in fields.items():
            if f == ("union",):
                tables[name.group(1)][slots[m]] = ("union", union_of[m], slots[m + "Type"])
    unions = {}
    for enum, body in re.findall(r"^def (\w+)Creator\(unionType, table\):\n((?:    .*\n)+)", src, re.M):
        members = re.findall(rf"if unionType == {enum}\.(\w+):\n\s+return (\w+)T\.InitFromBuf", body)
        unions[enum] = {getattr(getattr(schema, enum), code): table for code, table in members}
    return tables, unions


# ---------------------------------------------------------------------------------------------- the walk

class _Walk:
    def __init__(self, buf: bytes, where: str):
        self.buf, self.n, self.where, self.tables = buf, len(buf), where, 0
        self.layout, self.unions = _schema()

    def fail(self, what: str):
        raise TfliteError(f"{self.where} is not a valid .tflite file: {what}")

    def need(self, pos: int, size: int, align: int, what: str):
        if pos < 0 or pos + size > self.n:
            self.fail(f"{what} at byte {pos} (+{size}) lies outside the file ({self.n} bytes)")
        if pos % align:
            self.fail(f"{what} at byte {pos} is not aligned to {align} bytes")

    def read(self, fmt: str, pos: int, what: str) -> int:
        size = struct.calcsize(fmt)
        self.need(pos, size, size, what)
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def target(self, pos: int, what: str) -> int:
        """Where the offset stored at `pos` points: forward, by 1 to 2^31 - 1 bytes."""
        off = self.read("<I", pos, what)
        if not 0 < off < 2 ** 31:
            self.fail(f"{what}: offset {off} at byte {pos}")
        return pos + off

    def vector(self, pos: int, width: int, what: str) -> tuple[int, int]:
        """(position of the first element, length) of the vector whose offset is stored at `pos`."""
        at = self.target(pos, what)
        length = self.read("<I", at, f"length of {what}")
        self.need(at + 4, length * width, 1, f"{what} ({length} elements of {width} bytes)")
        return at + 4, length

    def table(self, pos: int, name: str, depth: int):
        self.tables += 1
        if depth > MAX_DEPTH or self.tables > MAX_TABLES:
            self.fail(f"tables nested deeper than {MAX_DEPTH} or more than {MAX_TABLES:,} of them")
        vt = pos - self.read("<i", pos, f"{name} table")
        vsize = self.read("<H", vt, f"vtable of a {name} table")
        tsize = self.read("<H", vt + 2, f"vtable of a {name} table")
        if vsize < 4 or vsize % 2:
            self.fail(f"the vtable of a {name} table at byte {pos} has size {vsize}")
        self.need(vt, vsize, 2, f"vtable of a {name} table")
        self.need(pos, tsize, 1, f"{name} table")
        for slot, f in self.layout[name].items():
            off = self.read("<H", vt + slot, "vtable entry") if slot < vsize else 0
            if off:
                self.field(pos, vt, vsize, pos + off, f, f"{name} field {(slot - 4) // 2}", depth)

    def field(self, pos: int, vt: int, vsize: int, at: int, f: tuple, what: str, depth: int):
        kind = f[0]
        if kind == "scalar":
            self.need(at, f[1], f[1], what)
        elif kind == "string":
            self.string(at, what)
        elif kind == "table":
            self.table(self.target(at, what), f[1], depth + 1)
        elif kind == "vector":
            self.vector(at, f[1], what)
        elif kind == "strings":
            first, length = self.vector(at, 4, what)
            for i in range(length):
                self.string(first + 4 * i, what)
        elif kind == "tables":
            first, length = self.vector(at, 4, what)
            for i in range(length):
                self.table(self.target(first + 4 * i, what), f[1], depth + 1)
        else:                                       # union: its type code sits in a field of its own
            _, enum, type_slot = f
            off = self.read("<H", vt + type_slot, "vtable entry") if type_slot < vsize else 0
            code = self.read("<B", pos + off, f"{what} type") if off else 0
            member = self.unions[enum].get(code)    # an unknown code is skipped, as by the C++ Verifier
            if member is not None:
                self.table(self.target(at, what), member, depth + 1)

    def string(self, at: int, what: str):
        first, length = self.vector(at, 1, what)
        self.need(first, length + 1, 1, f"{what} (string and its NUL)")
        if self.buf[first + length] != 0:
            self.fail(f"{what}: a string at byte {first} without its NUL terminator")


def _check_indices(buf: bytes, walk: _Walk):
    """Indices and byte ranges the interpreter and flatbuffer_utils.read_model_from_bytearray follow."""
    model = schema.Model.GetRootAs(buf, 0)
    if model.Version() != SCHEMA_VERSION:
        walk.fail(f"schema version {model.Version()}, not {SCHEMA_VERSION}")
    n_sub, n_buf, n_codes = model.SubgraphsLength(), model.BuffersLength(), model.OperatorCodesLength()
    if n_sub < 1 or n_buf < 1:
        walk.fail(f"{n_sub} subgraphs and {n_buf} buffers (at least one of each is needed)")

    def in_file(offset: int, size: int, what: str):     # data stored after the flatbuffer, by offset
        if offset and offset + size > len(buf):
            walk.fail(f"{what} points to bytes {offset}..{offset + size} of {len(buf)}")

    for b in range(n_buf):
        in_file(model.Buffers(b).Offset(), model.Buffers(b).Size(), f"buffer {b}")
    for m in range(model.MetadataLength()):
        if not 0 <= model.Metadata(m).Buffer() < n_buf:
            walk.fail(f"metadata {m} names buffer {model.Metadata(m).Buffer()} of {n_buf}")
    n_tensors = []
    for s in range(n_sub):
        sg = model.Subgraphs(s)
        n_t = sg.TensorsLength()
        n_tensors.append(n_t)
        if sg.OperatorsIsNone():
            walk.fail(f"subgraph {s} has no operator list")
        for t in range(n_t):
            if not 0 <= sg.Tensors(t).Buffer() < n_buf:
                walk.fail(f"tensor {t} of subgraph {s} names buffer {sg.Tensors(t).Buffer()} of {n_buf}")
            if sg.Tensors(t).Sparsity() is not None:
                _check_sparsity(sg.Tensors(t), model.Buffers(sg.Tensors(t).Buffer()), f"tensor {t} of subgraph {s}",
                                walk)
            elif sg.Tensors(t).Type() == schema.TensorType.INT4:
                _check_int4(sg.Tensors(t), model.Buffers(sg.Tensors(t).Buffer()), f"tensor {t} of subgraph {s}",
                            walk)
        io = [sg.Inputs(i) for i in range(sg.InputsLength())] + [sg.Outputs(i) for i in range(sg.OutputsLength())]
        if any(not 0 <= i < n_t for i in io):
            walk.fail(f"the inputs / outputs of subgraph {s} name tensors outside its {n_t}")
        for o in range(sg.OperatorsLength()):
            op = sg.Operators(o)
            if op.OpcodeIndex() >= n_codes:
                walk.fail(f"operator {o} of subgraph {s} names opcode {op.OpcodeIndex()} of {n_codes}")
            used = [op.Inputs(i) for i in range(op.InputsLength())] + \
                   [op.Outputs(i) for i in range(op.OutputsLength())]
            if any(not -1 <= t < n_t for t in used):            # -1: an optional input left out
                walk.fail(f"operator {o} of subgraph {s} names tensors outside its {n_t}")
            in_file(op.LargeCustomOptionsOffset(), op.LargeCustomOptionsSize(), f"operator {o}'s options")
    for d in range(model.SignatureDefsLength()):
        sig = model.SignatureDefs(d)
        if not 0 <= sig.SubgraphIndex() < n_sub:
            walk.fail(f"signature {d} names subgraph {sig.SubgraphIndex()} of {n_sub}")
        maps = [sig.Inputs(i) for i in range(sig.InputsLength())] + [sig.Outputs(i) for i in range(sig.OutputsLength())]
        if any(not 0 <= tm.TensorIndex() < n_tensors[sig.SubgraphIndex()] for tm in maps):
            walk.fail(f"signature {d} names tensors outside subgraph {sig.SubgraphIndex()}")


_VALUE_BYTES = {schema.TensorType.FLOAT32: 4, schema.TensorType.FLOAT16: 2, schema.TensorType.INT8: 1,
                schema.TensorType.UINT8: 1}
_INDEX_VECTORS = {schema.SparseIndexVector.Int32Vector: schema.Int32Vector,
                  schema.SparseIndexVector.Uint16Vector: schema.Uint16Vector,
                  schema.SparseIndexVector.Uint8Vector: schema.Uint8Vector}


def _as_list(a) -> list[int]:
    return [] if isinstance(a, int) else [int(v) for v in a]       # the reader gives 0 for an absent vector


def _index_vector(kind: int, table) -> np.ndarray | None:
    if kind not in _INDEX_VECTORS or table is None:
        return None
    v = _INDEX_VECTORS[kind]()
    v.Init(table.Bytes, table.Pos)
    a = v.ValuesAsNumpy()
    return np.zeros(0, np.int64) if isinstance(a, int) else a.astype(np.int64)


def _level_sizes(t, sp, dims, fail) -> list[int]:
    """Size of each dimension of the traversal: the tensor's dims (divided by their block size where blocked),
    then one per block (its dense size)."""
    shape, order, block_map = _as_list(t.ShapeAsNumpy()), _as_list(sp.TraversalOrderAsNumpy()), \
        _as_list(sp.BlockMapAsNumpy())
    n, k = len(shape), len(block_map)
    if sorted(order) != list(range(n + k)) or len(dims) != n + k or sorted(set(block_map)) != sorted(block_map) \
            or any(not 0 <= d < n for d in block_map) or any(d <= 0 for d in shape):
        fail(f"traversal order {order}, block map {block_map} and {len(dims)} dimensions for shape {shape}")
    sizes = list(shape)
    for j, d in enumerate(block_map):
        b = dims[order.index(n + j)].DenseSize()
        if b <= 0 or shape[d] % b:
            fail(f"block size {b} for a dimension of {shape[d]}")
        sizes[d] //= b
        sizes.append(b)
    return [sizes[d] for d in order]


def _check_sparsity(t, buffer, what: str, walk: _Walk):
    """The sparse tensor's tables against its shape, level by level (FormatConverter's traversal), and the number
    of values they address against its buffer's size."""
    def fail(msg: str):
        walk.fail(f"{what}: sparsity: {msg}")

    sp = t.Sparsity()
    dims = [sp.DimMetadata(i) for i in range(sp.DimMetadataLength())]
    count = 1                                       # nodes at the current level of the traversal
    for i, (dm, size) in enumerate(zip(dims, _level_sizes(t, sp, dims, fail))):
        if dm.Format() == schema.DimensionType.DENSE:
            if dm.DenseSize() != size:
                fail(f"level {i} is dense with size {dm.DenseSize()}, not {size}")
            count *= size
            continue
        seg = _index_vector(dm.ArraySegmentsType(), dm.ArraySegments())
        idx = _index_vector(dm.ArrayIndicesType(), dm.ArrayIndices())
        if dm.Format() != schema.DimensionType.SPARSE_CSR or seg is None or idx is None:
            fail(f"level {i} is neither dense nor CSR with row pointers and indices")
        if len(seg) != count + 1 or seg[0] != 0 or np.any(np.diff(seg) < 0) or seg[-1] != len(idx):
            fail(f"level {i}: {len(seg)} row pointers for {count} rows are not a non-decreasing run from 0 to "
                 f"its {len(idx)} indices")
        if len(idx) and (idx.min() < 0 or idx.max() >= size):
            fail(f"level {i}: index {int(idx.max() if idx.max() >= size else idx.min())} outside 0..{size - 1}")
        count = len(idx)
    width = _VALUE_BYTES.get(t.Type())
    if width is None:
        fail(f"values of type {t.Type()}")
    stored = buffer.Size() if buffer.Offset() else buffer.DataLength()
    if stored != count * width:
        fail(f"the tables address {count} values of {width} bytes, the buffer holds {stored} bytes")


def _check_int4(t, buffer, what: str, walk: _Walk):
    """A constant INT4 tensor holds its shape's element count packed two a byte, no more, no less."""
    stored = buffer.Size() if buffer.Offset() else buffer.DataLength()
    if stored == 0:                                 # no data: an activation (written at run time)
        return
    shape = _as_list(t.ShapeAsNumpy())
    if any(d < 0 for d in shape):
        walk.fail(f"{what}: INT4 constant of shape {shape}")
    n = int(np.prod(shape, dtype=np.int64))
    if stored != (n + 1) // 2:
        walk.fail(f"{what}: an INT4 constant of {n} elements takes {(n + 1) // 2} bytes packed, its buffer holds "
                  f"{stored}")


def verify(data: bytes, where: str = "the model"):
    """TfliteError naming `where` and the first fault unless `data` is a well-formed .tflite flatbuffer."""
    walk = _Walk(bytes(data), where)
    if len(data) < 8 or data[4:8] != IDENTIFIER:
        raise TfliteError(f"{where} is not a .tflite file (no {IDENTIFIER.decode()} identifier)")
    walk.table(walk.target(0, "root offset"), "Model", 0)
    _check_indices(walk.buf, walk)


def read_tflite(path: str | Path) -> bytes:
    """The bytes of the .tflite file at `path`, verified (`verify`); TfliteError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise TfliteError(f"model file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TfliteError(f"cannot read model file {path}: {e.strerror}") from None
    verify(data, str(path))
    return data
