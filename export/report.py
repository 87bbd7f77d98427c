"""What a .tflite file holds, for the JSON report written beside it: sizes, ops, tensor types, zero weights."""
from __future__ import annotations

import gzip
from collections import Counter

import numpy as np
import torch

from quantize.qmodel import QMobileNet, qlayers

from .validate import interpreter

__all__ = ["file_summary", "gzip_size", "zero_weights"]

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def gzip_size(data: bytes) -> int:
    """Bytes after gzip -9: what the file costs in an app download, and where zero weights show up."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def file_summary(data: bytes) -> dict:
    """Size, gzip size, op counts (in graph order of first appearance), and tensor dtypes split into constants
    (weights, biases, shapes) and activations (everything an op writes, plus the inputs)."""
    it = interpreter(data, "builtin")
    ops = it._get_ops_details()
    td = {d["index"]: d for d in it.get_tensor_details()}
    written = {o for op in ops for o in op["outputs"]} | {d["index"] for d in it.get_input_details()}
    const_types = Counter(td[i]["dtype"].__name__ for i in td if i not in written)
    act_types = Counter(td[i]["dtype"].__name__ for i in td if i in written)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    return {
        "size_bytes": len(data),
        "gzip_bytes": gzip_size(data),
        "ops": dict(Counter(op["op_name"] for op in ops)),
        "n_ops": len(ops),
        "constant_tensor_types": dict(const_types),
        "activation_tensor_types": dict(act_types),
        "input": {"dtype": inp["dtype"].__name__, "shape": inp["shape"].tolist(),
                  "scale": float(inp["quantization"][0]), "zero_point": int(inp["quantization"][1])},
        "output": {"dtype": out["dtype"].__name__, "shape": out["shape"].tolist(),
                   "scale": float(out["quantization"][0]), "zero_point": int(out["quantization"][1])},
    }


def _weight_tensors(it) -> list[np.ndarray]:
    ops = it._get_ops_details()
    producer = {o: op for op in ops for o in op["outputs"]}
    out = []
    for op in ops:
        if op["op_name"] in _WEIGHTED:
            w = op["inputs"][1]
            if w in producer and producer[w]["op_name"] == "DEQUANTIZE":
                w = producer[w]["inputs"][0]
            out.append(it.get_tensor(w))
    return out


@torch.no_grad()
def zero_weights(data: bytes, qm: QMobileNet) -> dict:
    """Zero weights in the file against ours: exact zeros of the folded float weights (pruned), and zero codes.
    Pruned zeros must stay zeros: every zero float weight must be a zero in the file."""
    it = interpreter(data, "builtin")
    file_w = _weight_tensors(it)
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
