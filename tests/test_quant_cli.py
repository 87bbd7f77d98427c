"""`python -m quantize` as a user calls it: outputs and their configs, clear errors with no file left behind,
the QAT hand-off, and a resumable study matrix. Fast: a width-0.25 checkpoint and the synthetic `random` data
source (512 images per split), tiny calibration and evaluation sets.
"""
from __future__ import annotations

import json

import pytest
import torch

import quantize.matrix as matrix_mod
from conftest import tiny_config
from mobilenet import atomic_save, build_model
from mobilenet.runs import latest
from quantize import recipe
from quantize.__main__ import main, quant_config_from, CliConfig
from quantize.io import load_quantized
from common.matrix import MATRIX_COLUMNS, read_matrix
from quantize.matrix import matrix_rows, row_id

FAST = ["--data-source", "random", "--calib-size", "32", "--eval-images", "64", "--opt-images", "16",
        "--no-progress", "--no-export"]


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    m = build_model(tiny_config())
    path = tmp_path / "tiny.pt"
    atomic_save({"format": "mnv2-compress", "kind": "fp32", "model_config": tiny_config().to_dict(),
                 "model": m.state_dict()}, path)
    return path


def test_single_run_writes_checkpoint_metrics_and_config(ckpt, tmp_path):
    out = tmp_path / "w8a8"
    assert main(["--checkpoint", str(ckpt), "--config", "W8A8", "--granularity", "per-tensor", "--out", str(out)]
                + FAST) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["metrics"]
    assert {"acc_ref", "acc_q", "agreement", "mse", "snr_db", "weight_bytes", "fp32_weight_bytes"} <= set(m)
    assert m["n"] == 64 and metrics["quant_config"]["granularity"] == "per-tensor"
    assert json.loads((out / "quantize_config.json").read_text())["cli"]["config"] == "W8A8"
    qm, saved = load_quantized(out / "quantized.pt")
    assert saved["metrics"]["snr_db"] == m["snr_db"] and saved["source_checkpoint"] == str(ckpt)
    assert qm.qcfg.name == "W8A8" and not qm.qcfg.per_channel


def test_bit_overrides_and_methods(ckpt, tmp_path):
    cli = CliConfig(checkpoint=str(ckpt), config="W8A8", w_bits=6, a_bits=7, cle=True)
    q = quant_config_from(cli)
    assert (q.name, q.w_bits, q.a_bits, q.cle) == ("W6A7", 6, 7, True)
    q = quant_config_from(CliConfig(checkpoint=str(ckpt), config="W4A32", dw_bits=4))
    assert (q.label, q.depthwise_bits) == ("W4A32 dw4", 4)
    assert main(["--checkpoint", str(ckpt), "--config", "W4A8", "--adaround", "--adaround-iters", "2",
                 "--bias-correction", "--out", str(tmp_path / "ada")] + FAST) == 0
    rep = json.loads((tmp_path / "ada" / "metrics.json").read_text())["ptq_report"]
    assert rep["adaround"]["layers"] == 53 and rep["adaround"]["err_adaround"] <= rep["adaround"]["err_nearest"]


@pytest.mark.parametrize("args,message", [
    (["--config", "W3A3"], "'W3A3'"),
    (["--w-bits", "17"], "17"),
    (["--w-bits", "1"], "1"),
    (["--granularity", "per-row"], "'per-row'"),
    (["--calib", "imagenet"], "'imagenet'"),
    (["--config", "W8A32", "--a-bits", "8"], "--a-bits 8"),
    (["--eval-images", "-1"], "--eval-images should be >= 0 instead of -1"),
    (["--adaround-iters", "-1"], "-1"),
    (["--dw-bits", "1"], "dw_bits should be an integer in [2, 16] instead of 1"),
    (["--config", "W16A32", "--dw-bits", "8"], "dw_bits=8 needs integer weights"),
])
def test_user_errors_exit_2_and_write_nothing(ckpt, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["--checkpoint", str(ckpt), "--out", str(out)] + FAST + args) == 2
    err = capsys.readouterr().err
    assert "python -m quantize: error:" in err and message in err
    assert not (out / "quantized.pt").exists() and not (out / "metrics.json").exists()


def test_checkpoint_errors(ckpt, tmp_path, capsys):
    assert main(["--out", str(tmp_path / "o")] + FAST) == 2
    err = capsys.readouterr().err
    assert "no --checkpoint given" in err and "run `python train.py` first" in err
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")] + FAST) == 2
    assert "not found" in capsys.readouterr().err
    out = tmp_path / "q"
    assert main(["--checkpoint", str(ckpt), "--config", "W8A32", "--out", str(out)] + FAST) == 0
    assert main(["--checkpoint", str(out / "quantized.pt"), "--out", str(tmp_path / "o2")] + FAST) == 2
    assert "is a quantized checkpoint" in capsys.readouterr().err


