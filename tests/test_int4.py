"""Packed INT4 weights (export/int4.py): the nibble packing, tiny W4A8 and W4A32 files exported packed and run by the
real ai_edge_litert interpreter against the simulation of the kernels that run them, and the checks that catch a
corrupted nibble.

Time: one litert-torch conversion per config (~15-25 s each on the shared CPU); the int8-stored W4A8 file comes
from the same cached conversion with the int8 edit, so its size is compared with no third conversion.
"""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from conftest import CIFAR_TGZ
from export import flatbuffer as fb
from export import int4

VAL = "16"
WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def test_pack_golden():
    """Hand-packed bytes: first code in the low nibble, two's complement, an odd count padded with a zero nibble."""
    codes = np.arange(-8, 8)                                   # -8 .. 7: every nibble
    packed = int4.pack(codes)
    assert packed.tolist() == [0x98, 0xBA, 0xDC, 0xFE, 0x10, 0x32, 0x54, 0x76]
    assert np.array_equal(int4.unpack(packed, 16), codes)
    odd = np.array([1, -1, 7, -7, 0])                          # the 4-bit weight range [-7, 7], odd length
    assert int4.pack(odd).tolist() == [0xF1, 0x97, 0x00]
    assert int4.unpack(int4.pack(odd), 5).tolist() == odd.tolist()
    w = np.array([[[-7, 3, 0]], [[5, -2, 7]]])                 # a (2, 1, 3) weight: flattened row-major
    assert int4.pack(w).tolist() == [0x39, 0x50, 0x7E]
    with pytest.raises(ValueError, match=r"\[-8, 7\], not \[-9, 2\]"):
        int4.pack(np.array([2, -9]))
    with pytest.raises(ValueError, match="2 bytes cannot hold 5"):
        int4.unpack(np.zeros(2, np.uint8), 5)


@pytest.fixture(scope="module")
def w4(tmp_path_factory, tiny_w8a8):
    """Checkpoints of the session's tiny model, each exported by `python -m export` with the default storage
    (packed): "W4A8" all 4-bit (dw_bits 4: every kernel's INT4 path), "W4A8 default" and "W4A32" as the recipes
    stand (depthwise weights 8-bit), and the int8-stored all-4-bit W4A8 file made from the same conversion."""
    from export.__main__ import main
    from quantize import calibrate, freeze, prepare, recipe
    from quantize.io import save_quantized
    convert = importlib.import_module("export.convert")  # the package exports a function of that name
    d = tmp_path_factory.mktemp("int4")
    out = {}
    real, cache = convert.litert_bytes, {}

    def cached(qm, kind, nhwc):
        key = (qm.qcfg.label, kind, nhwc)
        if key not in cache:
            cache[key] = real(qm, kind, nhwc)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert, "litert_bytes", cached)
        for name, q in (("W4A8", recipe("W4A8", dw_bits=4)), ("W4A8 default", recipe("W4A8")),
                        ("W4A32", recipe("W4A32"))):
            qm = prepare(tiny_w8a8["model"], q)
            calibrate(qm, tiny_w8a8["calib"])
            freeze(qm)
            stem = name.lower().replace(" ", "_")
            ckpt, path = d / f"{stem}.pt", d / f"{stem}.tflite"
            save_quantized(ckpt, qm)
            extra = ["--skip-builtin"] if name != "W4A8" else []
            assert main(["--checkpoint", str(ckpt), "--out", str(path), "--val-images", VAL,
                         "--data", str(CIFAR_TGZ)] + extra) == 0
            out[name] = {"qm": qm, "ckpt": ckpt, "path": path,
                         "report": json.loads(path.with_suffix(".tflite.json").read_text())}
        out["W4A8"]["int8_bytes"] = convert.convert(out["W4A8"]["qm"], "int8", w4_storage="int8")[0]
    assert len(cache) == 3
    return out


def _weights(data: bytes):
    """(op name, weight-holding tensor, model) for every conv / FC of subgraph 0, through a DEQUANTIZE if any."""
    model = fb.read(data)
    sg = model.subgraphs[0]
    writer = {o: op for op in sg.operators for o in op.outputs}
    out = []
    for op in sg.operators:
        if fb.op_name(model, op) in WEIGHTED:
            w = op.inputs[1]
            src = writer[w].inputs[0] if w in writer else w
            out.append((fb.op_name(model, op), sg.tensors[src]))
    return model, out


