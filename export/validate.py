"""Validation of a converted file against the simulation it came from, with the real ai_edge_litert interpreter.

Two parts, both on the bytes before they are kept:

1. structure (`check_structure`): every conv / FC weight has the integer type, scales, zero-points (0) and codes
   of our weight quantizer, on the channel axis LiteRT expects (conv/FC: 0, depthwise [1, kh, kw, C]: 3); a
   weight stored sparse (CSR constant -> DENSIFY -> conv, export/sparse.py) is decoded from the file's tables
   here and compared the same way, its scales read where the conv reads them (the DENSIFY output); a 4-bit
   weight stored as packed INT4 (export/int4.py) is unpacked here and its codes compared the same way; biases
   hold our integers (int32; int64 with int16 activations) at s_in * s_w. What is expected is read from the
   quantizers' specs (quantize/spec.py), never restated here. An integer graph has no float tensor and no
   QUANTIZE, DEQUANTIZE or TRANSPOSE inside (edge ops allowed: the float-io QUANTIZE / DEQUANTIZE and the NCHW
   input TRANSPOSE); every activation tensor carries the scale and zero-point of one of our quantization points.
2. numerics (`run_file`, `compare_codes`): N images through the file and through the simulation; exact-match
   rate, largest difference in output LSBs and top-1 agreement, with XNNPACK (the default CPU path, which gates)
   and with the builtin kernels. For int8 graphs the reference is the integer simulation (`int_sim_outputs`,
   export/intsim.py: the runtime's own integer arithmetic, bit-exact with XNNPACK and with the builtin kernels,
   tests/test_export_intsim.py; under XNNPACK the layers whose INT4 weights leave the delegate, read from the file
   by `builtin_layers_of`, get the builtin arithmetic), and the float fake-quant simulation (`sim_outputs`) is
   reported beside it (it drifts by 1-2 LSB over a deep graph: rounding ties decided differently compound);
   int16 graphs are compared with the float simulation.

    gate (int8 graphs)       any output more than 1 LSB off the integer simulation, or top-1 agreement below 99.9%
    gate (int16 graphs)      the same against the float simulation, in int16 LSBs
    gate (float graphs)      max |file - simulation| above FLOAT_ATOL * max(1, max |simulation|), or agreement
                             below 99.9% (float32 sums in another order: ~1e-6 relative, 1e-4 leaves room)
    gate (dynamic range)     max |file - simulation| above a measured absolute tolerance (export/pipeline.py:
                             max_abs_dynamic), or agreement below 99.9%: the kernels pick each run-time input
                             code with their own last rounding, so a code at a tie moves by one
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from tqdm import tqdm
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from quantize.core import bias_scale, dequantize, quantize
from quantize.fakequant import FakeQuant
from quantize.qmodel import QMobileNet, qlayers, quant_points
from quantize.spec import tflite_weight_axis

from . import flatbuffer as fb
from . import int4
from .sparse import stored_weights

__all__ = ["interpreter", "check_structure", "run_file", "sim_outputs", "int_sim_outputs", "builtin_layers_of",
           "compare_codes", "compare_float",
           "MAX_LSB", "MIN_AGREEMENT", "FLOAT_ATOL", "RESOLVERS"]

MAX_LSB = 1               # output codes
MIN_AGREEMENT = 0.999     # top-1 of the file against top-1 of the simulation
FLOAT_ATOL = 1e-4         # relative to max(1, max |logit|)
RESOLVERS = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def interpreter(data: bytes, kernels: str = "xnnpack", threads: int = 1) -> Interpreter:
    it = Interpreter(model_content=data, experimental_op_resolver_type=RESOLVERS[kernels], num_threads=threads)
    it.allocate_tensors()
    return it


def _tflite_layout(a: np.ndarray, depthwise: bool) -> np.ndarray:
    """A PyTorch weight in the layout of the file: conv (O, I, kh, kw) -> (O, kh, kw, I); depthwise
    (C, 1, kh, kw) -> (1, kh, kw, C), so its channel axis is `tflite_weight_axis(True)`; linear unchanged."""
    if a.ndim != 4:
        return a
    return a.transpose(1, 2, 3, 0) if depthwise else a.transpose(0, 2, 3, 1)


def _our_layer_arrays(layer, kind: str) -> dict:
    """What the file must hold for `layer`, read from our model and the spec of each quantizer (quantize/spec.py):
    weight codes in LiteRT layout, their dtype, scales, zero-points and channel axis; for integer graphs the bias
    codes, their dtype and scale s_in * s_w."""
    with torch.no_grad():
        w, _ = layer.folded_weight_bias()
        out = {"depthwise": layer.is_depthwise}
        if layer.w_fq is None:    # float weights: float32, or half values stored as float16
            w = w.detach().half() if layer.w_half else w.detach().float()
            out["weight"] = _tflite_layout(w.numpy(), layer.is_depthwise)
            return out
        fq = layer.w_fq
        q = layer.weight_codes().numpy()
        out.update(scale=fq.scale.reshape(-1).float().numpy(), zero_point=fq.zero_point.reshape(-1).numpy(),
                   dtype=np.dtype(f"int{fq.spec.storage_bits}"), axis=tflite_weight_axis(layer.is_depthwise),
                   bits=fq.spec.bits)
        if kind in ("int8", "int16"):
            out["bias"] = layer.bias_codes().numpy()
            out["bias_dtype"] = np.dtype(f"int{layer.bias_spec.storage_bits}")
            out["bias_scale"] = bias_scale(layer.input_fq.scale, fq.scale).numpy()
    q = _tflite_layout(q, layer.is_depthwise)
    if q.ndim == 2 and kind in ("weight-only", "dynamic"):  # the classifier as a 1x1 conv: (O, I) -> (O, 1, 1, I)
        q = q.reshape(q.shape[0], 1, 1, q.shape[1])
    out["codes"] = q
    return out


def _act_qparams(qm: QMobileNet) -> set[tuple[float, int]]:
    return {(float(np.float32(fq.scale)), int(fq.zero_point)) for fq in quant_points(qm).values()
            if isinstance(fq, FakeQuant)}


class _File:
    """The interpreter's view of a file: tensors by index, ops, which op writes each tensor, graph io; and each
    conv / FC weight's values as stored (decoded from CSR when sparse: before a run a DENSIFY output is empty)."""

    def __init__(self, data: bytes):
        model = fb.read(data)
        self.stored = {w: (src, values) for w, src, values in stored_weights(model)}
        # the schema type of each tensor: the interpreter shows an INT4 tensor as int8 (numpy has no int4)
        self.int4 = {i for i, t in enumerate(model.subgraphs[0].tensors) if t.type == fb.TensorType.INT4}
        self.it = it = interpreter(data, "builtin")
        self.td = {d["index"]: d for d in it.get_tensor_details()}
        self.ops = it._get_ops_details()
        self.producer = {o: op for op in self.ops for o in op["outputs"]}
        self.inputs = {d["index"] for d in it.get_input_details()}
        self.outputs = {d["index"] for d in it.get_output_details()}