def test_eval_images_is_one_stratified_subset():
    """--eval-images N means the same N images in every command: evenly spaced over the class-sorted test set."""
    from mobilenet.data import Split
    labels = torch.arange(10000) // 1000            # class-sorted, like the test folder
    split = Split(torch.zeros(10000, 1, 1, 1, dtype=torch.uint8), labels)
    sub = split.stratified(2000)
    assert torch.equal(sub.labels, labels[::5]) and torch.bincount(sub.labels).tolist() == [200] * 10
    # 1,500 does not divide 10,000: still 150 of every class, spread to the last one (a plain stride of 6 would
    # stop at image 9,000 and give the last class 0)
    assert torch.bincount(split.stratified(1500).labels).tolist() == [150] * 10
    assert len(split.stratified(10000)) == len(split.stratified(0)) == len(split.stratified(20000)) == 10000


def test_qat_flags_reach_qat(ckpt, tmp_path, capsys):
    """--qat runs quantize.qat with the flags mapped onto its QATConfig and records the model for the next command
    (the export that follows, and the record of the file, are the design card's test: tests/test_design_card.py)."""
    out = tmp_path / "qat"
    assert main(["--checkpoint", str(ckpt), "--config", "W8A8", "--qat", "--epochs", "2", "--qat-lr", "0.001",
                 "--freeze-bn-epoch", "1", "--freeze-observer-epoch", "1", "--qat-images", "64", "--qat-minutes", "0",
                 "--out", str(out)] + FAST) == 0
    qat = json.loads((out / "metrics.json").read_text())["qat"]
    c = qat["config"]
    assert (c["epochs"], c["lr"], c["freeze_bn_epoch"], c["freeze_observer_epoch"], c["max_images_per_epoch"],
            c["budget"]) == (2, 0.001, 1, 1, 64, None)
    assert c["precision"]["dtype"] == "fp32" or c["bf16"] is True       # QAT stays float32 unless forced
    assert [h["epoch"] for h in qat["history"]] == [1, 2] and [h["bn_frozen"] for h in qat["history"]] == [False, True]
    assert load_quantized(out / "quantized.pt")[1]["qat"] is True
    assert latest("quantized") == (out / "quantized.pt").resolve()
    assert not (out / "model_w8a8.tflite").exists()                    # --no-export


def test_matrix_rows_cover_the_study():
    ids = [row_id(q) for q in matrix_rows()]
    assert len(ids) == len(set(ids))
    for name in ("W8A8", "W4A8"):
        for gran in ("per-channel", "per-tensor"):
            for calib in ("real", "random"):
                assert f"{name} {gran} {calib} rtn" in ids
    for name in ("W8A32", "W4A32", "W8A16 static"):        # no calibration: one row per granularity
        assert [i for i in ids if i.startswith(name + " p") and i.endswith(" rtn")] == \
               [f"{name} per-channel n/a rtn", f"{name} per-tensor n/a rtn"]
    # dynamic range: per-channel weights only (LiteRT's hybrid kernels get per-tensor ones wrong)
    assert [i for i in ids if i.startswith("W8A8-dynamic")] == ["W8A8-dynamic per-channel n/a rtn"]
    assert [i for i in ids if i.startswith("W16A32")] == ["W16A32 (fp16) n/a n/a rtn"]   # no scales: one row
    assert "FP32 n/a n/a fp32" in ids and "W8A8 per-tensor real cle+bc" in ids
    assert "W4A8 per-channel real adaround" in ids


def test_matrix_is_resumable(ckpt, tmp_path, monkeypatch):
    rows = [recipe("FP32"), recipe("W8A32"), recipe("W8A8", calib="random", calib_size=32)]
    calls = []
    import quantize.ptq as ptq
    real = ptq.run_ptq

    def counting(model, ds, q, **kw):
        calls.append(row_id(q))
        return real(model, ds, q, **kw)

    monkeypatch.setattr(ptq, "run_ptq", counting)
    out = tmp_path / "m"
    monkeypatch.setattr(matrix_mod, "matrix_rows", lambda *a: rows[:2])
    assert main(["--checkpoint", str(ckpt), "--matrix", "--out", str(out)] + FAST) == 0
    monkeypatch.setattr(matrix_mod, "matrix_rows", lambda *a: rows)
    assert main(["--checkpoint", str(ckpt), "--matrix", "--out", str(out)] + FAST) == 0
    assert calls == ["FP32 n/a n/a fp32", "W8A32 per-channel n/a rtn", "W8A8 per-channel random rtn"]  # none twice
    got = read_matrix(out / "matrix.csv")    # the one schema, which bench's matrix and report read
    assert [" ".join(r[c] for c in ("config", "granularity", "calib", "method")) for r in got] == calls
    assert got[0]["snr_db"] > 100 and all(r["export_status"] == "skipped" for r in got)  # FP32: folding only
    assert open(out / "matrix.csv").readline().strip().split(",") == MATRIX_COLUMNS
    assert (out / "matrix_snr.png").stat().st_size > 0 and (out / "fp32_logits.pt").exists()
