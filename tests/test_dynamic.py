"""Dynamic-range files (issue 15 point 3): int8 weights, float activations that LiteRT's hybrid kernels quantize
to int8 at each conv input on every run; the `W8A16 static` row beside them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import CIFAR_TGZ, real_stats_tiny_model


def _run(argv):
    from export.__main__ import main
    return main(argv)


def test_dynamic_qparams_golden():
    """Per-sample asymmetric int8 parameters and codes, computed by hand (float32 throughout, no ties):
    sample 0 spans [-1, 2]: scale 3/255, zero-point -128 - round(-85) = -43;
    sample 1 spans [0, 6] (after a ReLU6): scale 6/255, zero-point -128."""
    from quantize.core import dynamic_qparams, quantize
    from quantize.fakequant import DynamicFakeQuant
    from quantize.spec import activation_spec
    x = torch.tensor([[-1.0, 0.25, 2.0, 0.0], [0.0, 1.5, 6.0, 3.0]])
    s, z = dynamic_qparams(x, -128, 127)
    assert s.dtype == torch.float32 and torch.equal(s, torch.tensor([3.0, 6.0]) / 255.0)
    assert torch.equal(z, torch.tensor([-43, -128]))
    q = quantize(x, s, z, -128, 127, axis=0)
    # 0.25 * 85 = 21.25 -> 21; 1.5 * 42.5 = 63.75 -> 64; 3 * 42.5 = 127.5 -> 128 (even) -> 0
    assert q.tolist() == [[-128, -22, 127, -43], [-128, -64, 127, 0]]
    fq = DynamicFakeQuant(activation_spec(8))(x)
    assert torch.equal(fq, (q - z[:, None]).float() * s[:, None])
    assert fq[0, 3] == 0.0 and fq[1, 3] == torch.tensor(6.0) / 255 * 128   # 0 is exact (the zero-point)


def test_w8a16_static_naming():
    """The static int16 file is the row `W8A16 static`; the dynamic-range file is its own recipe and kind."""
    from export.convert import ExportError, export_kind
    from quantize.config import recipe
    from quantize.matrix import matrix_rows, study_key
    assert recipe("W8A16").label == "W8A16 static" and export_kind(recipe("W8A16")) == "int16"
    dyn = recipe("w8a8-DYNAMIC")                     # names are case-insensitive
    assert (dyn.name, dyn.a_bits, dyn.act_mode, export_kind(dyn)) == ("W8A8-dynamic", 8, "dynamic", "dynamic")
    configs = {study_key(q)["config"] for q in matrix_rows()}
    assert {"W8A16 static", "W8A8-dynamic"} <= configs and "W8A16" not in configs
    with pytest.raises(ExportError, match="per-tensor"):
        export_kind(recipe("W8A8-dynamic", granularity="per-tensor"))
    with pytest.raises(ValueError, match="'W9A9'"):
        recipe("W9A9")


@pytest.fixture(scope="module")
def dyn(tmp_path_factory, cifar_small):
    """A tiny W8A8-dynamic checkpoint with real BN statistics, and the file `python -m export` made of it."""
    from quantize import freeze, prepare, recipe
    from quantize.io import save_quantized
    d = tmp_path_factory.mktemp("dynamic")
    m, _ = real_stats_tiny_model(cifar_small)
    qm = freeze(prepare(m, recipe("W8A8-dynamic")))
    ckpt, out = d / "dyn.pt", d / "dyn.tflite"
    save_quantized(ckpt, qm)
    assert _run(["--checkpoint", str(ckpt), "--out", str(out), "--val-images", "64", "--data", str(CIFAR_TGZ)]) == 0
    return {"qm": qm, "ckpt": ckpt, "tflite": out, "report": json.loads((d / "dyn.tflite.json").read_text())}


def test_dynamic_file_is_hybrid_and_validated(dyn):
    """Every conv reads an int8 weight directly from a float input (no DEQUANTIZE, no QUANTIZE): LiteRT's hybrid
    kernels; the real interpreter's outputs stay within the gate of the simulation with both kernel sets."""
    from export import flatbuffer as fb
    rep = dyn["report"]
    assert rep["export_kind"] == "dynamic" and rep["validation"]["passed"]
    assert rep["validation"]["structure_problems"] == []
    model = fb.read(dyn["tflite"].read_bytes())
    sg = model.subgraphs[0]
    names = [fb.op_name(model, op) for op in sg.operators]
    assert "DEQUANTIZE" not in names and "QUANTIZE" not in names
    weighted = [op for op in sg.operators if fb.op_name(model, op) in ("CONV_2D", "DEPTHWISE_CONV_2D",
                                                                           "FULLY_CONNECTED")]
    assert len(weighted) == rep["validation"]["structure"]["weights_checked"] == 52 + 1
    for op in weighted:
        assert sg.tensors[op.inputs[0]].type == fb.TensorType.FLOAT32
        assert sg.tensors[op.inputs[1]].type == fb.TensorType.INT8
    for kernels in ("xnnpack", "builtin"):
        r = rep["validation"]["runs"][kernels]
        assert r["max_abs_diff"] <= r["atol"] and r["agreement"] >= 0.999, (kernels, r)


def test_changed_weight_code_fails_validation(dyn, tmp_path, monkeypatch, capsys):
    """One weight code of the stem conv changed in the file: the export refuses it (exit 1) and keeps nothing."""
    from export import flatbuffer as fb
    import export.pipeline as pipeline
    model = fb.read(dyn["tflite"].read_bytes())
    sg = model.subgraphs[0]
    op = next(o for o in sg.operators if fb.op_name(model, o) == "CONV_2D")
    buf = model.buffers[sg.tensors[op.inputs[1]].buffer]
    codes = buf.data.view(np.int8)
    codes[0] = 0 if codes[0] != 0 else 1
    bad = fb.write(model)
    monkeypatch.setattr(pipeline, "convert", lambda qm, kind, **kw: (bad, {"batch": 1}))
    out = tmp_path / "bad.tflite"
    rc = _run(["--checkpoint", str(dyn["ckpt"]), "--out", str(out), "--val-images", "4", "--data", str(CIFAR_TGZ),
               "--skip-builtin"])
    assert rc == 1
    assert "weight codes differ" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "bad.tflite.json").exists()


def test_bad_tolerance_names_the_value(tmp_path, capsys):
    rc = _run(["--checkpoint", str(tmp_path / "none.pt"), "--max-abs-dynamic", "-1"])
    assert rc == 2 and "--max-abs-dynamic should be >= 0 instead of -1.0" in capsys.readouterr().err