def test_w4a8_packed_validates_against_mixed_kernels(w4):
    """Every weight packed (convs on builtin kernels, the classifier in XNNPACK), the file smaller than the
    int8-stored one, and its outputs equal to the integer simulation with those kernels, layer by layer: 0 LSB."""
    r = w4["W4A8"]
    rep, data = r["report"], r["path"].read_bytes()
    storage = rep["graph"]["w4_storage"]
    assert list(storage.values()).count("int4 packed (builtin CONV_2D)") == 35
    assert list(storage.values()).count("int4 packed (builtin DEPTHWISE_CONV_2D)") == 17
    assert storage["classifier"] == "int4 packed (XNNPACK FULLY_CONNECTED)"
    v = rep["validation"]
    assert v["passed"] and v["structure_problems"] == [] and v["structure"]["int4_weights"] == 53
    x = v["runs"]["xnnpack"]
    assert len(x["builtin_layers"]) == 52 and "classifier" not in x["builtin_layers"]
    assert "builtin for the 52 layers" in x["reference"]
    for kernels in ("xnnpack", "builtin"):
        assert v["runs"][kernels]["max_lsb"] == 0 and v["runs"][kernels]["exact_outputs"] == 1.0, kernels
    # bytes: 4 bits instead of 8 for each of the tiny model's ~100k weights; tables and biases unchanged
    assert len(data) < 0.8 * len(r["int8_bytes"])
    _, weights = _weights(r["int8_bytes"])
    assert all(t.type == fb.TensorType.INT8 for _, t in weights)


def test_nibbles_are_the_model_codes(w4):
    """Each packed buffer unpacks (int4.unpack, golden-tested above) to our weight codes in LiteRT's layout."""
    from export.validate import _tflite_layout
    from quantize.qmodel import qlayers
    model, weights = _weights(w4["W4A8"]["path"].read_bytes())
    layers = list(qlayers(w4["W4A8"]["qm"]).values())
    assert len(weights) == len(layers)
    for (op, t), layer in zip(weights, layers):
        assert t.type == fb.TensorType.INT4, op
        ours = _tflite_layout(layer.weight_codes().numpy(), layer.is_depthwise)
        raw = np.asarray(model.buffers[t.buffer].data, dtype=np.uint8)
        assert len(raw) == (ours.size + 1) // 2
        assert np.array_equal(int4.unpack(raw, ours.size).reshape(ours.shape), ours), op


def test_simulation_without_the_builtin_layers_is_not_the_file(w4, cifar_small):
    """The per-layer kernel choice matters: all-XNNPACK arithmetic misses the file's outputs somewhere, the mixed
    simulation matches it everywhere. Uniform noise images: more rounding ties than real photos."""
    from export.validate import builtin_layers_of, int_sim_outputs, run_file
    r = w4["W4A8"]
    qm, data = r["qm"], r["path"].read_bytes()
    x = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 32, 32, generator=x) * 4 - 2
    got = run_file(data, qm, images, kernels="xnnpack")
    mixed = int_sim_outputs(qm, images, "xnnpack", builtin_layers_of(data, qm))
    assert torch.equal(mixed, got)
    assert not torch.equal(int_sim_outputs(qm, images, "xnnpack"), got)


def test_corrupted_nibble_fails_the_gate(w4, tmp_path, monkeypatch, capsys):
    """One nibble of one packed weight changed by one code: the structure check names the layer, and the export
    exits 1 and keeps no file."""
    import export.pipeline as pipeline
    from export.validate import check_structure
    r = w4["W4A8"]
    model, weights = _weights(r["path"].read_bytes())
    _, t = weights[5]
    raw = np.asarray(model.buffers[t.buffer].data, dtype=np.uint8).copy()
    codes = int4.unpack(raw, int(np.prod(t.shape)))
    codes[3] = codes[3] + 1 if codes[3] < 7 else 6
    model.buffers[t.buffer].data = int4.pack(codes)
    bad = fb.write(model)
    problems, _ = check_structure(bad, r["qm"], "int8", False)
    assert len(problems) == 1 and "weight codes differ" in problems[0]

    monkeypatch.setattr(pipeline, "convert", lambda qm, kind, **kw: (bad, {"batch": 1}))
    out = tmp_path / "bad.tflite"
    rc = importlib.import_module("export.__main__").main(
        ["--checkpoint", str(r["ckpt"]), "--out", str(out), "--val-images", "4", "--data", str(CIFAR_TGZ),
         "--skip-builtin"])
    assert rc == 1
    assert "weight codes differ" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "bad.tflite.json").exists()


def test_int4_buffer_of_the_wrong_size_is_refused(w4):
    """The verifier checks a packed constant's byte count against its shape before any reader trusts it."""
    from export.tflite_file import TfliteError, verify
    model, weights = _weights(w4["W4A8"]["path"].read_bytes())
    _, t = weights[0]
    model.buffers[t.buffer].data = np.asarray(model.buffers[t.buffer].data, dtype=np.uint8)[:-1].copy()
    with pytest.raises(TfliteError, match="INT4 constant of 216 elements takes 108 bytes packed, its buffer "
                                          "holds 107"):
        verify(fb.write(model))