def _check_weight(f: _File, op: dict, name: str, ours: dict, kind: str) -> tuple[list[str], bool]:
    """The weight of one conv / FC op against ours: values (float files) or dtype, scales, zero-points, axis, codes.
    Returns (problems, whether the weight was compared: not when it has the wrong type)."""
    w_idx = op["inputs"][1]
    src, got = f.stored[w_idx]
    writer = f.producer[w_idx]["op_name"] if w_idx in f.producer else None
    wt = f.td[src if writer == "DEQUANTIZE" else w_idx]    # the tensor whose type and scales the kernel uses
    if writer == "DENSIFY" and f.td[src]["dtype"] != wt["dtype"]:
        return [f"{name}: sparse weight is {f.td[src]['dtype'].__name__}, its DENSIFY output "
                f"{wt['dtype'].__name__}"], False
    if "codes" not in ours:  # float weights (FP32, or fp16 behind a DEQUANTIZE)
        ref = ours["weight"]
        if got.dtype != ref.dtype:
            return [f"{name}: weight is {got.dtype.name}, not {ref.dtype.name}"], False
        if got.shape != ref.shape or not np.array_equal(got, ref):
            return [f"{name}: float weight differs from the model's folded weight"], True
        return [], True
    if wt["dtype"] != ours["dtype"]:
        return [f"{name}: weight is {wt['dtype'].__name__}, not {ours['dtype'].name}"], False
    if src in f.int4 and ours["bits"] > 4:
        return [f"{name}: weight stored as INT4, but its codes have {ours['bits']} bits"], False
    problems = []
    qp = wt["quantization_parameters"]
    if len(qp["scales"]) != len(ours["scale"]) or not np.array_equal(qp["scales"].astype(np.float32), ours["scale"]):
        problems.append(f"{name}: weight scales differ from ours (file {qp['scales'][:3]}..., "
                        f"ours {ours['scale'][:3]}...)")
    if len(qp["zero_points"]) != len(ours["zero_point"]) or np.any(qp["zero_points"] != ours["zero_point"]):
        problems.append(f"{name}: weight zero-points differ from ours (all {int(ours['zero_point'][0])})")
    if len(ours["scale"]) > 1 and qp["quantized_dimension"] != ours["axis"]:
        problems.append(f"{name}: weight quantized along dimension {qp['quantized_dimension']}, "
                        f"expected {ours['axis']}")
    if got.shape != ours["codes"].shape or not np.array_equal(got.astype(np.int64), ours["codes"]):
        problems.append(f"{name}: weight codes differ from ours (shape {got.shape} vs {ours['codes'].shape})")
    return problems, True


