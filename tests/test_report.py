"""The experiment-matrix report (common.matrix, bench.findings, common.plots, prune.plots, bench.study_report).

All numbers below are SYNTHETIC, chosen by hand to be easy to recognise on the page; they say nothing about
MobileNetV2. The tests check the plumbing: every row reaches both tables formatted as intended, every
plot the page links to is a real PNG, findings follow the data, rows are replaced and resumed, and a
missing input becomes "not measured" rather than an exception.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import study_report
from bench.__main__ import main as bench_main
from bench.findings import compare_with_study, compute_findings
from common.matrix import MATRIX_COLUMNS, done_keys, read_matrix, write_matrix_row
from common.provenance import collect_meta, write_meta

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(config, w, a, act, gran, calib, method, **kw) -> dict:
    base = {"config": config, "w_bits": w, "a_bits": a, "act_mode": act, "granularity": gran, "calib": calib,
            "method": method, "top1_fp32": 0.9100, "eval_images": 1000, "export_status": "skipped",
            "host_threads": 1}
    return base | kw


# (row, strings that must appear in that row of the report's tables)
SYNTHETIC = [
    (_row("FP32", 32, None, "none", "n/a", "n/a", "fp32", top1=0.9100, agreement=1.0, mse=0.0, snr_db=math.inf,
          weight_bytes=8_900_000, tflite="fp32.tflite", export_status="ok", file_bytes=8_960_000,
          gzip_bytes=8_300_000, host_ms_median=10.0, host_ms_p5=9.5, host_ms_p95=11.0, device_ms=20.0,
          device="SyntheticPhone"),
     ["91.00 %", "∞ (identical)", "8.96 MB", "10.0 ms", "20.0 ms"]),
    (_row("W8A8", 8, 8, "static", "per-channel", "real", "rtn", top1=0.9050, agreement=0.9800, mse=0.05,
          snr_db=23.4, weight_bytes=2_300_000, tflite="w8a8.tflite", export_status="ok", file_bytes=2_400_000,
          gzip_bytes=2_000_000, exact_match=1.0, max_lsb=0, file_agreement=1.0, host_ms_median=4.0,
          host_ms_p5=3.8, host_ms_p95=4.5, device_ms=6.0, device="SyntheticPhone"),
     ["90.50 %", "-0.50", "98.00 %", "23.4 dB", "2.40 MB", "3.73×", "4.00 ms", "6.00 ms"]),
    (_row("W8A8", 8, 8, "static", "per-tensor", "real", "rtn", top1=0.8800, snr_db=16.9, weight_bytes=2_250_000,
          host_ms_median=3.9),
     ["88.00 %", "16.9 dB", "2.25 MB", "3.90 ms"]),
    (_row("W8A8", 8, 8, "static", "per-channel", "random", "rtn", top1=0.8912, snr_db=20.14),
     ["89.12 %", "20.1 dB"]),
    (_row("W4A8", 4, 8, "static", "per-channel", "real", "rtn", top1=0.3000, snr_db=0.7, weight_bytes=1_200_000),
     ["30.00 %", "0.7 dB", "1.20 MB"]),
    (_row("W4A8", 4, 8, "static", "per-channel", "real", "adaround", top1=0.8500, snr_db=12.3,
          weight_bytes=1_200_000, export_status="refused", export_note="no INT4 kernel (synthetic note)"),
     ["85.00 %", "12.3 dB", "refused", "no INT4 kernel (synthetic note)"]),
    (_row("W8A8-dynamic", 8, 8, "dynamic", "per-channel", "n/a", "rtn", top1=0.9080, snr_db=27.0,
          host_ms_median=6.4, host_ms_p5=6.1, host_ms_p95=7.35),
     ["90.80 %", "27.0 dB", "6.40 ms", "6.10 ms … 7.35 ms"]),
    (_row("W8A8", 8, 8, "static", "per-channel", "real", "qat", top1=0.9088, snr_db=31.25, mse=0.0123),
     ["90.88 %", "31.2 dB", "0.0123"]),
]


def make_results(d: Path, rows=None, meta=True, prune=True) -> Path:
    """A synthetic results directory: matrix.csv, meta.json, prune/sweep_global.csv (+ layers, report)."""
    d.mkdir(parents=True, exist_ok=True)
    for r, _ in SYNTHETIC if rows is None else [(r, None) for r in rows]:
        write_matrix_row(d / "matrix.csv", r)
    if meta:
        write_meta(d / "meta.json", {"command": "SYNTHETIC test data (tests/test_report.py)",
                                     "checkpoint": "synthetic.pt", "checkpoint_sha256": "0123456789abcdef" * 4,
                                     "commit": "f" * 40, "machine": {"cpu": "Synthetic CPU", "cores": 2},
                                     "versions": {"python": "3.11"}, "date": "2000-01-01T00:00:00+00:00",
                                     "eval_subset": "1000 synthetic images", "seed": 0})
    if prune:
        p = d / "prune"
        p.mkdir(exist_ok=True)
        with open(p / "sweep_global.csv", "w", newline="") as f:   # prune/sweep.py GLOBAL_COLUMNS
            w = csv.writer(f)
            w.writerow(["ratio", "reached_sparsity", "acc", "drop_points", "images", "bf16"])
            for ratio, acc in ((0.0, 0.91), (0.3, 0.905), (0.5, 0.89), (0.7, 0.80), (0.8, 0.55)):
                w.writerow([ratio, ratio, acc, 100 * (0.91 - acc), 200, False])
        with open(p / "sweep_layers.csv", "w", newline="") as f:   # prune/sweep.py LAYER_COLUMNS
            w = csv.writer(f)
            w.writerow(["layer", "kind", "numel", "ratio", "reached_sparsity", "acc", "drop_points", "images",
                        "bf16", "fingerprint"])
            w.writerow(["(none)", "-", 0, 0.0, 0.0, 0.91, 0.0, 100, False, "synthetic"])
            for i in range(6):
                for ratio in (0.3, 0.5, 0.8):
                    drop = ratio * (i + 1) * 2
                    w.writerow([f"features.{i}.conv", "pw", 1000, ratio, ratio, 0.91 - drop / 100, drop, 100,
                                False, "synthetic"])
    return d


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = make_results(tmp_path_factory.mktemp("report") / "results")
    md, page = study_report.write_report(d)
    return d, md.read_text(), page.read_text()


def _html_rows(page: str) -> list[list[str]]:
    """Cells (tags stripped) of every table row of the page."""
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
            for tr in re.findall(r"<tr>(.*?)</tr>", page)]


def _md_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in md.splitlines() if ln.startswith("| ")]


def _key(r: dict) -> list[str]:
    return [r["config"], r["granularity"], r["calib"], r["method"]]


def test_every_row_in_both_tables_with_formatted_values(report):
    _, md, page = report
    for table_rows in (_html_rows(page), _md_rows(md)):
        for r, expected in SYNTHETIC:
            mine = [c for row in table_rows if row[:4] == _key(r) for c in row]   # this config's cells, all tables
            assert mine, f"{_key(r)} missing"
            for text in expected:
                assert text in mine, f"{text!r} not in the cells of {_key(r)}: {mine}"


def test_every_linked_plot_is_a_png(report):
    d, md, page = report
    links = set(re.findall(r'<img src="([^"]+)"', page))
    assert links == set(re.findall(r"!\[[^]]*\]\(([^)]+)\)", md))
    names = {Path(x).name for x in links}
    assert names == {"snr.png", "size.png", "latency.png", "granularity.png", "calibration.png",
                     "prune_sweep.png", "prune_layers.png", "prune_sparsity.png"}
    import matplotlib.image
    for rel in links:
        data = (d / rel).read_bytes()
        assert data[:8] == PNG_SIGNATURE, rel
        h, w = matplotlib.image.imread(d / rel).shape[:2]
        assert h > 200 and w > 400, (rel, h, w)


def test_provenance_on_page(report):
    _, md, page = report
    for text in ("SYNTHETIC test data", "synthetic.pt", "0123456789abcdef", "f" * 40, "Synthetic CPU"):
        assert text in page and text in md


def test_findings_follow_the_data(tmp_path):
    rows = [r for r, _ in SYNTHETIC]
    by = {f.key: f for f in compute_findings(rows)}
    assert by["per_tensor"].value == pytest.approx(16.9 - 23.4)
    assert "lose 6.5 dB" in by["per_tensor"].text
    assert "12.3 dB vs 0.7 dB" in by["method_adaround_W4A8"].text
    assert by["int8_size"].value == pytest.approx(8_960_000 / 2_400_000)
    assert by["dynamic_slowdown"].value == pytest.approx(1.6) and "1.60× slower" in by["dynamic_slowdown"].text
    assert by["calibration"].value == pytest.approx(20.14 - 23.4)

    changed = [dict(r) for r in rows]
    changed[2]["snr_db"] = 12.0            # per-tensor W8A8
    changed[1]["file_bytes"] = 2_240_000   # W8A8 file
    by2 = {f.key: f for f in compute_findings(changed)}
    assert "lose 11.4 dB" in by2["per_tensor"].text
    assert "4.0× smaller" in by2["int8_size"].text and "3.7× smaller" in by["int8_size"].text

    study = {c["key"]: c for c in compare_with_study(rows)}
    assert study["per_tensor"]["ours"] == "-6.5 dB" and study["per_tensor"]["verdict"] == "agrees"
    assert study["w4_snr"]["verdict"] == "agrees" and study["w8_snr"]["ours"] == "23.4 dB"
    assert {c["key"]: c["verdict"] for c in compare_with_study(changed)}["per_tensor"].startswith(
        "differs: model and data set")

    # the page shows the changed finding, not the old one
    d = make_results(tmp_path / "changed", rows=changed, prune=False)
    page = study_report.write_report(d)[1].read_text()
    assert "lose 11.4 dB" in page and "lose 6.5 dB" not in page


def test_the_study_compared_file_kind_by_file_kind(tmp_path):
    """The study's rows beside ours of the same kinds (packed W4, dynamic range as W8A8-dynamic), ratios within
    each side against the study's, and each differing verdict naming what differs, from meta.json."""
    from bench.findings import study_rows_table
    rows = [r for r, _ in SYNTHETIC] + [
        _row("W8A32", 8, None, "none", "per-channel", "n/a", "rtn", snr_db=37.0, export_status="ok",
             file_bytes=2_300_000, host_ms_median=9.0),
        _row("W4A32", 4, None, "none", "per-channel", "n/a", "rtn", snr_db=15.0, export_status="ok",
             file_bytes=1_357_000, host_ms_median=18.0)]
    meta = {"data": {"layout": "cifar", "classes": [str(i) for i in range(10)], "resolution": 32},
            "machine": {"cpu": "Synthetic CPU", "isa": "AVX2"}}
    by = {c["key"]: c for c in compare_with_study(rows, meta)}
    # FP32 / W8A8: 8.96 / 2.40 = 3.73x against the study's 13.43 / 3.92 = 3.43x +-10 %
    assert by["size_fp32_w8a8"]["ours"] == "3.73×" and by["size_fp32_w8a8"]["verdict"] == "agrees"
    assert by["size_fp32_w8a8"]["study"] == "3.43× (13.43 / 3.92 MB)"
    assert by["size_w4a32_w8a32"]["study"] == "0.59× (2.20 / 3.74 MB)"
    # W4A32 / W8A32: 1.357 / 2.3 = 0.59x, the study's 2.20 / 3.74 = 0.588x
    assert by["size_w4a32_w8a32"]["ours"] == "0.59×" and by["size_w4a32_w8a32"]["verdict"] == "agrees"
    assert by["size_w4a8_w8a8"]["verdict"] == "not measured"      # the synthetic W4A8 row has no file
    # W8A8-dynamic 6.4 ms / W8A8 4.0 ms = 1.60x: the study's "W8A16 dynamic" is that file kind
    assert by["dynamic_slowdown"]["ours"] == "1.60× (host)" and by["dynamic_slowdown"]["verdict"] == "agrees"
    # both rows timed on a phone: W8A8 6.0 / FP32 20.0 ms = 0.30x against the study's 1.22x
    assert by["speed_w8a8_fp32"]["ours"] == "0.30× (phone)"
    assert by["speed_w8a8_fp32"]["verdict"].startswith("differs: phone against phone (ours SyntheticPhone; the "
                                                       "study's a Galaxy A7 phone")
    # host only: W4A32 18.0 / W8A32 9.0 ms = 2.00x against 9.27 / 5.46 = 1.70x +-15 %: differs, and says why
    v = by["speed_w4a32_w8a32"]["verdict"]
    assert v.startswith("differs: CPU against phone (ours Synthetic CPU, AVX2, XNNPACK; the study's a Galaxy A7")
    assert v.endswith("and input size (ours 32×32; the study's 224×224)")
    assert by["w8_snr"]["verdict"] == "agrees"                                 # 23.4 dB, in the study's band
    rows_32 = [dict(r, snr_db=32.2) if r["config"] == "W8A8" and r["calib"] == "real" and r["method"] == "rtn"
               and r["granularity"] == "per-channel" else r for r in rows]
    w8 = {c["key"]: c for c in compare_with_study(rows_32, meta)}["w8_snr"]["verdict"]
    assert w8 == "differs: model and data set (ours CIFAR-10, 32×32, 10 classes; the study's ImageNet, 224×224, " \
                 "1000 classes)"
    assert not any(c["verdict"] == "differs" for c in by.values())             # never a bare "differs"
    table = {r[0]: r for r in study_rows_table(rows)}
    assert table["W8A16 dynamic"][1].startswith("W8A8-dynamic") and table["W8A16 dynamic"][5].startswith("6.40 ms")
    assert table["W16A32"][1:3] == ["not measured", "not in its table"]
    assert table["W4A32"][3] == "1.36 MB" and table["W4A8"][3] == "not exported" and table["FP32"][2] == "13.43 MB"
    d = make_results(tmp_path / "study", rows=rows, prune=False)
    md = study_report.write_report(d)[0].read_text()
    section = md.split("## Against the earlier study")[1].split("\n## ")[0]
    assert "| W4A32 | W4A32 pc rtn | 2.20 MB | 1.36 MB |" in section and "differs: CPU against phone" in section


