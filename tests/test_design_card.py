"""The design card's three commands as a user types them, in order, on data the project has never seen:

    python train.py --prune 0.7  ->  python -m quantize --qat  ->  python -m bench --device

No command is told where the previous one left its model (runs/latest.json joins them); only the data and
small budgets are given. The data is an ImageFolder tree made here: three classes of 40x48 patterns, a third of
them grayscale, so the layout's conversions run too. The phone is the project's adb test device."""
from __future__ import annotations

import csv
import json

import pytest

import bench.__main__ as bench_cli
import quantize.__main__ as quantize_cli
import train
from conftest import make_image_tree
from mobilenet.checkpoint import load_checkpoint
from mobilenet.runs import latest, runs_dir
from quantize.io import load_quantized
from tests.bench_fixtures import phone, standin_binary  # noqa: F401 (fixtures)


@pytest.fixture
def tree(tmp_path):
    return make_image_tree(tmp_path / "shapes")


def test_three_commands_in_order_on_the_users_data(tree, tmp_path, phone, standin_binary, monkeypatch, capsys):
    data = ["--cache-dir", str(tmp_path / "cache")]
    # 1. python train.py --prune 0.7 (tiny width and budgets; no paths)
    assert train.main(["--prune", "0.7", "--data", str(tree), *data, "--width", "0.25", "--batch-size", "16",
                       "--epochs", "1", "--budget-minutes", "0.1", "--prune-sweep-minutes", "0.05",
                       "--prune-budget-minutes", "0.05"]) == 0
    base = runs_dir() / "baseline"
    assert latest("baseline") == (base / "checkpoint.pt").resolve()
    assert latest("pruned") == (base / "pruned.pt").resolve()
    metrics = json.loads((base / "metrics.json").read_text())
    prune_report = json.loads((base / "prune_report.json").read_text())
    for doc in (metrics, prune_report):            # the user's data at every step, and its classes
        assert doc["data"]["root"] == str(tree.resolve())
        assert doc["data"]["classes"] == ["checker", "hstripes", "vstripes"]
    assert load_checkpoint(base / "pruned.pt")["model_config"]["num_classes"] == 3
    assert abs(prune_report["global_sparsity"] - 0.7) < 0.005

    # 2. python -m quantize --qat: finds the pruned model by itself and ends with the validated .tflite
    capsys.readouterr()
    assert quantize_cli.main(["--qat", "--data", str(tree), *data, "--qat-minutes", "0.1", "--epochs", "1",
                              "--calib-size", "32", "--eval-images", "24", "--val-images", "24", "--no-progress"]) == 0
    assert f"using {(base / 'pruned.pt').resolve()} (the latest pruned model" in capsys.readouterr().out
    q = runs_dir() / "quantize"
    qm = json.loads((q / "metrics.json").read_text())
    assert qm["data"]["root"] == str(tree.resolve()) and qm["qat"]["config"]["budget"]["minutes"] == 0.1
    assert load_quantized(q / "quantized.pt")[1]["qat"] is True
    assert latest("quantized") == (q / "quantized.pt").resolve()
    rep = json.loads((q / "model_w8a8.tflite.json").read_text())
    assert rep["validation"]["passed"] and rep["validation"]["runs"]["xnnpack"]["max_lsb"] == 0
    assert rep["validation_data"]["root"] == str(tree.resolve())
    assert latest("tflite") == (q / "model_w8a8.tflite").resolve()

    # 3. python -m bench --device: times the latest validated file on the (test) phone
    server, _ = phone
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(server.port))
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    out = tmp_path / "android.csv"
    monkeypatch.setenv("BENCHMARK_MODEL", str(standin_binary))    # where a user keeps the phone's binary
    assert bench_cli.main(["--device", "--runs", "5", "--warmup", "1", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["model"], r["status"]) for r in rows] == [("model_w8a8.tflite", "ok")]
    assert float(rows[0]["inference_avg_ms"]) > 0


def test_each_command_says_what_is_missing_and_which_command_makes_it(capsys):
    assert quantize_cli.main(["--qat", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no --checkpoint given" in err and "records no pruned or baseline model yet" in err
    assert "run `python train.py` first" in err
    assert bench_cli.main(["--device"]) == 2
    err = capsys.readouterr().err
    assert "no MODEL.tflite given" in err and "run `python -m quantize" in err


def test_matrix_takes_the_users_model_and_data_and_resumes(tree, tmp_path):
    """python -m bench --matrix --checkpoint CKPT --data TREE: the study on the user's own 3-class model and data;
    run again, it resumes with nothing left to do; --retime times the files again and changes only host columns."""
    import torch
    from conftest import tiny_config
    from mobilenet import build_model
    from mobilenet.checkpoint import FORMAT, atomic_save
    from common.matrix import read_matrix
    torch.manual_seed(0)
    model = build_model(tiny_config(num_classes=3))
    ckpt = tmp_path / "mine.pt"
    atomic_save({"format": FORMAT, "kind": "fp32", "model_config": model.cfg.to_dict(),
                 "model": model.state_dict()}, ckpt)
    out = tmp_path / "matrix"
    args = ["--matrix", "--checkpoint", str(ckpt), "--data", str(tree), "--out", str(out), "--only", "FP32,W8A8",
            "--quick", "--eval-images", "0", "--calib-size", "32", "--val-images", "24", "--host-runs", "3"]
    assert bench_cli.main(args) == 0
    rows = read_matrix(out / "matrix.csv")
    assert [(r["config"], r["export_status"]) for r in rows] == [("FP32", "ok"), ("W8A8", "ok")]
    w8 = rows[1]
    assert w8["max_lsb"] == 0 and w8["file_agreement"] == 1.0 and w8["eval_images"] == 24
    assert 0 < w8["file_bytes"] < rows[0]["file_bytes"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["data"]["root"] == str(tree.resolve()) and meta["data"]["classes"] == ["checker", "hstripes",
                                                                                          "vstripes"]
    assert str(tree.resolve()) in (out / "report.md").read_text()

    mtime = (out / "matrix.csv").stat().st_mtime_ns
    assert bench_cli.main(args) == 0                      # resumed: nothing left to do, no row rewritten
    assert (out / "matrix.csv").stat().st_mtime_ns == mtime
    assert (out / "report.html").exists()
    hist = json.loads((out / "meta.json").read_text())["history"]   # both invocations named in the report
    assert [h["rows_before"] for h in hist] == [0, 2]
    assert "resumed after 2 rows" in (out / "report.md").read_text()
    assert bench_cli.main(args + ["--retime", "2"]) == 0     # host latency again, interleaved rounds
    again = read_matrix(out / "matrix.csv")
    assert [r["top1"] for r in again] == [r["top1"] for r in rows]         # only the host columns change
    assert all(r["host_ms_median"] > 0 and r["host_ms_p5"] <= r["host_ms_p95"] for r in again)
    assert "re-timed: host latency of 2 files, 2 interleaved rounds" in (out / "report.md").read_text()