def _check_bias(f: _File, op: dict, name: str, ours: dict) -> list[str]:
    """The integer bias of one conv / FC op against ours: dtype, codes, scale s_in * s_w."""
    b_idx = op["inputs"][2] if len(op["inputs"]) > 2 else -1
    if b_idx < 0:
        return [f"{name}: the file has no bias but ours is non-zero"] if np.any(ours["bias"] != 0) else []
    problems = []
    bt = f.td[b_idx]
    if bt["dtype"] != ours["bias_dtype"]:
        problems.append(f"{name}: bias is {bt['dtype'].__name__}, expected {ours['bias_dtype'].name}")
    bias = f.it.get_tensor(b_idx).astype(np.int64)
    if bias.shape != ours["bias"].shape or not np.array_equal(bias, ours["bias"]):
        bad = int(np.sum(bias != ours["bias"])) if bias.shape == ours["bias"].shape else -1
        problems.append(f"{name}: bias integers differ from ours ({bad} of {len(ours['bias'])} channels)")
    bs = bt["quantization_parameters"]["scales"].astype(np.float64)
    if len(bs) != len(ours["bias_scale"]) or not np.allclose(bs, ours["bias_scale"], rtol=1e-6, atol=0):
        problems.append(f"{name}: bias scale is not s_in * s_w")
    return problems


def _check_ops(f: _File, int_graph: bool, float_io: bool, weight_dtypes: set,
               direct_weights: bool = False) -> tuple[list[str], list[str]]:
    """(problems, edge ops): no QUANTIZE, DEQUANTIZE or TRANSPOSE inside the graph, only at its edges; in a float
    graph, DEQUANTIZE only of weights stored as our weight specs say (none where `direct_weights`: a dynamic-range
    file's convs read their int8 weights themselves)."""
    problems, edge_ops = [], []
    for op in f.ops:
        n = op["op_name"]
        at_input = any(i in f.inputs for i in op["inputs"])
        at_output = any(o in f.outputs for o in op["outputs"])
        if n == "TRANSPOSE" and at_input:
            edge_ops.append(n)
        elif int_graph and ((n == "QUANTIZE" and at_input) or (n == "DEQUANTIZE" and at_output)) and float_io:
            edge_ops.append(n)
        elif n in ("QUANTIZE", "TRANSPOSE") or (n == "DEQUANTIZE" and (int_graph or direct_weights)):
            problems.append(f"op {op['index']} {n} inside the graph")
        elif n == "DEQUANTIZE" and np.dtype(f.td[op["inputs"][0]]["dtype"]) not in weight_dtypes:
            problems.append(f"op {op['index']} DEQUANTIZE of a {f.td[op['inputs'][0]]['dtype'].__name__} tensor")
        elif n == "DENSIFY" and not set(op["outputs"]) <= set(f.stored):
            problems.append(f"op {op['index']} DENSIFY that writes no conv weight")
    return problems, edge_ops


