"""Sparse weight storage (export/sparse.py): the CSR encoding, files with DENSIFY ops run by the real ai_edge_litert
interpreter, and the verifier's checks of the sparsity tables.

Time: one litert-torch conversion of a tiny pruned W8A8 MobileNetV2 (~15-25 s on the shared CPU) serves both of
its files (the sparse one through python -m export and its validation, the dense one from the cached conversion);
the rest edits the tiny files that tests/bench_fixtures.py converts once per session for other modules.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import CIFAR_TGZ, real_stats_tiny_model, tiny_config
from export import flatbuffer as fb
from export import sparse as S
from export.tflite_file import TfliteError, verify
from export.validate import interpreter
from tests.bench_fixtures import tiny_models  # noqa: F401 (fixture)

VAL = "16"
SP = fb.schema


def test_csr_golden():
    """A hand-written (3, 4) matrix: values row by row, row pointers, column of each value, narrowest dtypes."""
    w = np.array([[0, 5, 0, 0],
                  [0, 0, 0, 0],
                  [7, 0, 0, -3]], dtype=np.int8)
    values, segments, indices = S.csr_encode(w)
    assert values.tolist() == [5, 7, -3] and values.dtype == np.int8
    assert segments.tolist() == [0, 1, 1, 3] and segments.dtype == np.uint8
    assert indices.tolist() == [1, 0, 3] and indices.dtype == np.uint8
    assert np.array_equal(S.csr_decode(values, segments, indices, w.shape), w)
    # a conv weight (O, kh, kw, I) = (2, 1, 1, 300): rows are (o, y, x), columns I; a column index > 255
    conv = np.zeros((2, 1, 1, 300), dtype=np.float32)
    conv[0, 0, 0, 299], conv[1, 0, 0, 0], conv[1, 0, 0, 7] = 1.5, -2.0, 0.25
    values, segments, indices = S.csr_encode(conv)
    assert values.tolist() == [1.5, -2.0, 0.25] and segments.tolist() == [0, 1, 3]
    assert indices.tolist() == [299, 0, 7] and indices.dtype == np.uint16 and segments.dtype == np.uint8
    assert np.array_equal(S.csr_decode(values, segments, indices, conv.shape), conv)
    # the same weight traversed with the output channels last: rows (y, x, i), columns o; uint8 indices again
    order = [1, 2, 3, 0]
    values, segments, indices = S.csr_encode(conv, order)
    assert values.tolist() == [-2.0, 0.25, 1.5] and indices.tolist() == [1, 1, 0] and indices.dtype == np.uint8
    assert len(segments) == 301 and segments[[0, 1, 7, 8, 299, 300]].tolist() == [0, 1, 1, 2, 2, 3]
    assert np.array_equal(S.csr_decode(values, segments, indices, conv.shape, order), conv)
    # which order `auto` takes: 3 non-zeros do not pay for 301 row pointers; 30 % of a (64, 1, 1, 300) do
    assert S.best_order(conv)[0] == [0, 1, 2, 3]
    wide = np.random.default_rng(0).standard_normal((64, 1, 1, 300)).astype(np.float32)
    wide[np.abs(wide) < 1.04] = 0                                       # ~30 % non-zeros: ~5,800 indices
    assert S.best_order(wide)[0] == [1, 2, 3, 0]


def _prune_file(data: bytes, ratio: float) -> bytes:
    """The file with the smallest `ratio` of every CONV_2D weight set to zero (codes or floats), dense."""
    model = fb.read(data)
    sg = model.subgraphs[0]
    for op in sg.operators:
        if fb.op_name(model, op) == "CONV_2D":
            t = sg.tensors[op.inputs[1]]
            w = S.dense_array(model, t).copy()
            w[np.abs(w) <= np.quantile(np.abs(w), ratio)] = 0
            model.buffers[t.buffer].data = np.frombuffer(w.tobytes(), dtype=np.uint8).copy()
    return fb.write(model)


def _outputs(data: bytes, kernels: str, x: np.ndarray) -> np.ndarray:
    it = interpreter(data, kernels)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    res = []
    for xi in x:
        it.set_tensor(inp["index"], xi[None].astype(inp["dtype"]))
        it.invoke()
        res.append(it.get_tensor(out["index"]).copy())
    return np.concatenate(res)


@pytest.mark.parametrize("which", ["float", "int8"])
def test_tiny_file_sparse_tables_and_outputs(tiny_models, which):
    """conv 3->8 (216 weights) and 1x1 classifier (80) with 70 % zeros: `sparse` stores both as CSR + DENSIFY in
    their smallest traversal order, `auto` only where bytes are saved; outputs bit for bit the dense file's."""
    dense = _prune_file(tiny_models[which].read_bytes(), 0.7)
    model = fb.read(dense)
    before = [(w, v.copy()) for w, _, v in S.stored_weights(model)]
    note = S.sparsify(model, "sparse")
    sp = fb.write(model)
    verify(sp)
    assert note["sparse_weights"] == 2
    sg = model.subgraphs[0]
    for (w, ref), (w2, src, got) in zip(before, S.stored_weights(model)):
        assert w == w2 and src != w and np.array_equal(got, ref)
        t, s = sg.tensors[w], sg.tensors[src]
        assert model.buffers[t.buffer].data is None and s.quantization is None
        if which == "int8":                             # the per-channel scales stay where the conv reads them
            assert len(t.quantization.scale) == ref.shape[0] and t.quantization.quantizedDimension == 0
        p = s.sparsity
        order = list(p.traversalOrder)
        assert order == S.best_order(ref)[0] and not len(p.blockMap or [])
        assert [d.format for d in p.dimMetadata] == [SP.DimensionType.DENSE] * 3 + [SP.DimensionType.SPARSE_CSR]
        assert [d.denseSize for d in p.dimMetadata[:3]] == [ref.shape[d] for d in order[:3]]
        values, segments, indices = S.csr_encode(ref, order)
        assert np.array_equal(p.dimMetadata[3].arraySegments.values, segments)
        assert np.array_equal(p.dimMetadata[3].arrayIndices.values, indices)
        assert bytes(model.buffers[s.buffer].data) == values.tobytes()
    auto = fb.read(dense)
    assert S.sparsify(auto, "auto")["sparse_weights"] == (1 if which == "float" else 0)
    assert len(fb.write(auto)) <= len(dense)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32))
    if which == "int8":
        x = np.round(x * 127)
    for kernels in ("xnnpack", "builtin"):
        assert np.array_equal(_outputs(sp, kernels, x), _outputs(dense, kernels, x)), kernels


