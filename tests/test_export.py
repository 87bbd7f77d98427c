"""Export of a tiny MobileNetV2 (width 0.25, 32x32) to LiteRT, checked with the real ai_edge_litert interpreter.

Each litert-torch conversion takes ~15-30 s on the shared CPU, so the exported files are made once per module.
Validation runs VAL images (a few dozen real CIFAR-10 test images): the gate itself (<= 1 LSB, >= 99.9 %
agreement) is the command's, the count only keeps the suite fast.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import CIFAR_TGZ, tiny_config

VAL = "48"


def _run(argv):
    from export.__main__ import main
    return main(argv)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_w8a8):
    """FP32, W8A8, pruned W8A8 (half of every conv's weights zero), W8A32, W8A16 and W4A8 checkpoints of one
    tiny model whose BN statistics come from real images (so activations look like a trained net's); its FP32
    and W8A8 checkpoints are the session's `tiny_w8a8`."""
    from mobilenet import build_model
    from quantize import calibrate, freeze, prepare, recipe
    from quantize.io import save_quantized
    d = tmp_path_factory.mktemp("export")
    m, xs = tiny_w8a8["model"], tiny_w8a8["calib"]
    out = {"dir": d, "model": m, "fp32": tiny_w8a8["fp32"], "W8A8": tiny_w8a8["W8A8"], "W8A8_qm": tiny_w8a8["qm"],
           "calib": xs}

    def quantized(name, model, tag):
        qm = prepare(model, recipe(name))
        calibrate(qm, xs)
        freeze(qm)
        out[tag] = d / f"{tag}.pt"
        save_quantized(out[tag], qm, {"source_checkpoint": str(out["fp32"])})
        out[tag + "_qm"] = qm

    for name in ("W8A32", "W8A16", "W4A8", "W16A32"):
        quantized(name, m, name)
    qm = prepare(m, recipe("W16A32", w_format="int"))        # int16 codes: no LiteRT storage
    freeze(qm)
    out["W16A32 int"] = d / "w16a32_int.pt"
    save_quantized(out["W16A32 int"], qm)
    pruned = build_model(tiny_config()).eval()
    pruned.load_state_dict(m.state_dict())
    with torch.no_grad():
        for mod in pruned.modules():
            if isinstance(mod, torch.nn.Conv2d) and mod.groups == 1:
                w = mod.weight
                w[w.abs() <= w.abs().flatten().median()] = 0.0
    out["pruned_model"] = pruned
    quantized("W8A8", pruned, "pruned")
    return out


@pytest.fixture(scope="module")
def w8a8(tiny_w8a8):
    """The W8A8 file `python -m export` wrote (the session's `tiny_w8a8`), and its report."""
    return tiny_w8a8["tflite"], tiny_w8a8["report"]


def _interp(path, builtin=True):
    from export.validate import interpreter
    return interpreter(path.read_bytes(), "builtin" if builtin else "xnnpack")


def test_int8_file_is_ours(w8a8, ckpts):
    path, rep = w8a8
    qm = ckpts["W8A8_qm"]
    assert rep["validation"]["passed"] and rep["validation"]["structure_problems"] == []
    it = _interp(path)
    ops = [op["op_name"] for op in it._get_ops_details()]
    n_res = sum(1 for m in qm.features if hasattr(m, "use_res_connect") and m.use_res_connect)
    assert ops.count("CONV_2D") == 35 and ops.count("DEPTHWISE_CONV_2D") == 17
    assert ops.count("ADD") == n_res and ops.count("MEAN") == 1 and ops.count("FULLY_CONNECTED") == 1
    assert not {"QUANTIZE", "DEQUANTIZE"} & set(ops)
    assert ops.count("TRANSPOSE") == 1 and ops[0] == "TRANSPOSE"  # NCHW input: the layout change at the edge
    td = it.get_tensor_details()
    assert not [d["name"] for d in td if d["dtype"] == np.float32]
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.int8 and list(inp["shape"]) == [1, 3, 32, 32]
    # exactly our scales at the edges (float32 equality, not closeness)
    assert np.float32(inp["quantization"][0]) == np.float32(qm.quant_in.scale)
    assert inp["quantization"][1] == int(qm.quant_in.zero_point)
    assert np.float32(out["quantization"][0]) == np.float32(qm.classifier.out_fq.scale)
    # depthwise weights: [1, kh, kw, C] quantized along dimension 3
    ops_d = it._get_ops_details()
    dw = next(op for op in ops_d if op["op_name"] == "DEPTHWISE_CONV_2D")
    wd = next(d for d in td if d["index"] == dw["inputs"][1])
    assert wd["shape"][0] == 1 and wd["quantization_parameters"]["quantized_dimension"] == 3
    conv = next(op for op in ops_d if op["op_name"] == "CONV_2D")
    assert next(d for d in td if d["index"] == conv["inputs"][2])["dtype"] == np.int32
    x = rep["validation"]["runs"]["xnnpack"]
    assert x["max_lsb"] <= 1 and x["agreement"] >= 0.999 and x["n"] == int(VAL)
    assert "builtin" in rep["validation"]["runs"]
    assert rep["graph"]["batch"] == 1
    assert rep["file_summary"]["size_bytes"] == path.stat().st_size
    umask = os.umask(0)
    os.umask(umask)
    for f in (path, path.parent / (path.name + ".json")):      # what a plain open() gives, not mkstemp's 0600
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_outputs_match_simulation(w8a8, ckpts, cifar_small):
    """The file's int8 output against the simulation's output codes, run here independently of the command."""
    from export.validate import compare_codes, run_file, sim_outputs
    from mobilenet.data import BatchLoader
    path, _ = w8a8
    qm = ckpts["W8A8_qm"]
    x, y = next(iter(BatchLoader(cifar_small.test.subset(torch.arange(16)), 16)))
    got = run_file(path.read_bytes(), qm, x, kernels="xnnpack")
    r = compare_codes(sim_outputs(qm, x, True), got, y)
    assert r["max_lsb"] <= 1 and r["agreement"] == 1.0


def test_zero_points_are_stored_once(w8a8, cifar_small):
    """fb.write shares identical vectors: every per-channel zero-point vector of one length sits at one offset, and
    the file is smaller than the same tables packed one vector each (TensorFlow's way) by at least 8 bytes for each
    int64 zero-point not written again, with the same outputs under both kernel sets."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu
    from export.validate import interpreter
    from mobilenet.data import BatchLoader
    path, _ = w8a8
    data = path.read_bytes()
    root = schema.Model.GetRootAs(data, 0)
    sg = root.Subgraphs(0)
    where: dict[int, set] = {}
    repeats = 0
    for i in range(sg.TensorsLength()):
        q = sg.Tensors(i).Quantization()
        if q is None or q.ZeroPointLength() < 2:
            continue
        o = q._tab.Offset(10)                               # zero_point: the fourth field (vtable slot 10)
        where.setdefault(q.ZeroPointLength(), set()).add(q._tab.Vector(o))
        repeats += 1
    assert where and all(len(positions) == 1 for positions in where.values()), where
    unshared = bytes(fbu.convert_object_to_bytearray(fbu.read_model_from_bytearray(bytearray(data))))
    assert len(unshared) - len(data) >= 8 * (repeats - len(where))
    x, _ = next(iter(BatchLoader(cifar_small.test.subset(torch.arange(8)), 8)))
    codes = torch.clamp(torch.round(x * 40), -128, 127).to(torch.int8).numpy()
    for kernels in ("xnnpack", "builtin"):
        outs = []
        for blob in (data, unshared):
            it = interpreter(blob, kernels)
            i, o = it.get_input_details()[0], it.get_output_details()[0]
            outs.append([(it.set_tensor(i["index"], c[None]), it.invoke(), it.get_tensor(o["index"]).copy())[2]
                         for c in codes])
        assert np.array_equal(np.stack(outs[0]), np.stack(outs[1])), kernels


def test_corrupted_scale_is_caught(w8a8, ckpts, tmp_path, monkeypatch, capsys):
    """One weight scale nudged by one float32 ulp in the flatbuffer: validation refuses and keeps no file."""
    from export import flatbuffer as fb
    import export.pipeline as pipeline
    from export.validate import check_structure
    path, _ = w8a8
    model = fb.read(path.read_bytes())
    sg = model.subgraphs[0]
    op = next(o for o in sg.operators if fb.op_name(model, o) == "CONV_2D")
    q = sg.tensors[op.inputs[1]].quantization
    q.scale = np.array(q.scale, dtype=np.float32)
    q.scale[0] = np.nextafter(q.scale[0], np.float32(1))
    bad = fb.write(model)
    problems, _ = check_structure(bad, ckpts["W8A8_qm"], "int8", False)
    assert any("weight scales differ" in p for p in problems)

    monkeypatch.setattr(pipeline, "convert", lambda qm, kind, **kw: (bad, {"batch": 1}))
    out = tmp_path / "bad.tflite"
    rc = _run(["--checkpoint", str(ckpts["W8A8"]), "--out", str(out), "--val-images", "4",
               "--data", str(CIFAR_TGZ), "--skip-builtin"])
    assert rc == 1
    assert "weight scales differ" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.tmp")) and not (tmp_path / "bad.tflite.json").exists()


@pytest.fixture(scope="module")
def fp32_file(ckpts, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "fp32.tflite"
    rc = _run(["--checkpoint", str(ckpts["fp32"]), "--out", str(path), "--val-images", "16",
               "--data", str(CIFAR_TGZ), "--skip-builtin"])
    assert rc == 0
    return path


def test_fp32_export_matches_pytorch(ckpts, fp32_file):
    from export.validate import interpreter
    path = fp32_file
    it = interpreter(path.read_bytes(), "xnnpack")
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.float32
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = ckpts["model"](x)
    for i in range(4):
        it.set_tensor(inp["index"], x[i:i + 1].numpy())
        it.invoke()
        # float32 sums in another order over 52 layers: 1e-5 relative to the logit scale
        assert np.abs(it.get_tensor(out["index"]) - ref[i:i + 1].numpy()).max() <= 1e-5 * max(1.0, ref.abs().max())


def test_aeq_peer_beside_ours(ckpts, fp32_file, w8a8, cifar_small, tmp_path):
    """bench.peers with the real ai-edge-quantizer: its static_wi8_ai8 file made from our FP32 file and the same
    calibration images, both files run by one function (file_logits), the pair written once and not redone."""
    import csv
    from bench.peers import _aeq_file, file_logits, run_peers
    from export.validate import interpreter, run_file
    from mobilenet.data import BatchLoader
    from mobilenet.engine import predict
    from quantize.core import dequantize
    split = cifar_small.test.subset(torch.arange(0, 256, 8))                       # 32 images, every class
    ref = predict(ckpts["model"], split, "cifar", disable_bar=True)
    calib = torch.cat(ckpts["calib"])[:32]
    qm = ckpts["W8A8_qm"]
    # the integer-io path of file_logits is the validated file run, dequantized: exactly
    xs, _ = next(iter(BatchLoader(split, len(split), "cifar")))
    fq = qm.classifier.out_fq
    codes = run_file(w8a8[0].read_bytes(), qm, xs)
    assert torch.equal(file_logits(w8a8[0], split, "cifar"), dequantize(codes, fq.scale, fq.zero_point).float())
    csv_path = run_peers([(qm.qcfg, "W8A8 per-channel real rtn", str(w8a8[0]))], str(fp32_file), calib, split,
                         ref, "cifar", tmp_path, host_runs=3, rounds=2)
    rows = list(csv.DictReader(open(csv_path)))
    assert [(r["config"], r["aeq_recipe"], r["eval_images"]) for r in rows] == \
           [("W8A8 per-channel real rtn", "static_wi8_ai8", "32")]
    r = rows[0]
    assert int(r["ours_bytes"]) == w8a8[0].stat().st_size and int(r["aeq_bytes"]) > 0
    assert float(r["ours_host_ms"]) > 0 and float(r["aeq_host_ms"]) > 0 and r["snr_goal"] in ("met", "missed")
    aeq = tmp_path / "peers" / "w8a8_aeq.tflite"
    mtime = aeq.stat().st_mtime_ns
    run_peers([(qm.qcfg, "W8A8 per-channel real rtn", str(w8a8[0]))], str(fp32_file), calib, split, ref, "cifar",
              tmp_path, host_runs=3, rounds=2)
    assert aeq.stat().st_mtime_ns == mtime                                          # resumed: not made again
    # another row of ours meeting the same recipe (an AdaRound row, say) reuses AEQ's file
    run_peers([(qm.qcfg, "W8A8 another row", str(w8a8[0]))], str(fp32_file), calib, split, ref, "cifar",
              tmp_path, host_runs=3, rounds=2)
    again = {r["config"]: r for r in csv.DictReader(open(csv_path))}["W8A8 another row"]
    assert again["aeq_file"] == str(aeq) and aeq.stat().st_mtime_ns == mtime
    assert again["aeq_snr_db"] == r["aeq_snr_db"]
    # static_wi4_ai8, which AEQ 0.10.0 does not name: its int8 recipe with 4-bit weights. Its policy packs the
    # convs and the FC to INT4 and leaves the 17 depthwise convs float, which the report says beside the pair
    from bench.peers import peer_recipe, weights_text
    from quantize.config import recipe
    assert peer_recipe(recipe("W4A8"), "rtn") == peer_recipe(recipe("W4A8"), "adaround") == "static_wi4_ai8"
    assert peer_recipe(recipe("W4A8", granularity="per-tensor"), "rtn") is None
    w4 = tmp_path / "w4a8_aeq.tflite"
    w4.write_bytes(_aeq_file(fp32_file, "static_wi4_ai8", calib))
    assert weights_text(w4) == "CONV_2D INT4 ×35, DEPTHWISE_CONV_2D FLOAT32 ×17, FULLY_CONNECTED INT4 ×1"
    # AEQ's fp16 recipe stores every conv / FC weight as float16, like ours
    it = interpreter(_aeq_file(fp32_file, "fp16 float casting", None))
    kinds = [d["dtype"] for d in it.get_tensor_details()]
    assert sum(k == np.float16 for k in kinds) == 53


def test_pruned_zeros_stay_zeros_float_io_nhwc(ckpts, w8a8, tmp_path):
    path = tmp_path / "pruned.tflite"
    rc = _run(["--checkpoint", str(ckpts["pruned"]), "--out", str(path), "--val-images", VAL,
               "--data", str(CIFAR_TGZ), "--float-io", "--nhwc", "--compare-to", str(w8a8[0]), "--skip-builtin"])
    assert rc == 0
    rep = json.loads((tmp_path / "pruned.tflite.json").read_text())
    w = rep["weights"]
    assert w["zeros_match"] and w["zero_weights_file"] >= w["pruned_zeros_ours"] > 0
    assert rep["compare_to"]["gzip_ratio"] < 0.85  # half the pointwise weights are zero
    assert rep["validation"]["structure"]["edge_ops"] == ["QUANTIZE", "DEQUANTIZE"]
    it = _interp(path)
    inp = it.get_input_details()[0]
    assert inp["dtype"] == np.float32 and list(inp["shape"]) == [1, 32, 32, 3]
    ops = [op["op_name"] for op in it._get_ops_details()]
    assert ops[0] == "QUANTIZE" and ops[-1] == "DEQUANTIZE" and "TRANSPOSE" not in ops


def test_weight_only_w8a32(ckpts, tmp_path):
    path = tmp_path / "w8a32.tflite"
    rc = _run(["--checkpoint", str(ckpts["W8A32"]), "--out", str(path), "--val-images", "16",
               "--data", str(CIFAR_TGZ), "--skip-builtin"])
    assert rc == 0
    rep = json.loads((tmp_path / "w8a32.tflite.json").read_text())
    assert rep["validation"]["structure"]["weights_checked"] == 53   # the classifier's weight included
    assert rep["file_summary"]["constant_tensor_types"]["int8"] == 53


def test_w16a32_fp16_weights(ckpts, tmp_path):
    """W16A32 is LiteRT's 16-bit weight format: every conv / FC weight stored as float16 (the simulation's
    half-rounded folded weight, compared value for value) behind a DEQUANTIZE, float compute; validated against
    the simulation with the float gate, by XNNPACK and the builtin kernels."""
    from quantize.qmodel import qlayers
    path = tmp_path / "w16a32.tflite"
    rc = _run(["--checkpoint", str(ckpts["W16A32"]), "--out", str(path), "--val-images", "16",
               "--data", str(CIFAR_TGZ)])
    assert rc == 0
    rep = json.loads((tmp_path / "w16a32.tflite.json").read_text())
    assert rep["export_kind"] == "fp16" and rep["graph"]["weights_stored_fp16"] == 53
    v = rep["validation"]
    assert v["passed"] and v["structure"]["weights_checked"] == 53 and not v["structure_problems"]
    assert v["runs"]["builtin"]["passed"] and v["runs"]["xnnpack"]["agreement"] == 1.0
    assert rep["file_summary"]["constant_tensor_types"]["float16"] == 53
    n_weights = sum(layer.op.weight.numel() for layer in qlayers(ckpts["W16A32_qm"]).values())
    assert path.stat().st_size < 4 * n_weights      # smaller than the float32 weights alone


def test_w8a16_static_int16(ckpts, tmp_path):
    path = tmp_path / "w8a16.tflite"
    rc = _run(["--checkpoint", str(ckpts["W8A16"]), "--out", str(path), "--val-images", "16",
               "--calib-images", "64", "--data", str(CIFAR_TGZ), "--skip-builtin"])
    assert rc == 0
    rep = json.loads((tmp_path / "w8a16.tflite.json").read_text())
    assert "STATIC" in rep["activations"]
    assert rep["graph"]["biases_rewritten_int64"] >= 52  # the converter may leave out the all-zero classifier bias
    assert rep["file_summary"]["input"]["dtype"] == "int16"
    assert "agreement_with_dynamic_sim" in rep["validation"]
    assert rep["validation"]["runs"]["xnnpack"]["max_lsb"] <= 8  # int16 LSBs


def test_w4a8_stored_as_int8_is_exact(ckpts, tmp_path):
    """--w4-storage int8: 4-bit codes in int8 tensors, every one in [-7, 7], each output channel reaching +-7 (its
    min-max scale puts its largest weight there), the depthwise convs' 8-bit codes reaching +-127 (the recipe
    keeps them at 8 bits); the file validated bit for bit against the integer simulation
    with XNNPACK and with the builtin kernels."""
    path = tmp_path / "w4a8.tflite"
    rc = _run(["--checkpoint", str(ckpts["W4A8"]), "--out", str(path), "--val-images", VAL,
               "--data", str(CIFAR_TGZ), "--w4-storage", "int8"])
    assert rc == 0
    rep = json.loads((tmp_path / "w4a8.tflite.json").read_text())
    v = rep["validation"]
    assert rep["export_kind"] == "int8" and v["passed"] and v["structure_problems"] == []
    assert v["structure"]["weights_checked"] == v["structure"]["biases_checked"] == 53
    for kernels in ("xnnpack", "builtin"):
        r = v["runs"][kernels]
        assert r["reference"] == f"integer simulation ({kernels} arithmetic)"
        assert r["max_lsb"] == 0 and r["exact_outputs"] == 1.0 and r["n"] == int(VAL)
    it = _interp(path)
    for op in it._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        w = it.get_tensor(op["inputs"][1])
        axis = 3 if op["op_name"] == "DEPTHWISE_CONV_2D" else 0
        per_channel = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.int64)).max(1)
        top = 127 if op["op_name"] == "DEPTHWISE_CONV_2D" else 7
        assert w.dtype == np.int8 and np.all(per_channel == top), op["op_name"]


@pytest.mark.parametrize("tag,argv,needle,code", [
    ("missing", [], "not found", 2),                  # an unusable input: 2, as every command
    ("fp32", ["--config", "W8A8"], "FP32 model", 2),  # a refused export is the user's to change: 2 as well
    ("W4A8", ["--w4-storage", "int2"], "instead of 'int2'", 2),   # (only a failed validation exits with 1)
    ("W16A32 int", [], "no int16 weight path", 2),
])
def test_bad_inputs(ckpts, tmp_path, capsys, tag, argv, needle, code):
    ckpt = str(tmp_path / "nope.pt") if tag == "missing" else str(ckpts[tag])
    out = tmp_path / "x.tflite"
    rc = _run(["--checkpoint", ckpt, "--out", str(out), "--data", str(CIFAR_TGZ)] + argv)
    assert rc == code
    assert needle in capsys.readouterr().err
    assert not out.exists()
