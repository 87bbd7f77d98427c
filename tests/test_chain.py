"""The whole chain end to end on real CIFAR-10 images with a tiny model: every step runs for real (training,
pruning, PTQ, litert-torch conversion, validation with the LiteRT interpreter, host timing, report), only the
budgets are small. The experiment matrix runs end to end, resumes and re-times in tests/test_design_card.py,
on the user's own data."""
from __future__ import annotations

import csv
import json

import pytest
import torch

import bench.__main__ as bench_cli


def CHAIN_ARGS(out):  # tiny budgets: seconds per stage on 2 cores
    return ["--chain", "--out", str(out), "--width", "0.25", "--train-epochs", "1", "--train-minutes", "0.15",
            "--finetune-minutes", "0.05", "--sweep-minutes", "0.05", "--sweep-images", "50",
            "--sweep-global-images", "200", "--eval-images", "200", "--val-images", "50", "--host-runs", "5"]


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("chain")
    code = bench_cli.main(CHAIN_ARGS(out))
    assert code == 0
    return out


def test_chain_leaves_checkpoint_validated_file_bench_and_report(chain_dir):
    for name in ("baseline/checkpoint.pt", "prune/pruned.pt", "quantize/quantized.pt", "model_w8a8.tflite",
                 "model_fp32.tflite", "bench_host.csv", "report.md", "report.html", "chain.json"):
        assert (chain_dir / name).exists(), name
    rep = json.loads((chain_dir / "model_w8a8.tflite.json").read_text())
    assert rep["validation"]["passed"]
    # the INT8 file equals our integer simulation output for output (the gate allows 1 LSB; the sim is exact)
    assert rep["validation"]["runs"]["xnnpack"]["max_lsb"] == 0
    assert set(rep["file_summary"]["activation_tensor_types"]) <= {"int8", "int32"}
    with open(chain_dir / "bench_host.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"].rsplit("/", 1)[-1] for r in rows} == {"model_fp32.tflite", "model_w8a8.tflite"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    html = (chain_dir / "report.html").read_text()
    assert "W8A8" in html and "FP32" in html
    pruned = torch.load(chain_dir / "prune" / "pruned.pt", weights_only=True)
    assert pruned["kind"] == "pruned" and pruned["masks"]
    # every training stage states its budget, what it reached, and its precision
    stages = {r["stage"]: r for r in json.loads((chain_dir / "stages.json").read_text())}
    assert stages["baseline training"]["budget_min"] == 0.15 and stages["baseline training"]["images"] > 0
    assert stages["fine-tuning"]["budget_min"] == 0.05 and stages["fine-tuning"]["images_per_s"] > 0
    assert stages["per-layer sweep"]["budget_min"] == 0.05
    assert "Stages: budgets and throughput" in html


def test_chain_resumes_without_redoing_finished_steps(chain_dir):
    before = {p: p.stat().st_mtime_ns for p in (chain_dir / "model_w8a8.tflite", chain_dir / "prune" / "pruned.pt")}
    assert bench_cli.main(CHAIN_ARGS(chain_dir)) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    steps = json.loads((chain_dir / "chain.json").read_text())["steps"]
    assert all(s.get("skipped") for s in steps if s["step"] != "report")


def test_matrix_rejects_unknown_config(tmp_path, capsys):
    assert bench_cli.main(["--matrix", "--only", "W3A3", "--out", str(tmp_path)]) == 2
    assert "W3A3" in capsys.readouterr().err