def test_missing_inputs_say_not_measured(tmp_path):
    rows = [dict(r, device_ms=None, device=None) for r, _ in SYNTHETIC if r["method"] != "fp32"]
    d = make_results(tmp_path / "bare", rows=rows, meta=False, prune=False)
    md, page = (p.read_text() for p in study_report.write_report(d))
    for text in (md, page):
        assert "Provenance not recorded" in text
        assert "Device latency: not measured." in text
        assert re.search(r"Pruning</h2>\s*<p>Not measured|## Pruning\s+Not measured", text)
        assert "not measured" in text.split("Against the earlier study")[1]   # no FP32 file: size ratio unknown
    empty = tmp_path / "empty"
    empty.mkdir()
    md, page = (p.read_text() for p in study_report.write_report(empty))
    assert "matrix.csv is missing or empty" in md and "<img" not in page


def test_main_writes_and_reports_errors(tmp_path, capsys):
    d = make_results(tmp_path / "r", prune=False)
    out = tmp_path / "out"
    assert bench_main(["report", str(d), "--out-dir", str(out)]) == 0
    assert (out / "report.html").is_file() and (out / "report.md").is_file() and (out / "plots/snr.png").is_file()
    assert bench_main(["report", str(tmp_path / "nowhere")]) == 2
    assert "results directory not found" in capsys.readouterr().err
    # the earlier spelling `python -m bench.study_report DIR` still runs the same command
    r = subprocess.run([sys.executable, "-m", "bench.study_report", str(tmp_path / "nowhere")], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2 and "results directory not found" in r.stderr


def test_write_matrix_row_replaces_and_resumes(tmp_path):
    path = tmp_path / "m" / "matrix.csv"
    a = _row("W8A8", 8, 8, "static", "per-channel", "real", "rtn", snr_db=23.0)
    b = _row("W8A8", 8, 8, "static", "per-tensor", "real", "rtn", snr_db=17.0)
    c = _row("W4A8", 4, 8, "static", "per-channel", "real", "rtn", snr_db=math.inf)
    for r in (a, b, c):
        write_matrix_row(path, r)
    assert done_keys(path) == {("W8A8", "per-channel", "real", "rtn"), ("W8A8", "per-tensor", "real", "rtn"),
                               ("W4A8", "per-channel", "real", "rtn")}
    write_matrix_row(path, b | {"snr_db": 18.5, "top1": 0.5})   # same key: replaced in place
    rows = read_matrix(path)
    assert [r["snr_db"] for r in rows] == [23.0, 18.5, math.inf]
    assert rows[1]["top1"] == 0.5 and rows[0]["a_bits"] == 8 and rows[0]["device_ms"] is None
    assert path.read_text().splitlines()[0] == ",".join(MATRIX_COLUMNS)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    before = path.read_text()
    for bad, msg in ((a | {"speed": 1}, "unknown matrix columns"), (a | {"top1": 90.5}, "fraction"),
                     (a | {"granularity": "per-row"}, "granularity"), ({"config": "W8A8"}, "key columns")):
        with pytest.raises(ValueError, match=msg):
            write_matrix_row(path, bad)
    assert path.read_text() == before          # a refused row leaves the file as it was
    other = tmp_path / "other.csv"
    other.write_text("config,snr\nW8A8,1\n")
    with pytest.raises(ValueError, match="matrix schema"):
        write_matrix_row(other, a)


def test_collect_meta(tmp_path):
    ck = tmp_path / "model.pt"
    ck.write_bytes(b"synthetic checkpoint bytes")
    meta = collect_meta("python -m bench --matrix", ck, eval_subset="2000 test images", seed=1)
    assert meta["checkpoint_sha256"] == hashlib.sha256(b"synthetic checkpoint bytes").hexdigest()
    assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"] or "")
    assert meta["machine"]["cores"] >= 1 and meta["machine"]["cpu"]
    assert meta["seed"] == 1 and meta["date"]
    json.dumps(meta)     # what write_meta stores


def test_the_pruning_designs_table_beside_ours(tmp_path):
    """With a pruning report beside the matrix, the page sets our stages next to the design's expected figures
    (bench.study_report.DESIGN_STAGES) and states the unequal baselines."""
    import json
    d = make_results(tmp_path / "r")
    (d / "prune" / "prune_report.json").write_text(json.dumps({
        "acc_baseline": 0.824, "acc_pruned": 0.1976, "acc_bn_recalibrated": 0.8071, "acc_finetuned": 0.8030,
        "ratio": 0.7, "eval_images": 10000, "size_baseline": {"dense_bytes": 9_080_000, "gzip_bytes": 8_400_000},
        "size_pruned": {"dense_bytes": 9_080_000, "gzip_bytes": 3_000_000}}))
    md, _ = study_report.write_report(d)
    rows = {r[0]: r for r in _md_rows(md.read_text()) if r[0] in {s[0] for s in study_report.DESIGN_STAGES}}
    assert rows["baseline FP32"] == ["baseline FP32", "9.08 MB (weights)", "82.40 %", "9.0 MB", "94.50 %"]
    assert rows["pruned 70 %"][1:] == ["9.08 MB (stored dense)", "80.71 %", "9.0 MB", "93.00 %"]
    assert rows["fine-tuned"][1:] == ["8.96 MB (FP32 .tflite, sparse storage)", "80.30 %", "9.0 MB", "94.00 %"]
    assert rows["INT8"][1:] == ["2.40 MB (W8A8 .tflite)", "90.50 %", "2.3 MB", "93.50 %"]
    text = md.read_text()
    assert "ours -1.69, -2.10, +8.10 points" in text and "the design's -1.50, -0.50, -1.00" in text