def test_w4a32_packed_behind_dequantize(w4):
    """Weight-only: every 4-bit weight INT4 behind its DEQUANTIZE (as ai-edge-quantizer's weight_only_wi4_afp32),
    the 17 depthwise weights int8 (the recipe's default width; AEQ keeps them float), the float outputs within the
    float gate of the simulation."""
    r = w4["W4A32"]
    rep = r["report"]
    storage = rep["graph"]["w4_storage"]
    # the classifier is exported as a 1x1 conv in float graphs: 35 convs + 1
    assert list(storage.values()).count("int4 packed (builtin DEQUANTIZE, float CONV_2D on builtin kernels)") == 36
    assert list(storage.values()).count("int8 (8-bit weights)") == 17
    assert {n for n, s in storage.items() if s.startswith("int8")} == \
        {n for n, layer in _layers(r["qm"]).items() if layer.is_depthwise}
    v = rep["validation"]
    assert v["passed"] and v["structure_problems"] == [] and v["structure"]["int4_weights"] == 36
    assert rep["file_summary"]["ops"]["DEQUANTIZE"] == 53
    assert rep["file_summary"]["constant_tensor_types"]["int4"] == 36       # read from the schema, not numpy


def test_w4a8_default_keeps_depthwise_8bit(w4):
    """The W4A8 recipe as it stands: pointwise convs INT4 on the builtin kernels, the depthwise convs int8 (so
    XNNPACK runs them) and the classifier INT4 in XNNPACK; the outputs equal the integer simulation with each
    layer's kernel, 0 LSB, and the file lies between the all-4-bit one and the int8-stored one."""
    r, q = w4["W4A8 default"], w4["W4A8 default"]["qm"]
    rep, data = r["report"], r["path"].read_bytes()
    dw = {n for n, layer in _layers(q).items() if layer.is_depthwise}
    assert len(dw) == 17 and all(_layers(q)[n].w_fq.spec.bits == 8 for n in dw)
    storage = rep["graph"]["w4_storage"]
    assert {n: s for n, s in storage.items() if n in dw} == {n: "int8 (8-bit weights)" for n in dw}
    assert list(storage.values()).count("int4 packed (builtin CONV_2D)") == 35
    v = rep["validation"]
    assert v["passed"] and v["structure_problems"] == [] and v["structure"]["int4_weights"] == 36
    x = v["runs"]["xnnpack"]
    assert set(x["builtin_layers"]) == {n for n, s in storage.items() if s == "int4 packed (builtin CONV_2D)"}
    assert x["max_lsb"] == 0 and x["exact_outputs"] == 1.0
    all4, int8 = len(w4["W4A8"]["path"].read_bytes()), len(w4["W4A8"]["int8_bytes"])
    dw_weights = sum(_layers(q)[n].op.weight.numel() for n in dw)
    assert len(data) - all4 == pytest.approx(dw_weights / 2, abs=64)    # half a byte more for each depthwise weight
    assert all4 < len(data) < int8


def _layers(qm):
    from quantize.qmodel import qlayers
    return qlayers(qm)


def test_w4_storage_value_is_checked(w4, tmp_path, capsys):
    from export.__main__ import main
    out = tmp_path / "x.tflite"
    rc = main(["--checkpoint", str(w4["W4A8"]["ckpt"]), "--out", str(out), "--data", str(CIFAR_TGZ),
               "--w4-storage", "int3"])
    assert rc == 2
    assert "--w4-storage should be one of auto, int8 instead of 'int3'" in capsys.readouterr().err
    assert not out.exists()


def test_matrix_rows_export_w4_packed(w4, monkeypatch):
    """bench matrix exports its W4 rows with the default (packed) storage and notes it in export_note."""
    import export
    from bench.matrix import MatrixConfig, _export
    seen = []
    monkeypatch.setattr(export, "run_export", lambda cfg: seen.append(cfg) or w4["W4A8"]["report"])
    row = _export(MatrixConfig(), w4["W4A8"]["qm"].qcfg, w4["W4A8"]["ckpt"], w4["W4A8"]["path"])
    assert seen[0].w4_storage == "auto" and row["export_status"] == "ok"
    assert row["export_note"] == ("weights: 35 int4 packed (builtin CONV_2D), 17 int4 packed (builtin "
                                  "DEPTHWISE_CONV_2D), 1 int4 packed (XNNPACK FULLY_CONNECTED)")