def _check_activations(f: _File, qm: QMobileNet, float_io: bool) -> list[str]:
    """An integer graph: no float tensor but the float-io edges; every activation of the spec's integer type
    carries the scale and zero-point of one of our quantization points."""
    problems = []
    ours_act = _act_qparams(qm)
    act_dt = np.dtype(f"int{qm.quant_in.spec.storage_bits}")
    edge = set()
    for op in f.ops:
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE") and float_io:
            edge |= {i for i in list(op["inputs"]) + list(op["outputs"]) if f.td[i]["dtype"] == np.float32}
    for i, d in f.td.items():
        if d["dtype"] == np.float32 and i not in edge:
            problems.append(f"float tensor {d['name']!r} in an integer graph")
    weights = set(f.stored)          # DENSIFY outputs: weights, checked with their per-channel scales in _check_weight
    for i in ({o for op in f.ops for o in op["outputs"]} | f.inputs) - weights:
        d = f.td[i]
        if d["dtype"] != act_dt:
            continue
        s, z = d["quantization_parameters"]["scales"], d["quantization_parameters"]["zero_points"]
        if len(s) != 1 or (float(np.float32(s[0])), int(z[0])) not in ours_act:
            problems.append(f"activation {d['name']!r} has qparams {s}, {z} that none of ours has")
    return problems


def check_structure(data: bytes, qm: QMobileNet, kind: str, float_io: bool) -> tuple[list[str], dict]:
    """Problems found (empty when the file is what we meant) and a summary of what was checked."""
    f = _File(data)
    problems: list[str] = []
    layers = list(qlayers(qm).items())
    weighted = [op for op in f.ops if op["op_name"] in _WEIGHTED]
    if len(weighted) != len(layers):
        problems.append(f"{len(weighted)} conv/FC ops in the file, {len(layers)} layers in the model")
    int_graph = kind in ("int8", "int16")
    checked_w = checked_b = 0
    for op, (name, layer) in zip(weighted, layers):
        ours = _our_layer_arrays(layer, kind)
        found, compared = _check_weight(f, op, name, ours, kind)
        problems += found
        if not compared:  # a weight of the wrong type: its bias is not worth comparing
            continue
        checked_w += 1
        if int_graph:
            problems += _check_bias(f, op, name, ours)
            checked_b += 1
    weight_dtypes = {np.dtype(f"int{layer.w_fq.spec.storage_bits}") if layer.w_fq is not None else np.dtype(np.float16)
                     for _, layer in layers if layer.w_fq is not None or layer.w_half}
    op_problems, edge_ops = _check_ops(f, int_graph, float_io, weight_dtypes, direct_weights=kind == "dynamic")
    problems += op_problems
    if kind == "dynamic":   # a hybrid kernel: float input, int8 weight (checked above), float output
        problems += [f"op {op['index']} {op['op_name']}: input is {f.td[op['inputs'][0]]['dtype'].__name__}, "
                     "not float32" for op in weighted if f.td[op["inputs"][0]]["dtype"] != np.float32]
    if int_graph:
        problems += _check_activations(f, qm, float_io)
    summary = {"weights_checked": checked_w, "biases_checked": checked_b, "edge_ops": edge_ops,
               "layers": len(layers), "sparse_weights": sum(op["op_name"] == "DENSIFY" for op in f.ops),
               "int4_weights": sum(src in f.int4 for src, _ in f.stored.values())}
    return problems, summary


def _io_codes(x: torch.Tensor, fq) -> torch.Tensor:
    return quantize(x, fq.scale, fq.zero_point, fq.spec.qmin, fq.spec.qmax)


@torch.no_grad()
def sim_outputs(qm: QMobileNet, images: torch.Tensor, int_out: bool, batch: int = 250) -> torch.Tensor:
    """The simulation's outputs over float images (N, 3, H, W): int64 codes of the output quantizer, or float.

    Integer graphs: the simulation is evaluated in float64 on exactly the input codes the file gets (dequantized),
    so that float32 rounding inside our own convolutions (about 1e-7 relative, which flips a code now and then)
    does not count against the file; the quantization rules, scales and integer biases are the simulation's own.
    """
    if int_out:
        fq = qm.quant_in
        images = dequantize(_io_codes(images, fq), fq.scale, fq.zero_point).double()
        qm = copy.deepcopy(qm).double()
    outs = [qm(images[i:i + batch]) for i in tqdm(range(0, len(images), batch), desc="float simulation",
                                                  unit="batch", leave=False, disable=None, mininterval=1.0)]
    y = torch.cat(outs)
    if int_out:
        return _io_codes(y, qm.classifier.out_fq).to(torch.int64)
    return y.float()


