"""What a .tflite file holds, for the JSON report written beside it: sizes, ops, tensor types, zero weights."""
from __future__ import annotations

import gzip
from collections import Counter

import torch

from quantize.qmodel import QMobileNet, qlayers

from . import flatbuffer as fb
from .sparse import stored_weights
from .validate import interpreter

__all__ = ["file_summary", "gzip_size", "zero_weights"]


def gzip_size(data: bytes) -> int:
    """Bytes after gzip -9: what the file costs in an app download, and where zero weights show up."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def file_summary(data: bytes) -> dict:
    """Size, gzip size, op counts (in graph order of first appearance), and tensor dtypes split into constants
    (weights, biases, shapes; packed INT4 weights as int4) and activations (everything an op writes, plus the
    inputs). A sparse weight counts once, as the constant its DENSIFY op writes."""
    it = interpreter(data, "builtin")
    ops = it._get_ops_details()
    td = {d["index"]: d for d in it.get_tensor_details()}
    densify = [op for op in ops if op["op_name"] == "DENSIFY"]
    sparse_in = {i for op in densify for i in op["inputs"]}
    written = {o for op in ops if op["op_name"] != "DENSIFY" for o in op["outputs"]} | \
        {d["index"] for d in it.get_input_details()}
    # the interpreter shows a packed INT4 tensor as int8 (numpy has no int4): its type is read from the schema
    int4 = {i for i, t in enumerate(fb.read(data).subgraphs[0].tensors) if t.type == fb.TensorType.INT4}
    const_types = Counter("int4" if i in int4 else td[i]["dtype"].__name__
                          for i in td if i not in written and i not in sparse_in)
    act_types = Counter(td[i]["dtype"].__name__ for i in td if i in written)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    return {
        "size_bytes": len(data),
        "gzip_bytes": gzip_size(data),
        "ops": dict(Counter(op["op_name"] for op in ops)),
        "n_ops": len(ops),
        "sparse_weights": len(densify),
        "constant_tensor_types": dict(const_types),
        "activation_tensor_types": dict(act_types),
        "input": {"dtype": inp["dtype"].__name__, "shape": inp["shape"].tolist(),
                  "scale": float(inp["quantization"][0]), "zero_point": int(inp["quantization"][1])},
        "output": {"dtype": out["dtype"].__name__, "shape": out["shape"].tolist(),
                   "scale": float(out["quantization"][0]), "zero_point": int(out["quantization"][1])},
    }


@torch.no_grad()
def zero_weights(data: bytes, qm: QMobileNet) -> dict:
    """Zero weights in the file against ours: exact zeros of the folded float weights (pruned), and zero codes.
    Pruned zeros must stay zeros: every zero float weight must be a zero in the file."""
    file_w = [values for _, _, values in stored_weights(fb.read(data))]   # sparse ones decoded from CSR
    file_zeros = int(sum(int((w == 0).sum()) for w in file_w))
    total = int(sum(w.size for w in file_w))
    ours_codes = ours_float = 0
    for layer in qlayers(qm).values():
        w, _ = layer.folded_weight_bias()
        ours_float += int((w == 0).sum())
        ours_codes += int((layer.quant_weight(w) == 0).sum())
    return {"weights": total, "zero_weights_file": file_zeros, "zero_weights_ours": ours_codes,
            "pruned_zeros_ours": ours_float, "zeros_match": file_zeros == ours_codes,
            "zero_fraction_file": file_zeros / max(total, 1)}