def _edit_sparse(data: bytes, change) -> bytes:
    model = fb.read(data)
    S.sparsify(model, "sparse")
    change(model, next(t for t in model.subgraphs[0].tensors if t.sparsity is not None))
    return fb.write(model)


@pytest.mark.parametrize("case,need", [
    ("index", r"index (\d+) outside 0\.\.\d+"),
    ("segments", "row pointers"),
    ("values", "the buffer holds"),
])
def test_corrupt_sparsity_is_refused(tiny_models, tmp_path, capsys, case, need):
    """Tables that would send DENSIFY outside its arrays: the verifier refuses them in one line, and so does a
    command reading the file (bench, exit 2)."""
    import bench.__main__ as bench_cli

    def change(model, t):
        csr = t.sparsity.dimMetadata[-1]
        if case == "index":         # one past the CSR level's axis
            csr.arrayIndices.values[0] = t.shape[t.sparsity.traversalOrder[-1]]
        elif case == "segments":
            csr.arraySegments.values[1] = csr.arraySegments.values[-1] + 1
        else:
            model.buffers[t.buffer].data = model.buffers[t.buffer].data[:-1]

    bad = _edit_sparse(_prune_file(tiny_models["int8"].read_bytes(), 0.7), change)
    with pytest.raises(TfliteError, match=need) as e:
        verify(bad, "bad.tflite")
    assert "\n" not in str(e.value) and "sparsity" in str(e.value)
    path = tmp_path / "bad.tflite"
    path.write_bytes(bad)
    rc = bench_cli.main([str(path), "--csv", str(tmp_path / "r.csv")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and re.search(need, err[0]), err


# ------------------------------------------------------------------------------ a pruned MobileNetV2 end to end

@pytest.fixture(scope="module")
def pruned(tmp_path_factory, cifar_small):
    """A tiny W8A8 MobileNetV2 with 70 % of the weights of each output channel of every conv but the depthwise ones
    zero (by magnitude), as a checkpoint. No channel is emptied: an all-zero channel's bias is written by the
    converter on another grid than ours, which the structure check reports whatever the storage."""
    from mobilenet import build_model
    from quantize import calibrate, freeze, prepare, recipe
    from quantize.io import save_quantized
    m, xs = real_stats_tiny_model(cifar_small)
    p = build_model(tiny_config()).eval()
    p.load_state_dict(m.state_dict())
    with torch.no_grad():
        for mod in p.modules():
            if isinstance(mod, torch.nn.Conv2d) and mod.groups == 1:
                a = mod.weight.abs().flatten(1)                         # (O, I * kh * kw)
                mod.weight[(a <= a.quantile(0.7, dim=1, keepdim=True)).view_as(mod.weight)] = 0.0
    qm = prepare(p, recipe("W8A8"))
    calibrate(qm, xs)
    freeze(qm)
    path = tmp_path_factory.mktemp("sparse") / "pruned_w8a8.pt"
    save_quantized(path, qm, {})
    return path, qm


@pytest.fixture(scope="module")
def exports(pruned, tmp_path_factory):
    """(sparse file and its report from python -m export --weights-storage sparse, dense file of the same model).
    One litert-torch conversion serves both: the dense file is that conversion with our usual edits (export.convert,
    validated as such by tests/test_export.py), the sparse one the full command with its validation."""
    import importlib
    from export.__main__ import main
    convert = importlib.import_module("export.convert")   # the package itself exports a function of that name
    path, qm = pruned
    d = tmp_path_factory.mktemp("exports")
    real, cache = convert.litert_bytes, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert, "litert_bytes", lambda *a: cache.setdefault(a[1:], real(*a)))
        f = d / "sparse.tflite"
        assert main(["--checkpoint", str(path), "--out", str(f), "--val-images", VAL, "--data", str(CIFAR_TGZ),
                     "--weights-storage", "sparse"]) == 0
        dense = d / "dense.tflite"
        dense.write_bytes(convert.convert(qm, "int8", weights_storage="dense")[0])
    assert len(cache) == 1
    return f, json.loads((d / "sparse.tflite.json").read_text()), dense


def test_pruned_int8_export_sparse_and_dense(exports, pruned, cifar_small):
    """The sparse file validated bit for bit against the integer simulation (XNNPACK gating, builtin reported),
    smaller than the dense one, their outputs identical under both kernels."""
    from export.validate import run_file
    from mobilenet.data import BatchLoader
    sparse, rep, dense = exports
    v = rep["validation"]
    assert v["passed"] and v["structure_problems"] == [] and v["structure"]["weights_checked"] == 53
    for kernels in ("xnnpack", "builtin"):
        assert v["runs"][kernels]["max_lsb"] == 0 and v["runs"][kernels]["n"] == int(VAL), kernels
    assert rep["weights"]["zeros_match"]
    n_sparse = rep["file_summary"]["sparse_weights"]
    assert n_sparse == v["structure"]["sparse_weights"] == rep["graph"]["weights"]["sparse_weights"] >= 35
    assert "DENSIFY" not in [op["op_name"] for op in interpreter(dense.read_bytes())._get_ops_details()]
    assert sparse.stat().st_size < dense.stat().st_size   # tiny: per-channel scales are much of the file
    x, _ = next(iter(BatchLoader(cifar_small.test.subset(torch.arange(8)), 8)))
    for kernels in ("xnnpack", "builtin"):
        got = [run_file(f.read_bytes(), pruned[1], x, kernels=kernels) for f in (sparse, dense)]
        assert torch.equal(*got), kernels


def test_a_wrong_sparse_code_is_caught(exports, pruned):
    """One stored non-zero code changed in a sparse weight: the structure check (decoding the CSR) names it."""
    from export.validate import check_structure
    model = fb.read(exports[0].read_bytes())
    t = next(t for t in model.subgraphs[0].tensors if t.sparsity is not None)
    model.buffers[t.buffer].data[0] ^= 1
    problems, _ = check_structure(fb.write(model), pruned[1], "int8", False)
    assert any("weight codes differ" in p for p in problems), problems