def int_sim_outputs(qm: QMobileNet, images: torch.Tensor, kernels: str = "xnnpack",
                    builtin_layers=()) -> torch.Tensor:
    """The integer simulation's output codes (int64) of an int8 graph: what `kernels` computes, bit for bit;
    `builtin_layers` (names) run on the builtin kernels whatever `kernels` says (`builtin_layers_of`)."""
    from .intsim import int_outputs
    return int_outputs(qm, images, kernels, builtin_layers=builtin_layers)


def builtin_layers_of(data: bytes, qm: QMobileNet) -> set[str]:
    """The layers of the int8 file `data` that run on builtin kernels under the XNNPACK delegate, read from the
    file (their INT4 weights: export/int4.py)."""
    return int4.builtin_layers(fb.read(data), list(qlayers(qm)))


def run_file(data: bytes, qm: QMobileNet, images: torch.Tensor, *, kernels: str = "xnnpack",
             int_out: bool = True, nhwc: bool = False) -> torch.Tensor:
    """The file's outputs, one image at a time (batch 1): int64 codes (integer graphs) or float."""
    it = interpreter(data, kernels)
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    in_dtype = inp["dtype"]
    res = []
    for i in tqdm(range(len(images)), desc=f"file ({kernels})", unit="img", leave=False, disable=None,
                  mininterval=1.0):
        x = images[i:i + 1]
        if in_dtype != np.float32:  # integer input: the input quantizer's codes
            x = _io_codes(x, qm.quant_in)
        if nhwc:
            x = x.permute(0, 2, 3, 1)
        it.set_tensor(inp["index"], np.ascontiguousarray(x.numpy().astype(in_dtype)))
        it.invoke()
        res.append(torch.from_numpy(it.get_tensor(outp["index"]).copy()))
    y = torch.cat(res)
    if int_out:
        if y.dtype.is_floating_point:  # float io on an integer graph: back to codes, exactly
            return _io_codes(y, qm.classifier.out_fq).to(torch.int64)
        return y.to(torch.int64)
    return y.float()


def _top1(sim: torch.Tensor, got: torch.Tensor, labels: torch.Tensor | None) -> dict:
    out = {"agreement": (sim.argmax(1) == got.argmax(1)).double().mean().item()}
    if labels is not None:
        out["acc_sim"] = (sim.argmax(1) == labels).double().mean().item()
        out["acc_file"] = (got.argmax(1) == labels).double().mean().item()
    return out


def compare_codes(sim: torch.Tensor, got: torch.Tensor, labels: torch.Tensor | None = None,
                  max_lsb: int = MAX_LSB) -> dict:
    diff = (sim - got).abs()
    out = {"n": len(sim), "exact_outputs": (diff == 0).double().mean().item(),
           "exact_images": (diff.amax(1) == 0).double().mean().item(), "max_lsb": int(diff.max()),
           "mean_lsb": diff.double().mean().item(),
           "lsb_histogram": {int(k): int(v) for k, v in zip(*torch.unique(diff, return_counts=True))},
           "images_over_limit": int((diff.amax(1) > max_lsb).sum())}
    out.update(_top1(sim, got, labels))
    out["passed"] = out["max_lsb"] <= max_lsb and out["agreement"] >= MIN_AGREEMENT
    return out


def compare_float(sim: torch.Tensor, got: torch.Tensor, labels: torch.Tensor | None = None,
                  atol: float | None = None) -> dict:
    """Float outputs against the simulation's: passed when max |diff| <= atol (default FLOAT_ATOL * max(1,
    max |simulation|)) and top-1 agreement >= MIN_AGREEMENT."""
    diff = (sim - got).abs()
    tol = FLOAT_ATOL * max(1.0, float(sim.abs().max())) if atol is None else float(atol)
    out = {"n": len(sim), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "atol": tol}
    out.update(_top1(sim, got, labels))
    out["passed"] = out["max_abs_diff"] <= tol and out["agreement"] >= MIN_AGREEMENT
    return out
