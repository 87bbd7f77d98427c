"""`python -m bench --device` through the real adb server and the project's test device.

The adb server is the binary shipped with adbutils, on a port of the test's own
(ANDROID_ADB_SERVER_PORT) with its own HOME; the devices are tests/adbdevice/server.py
processes on 127.0.0.1, reached with `adb connect`; the binary pushed to them is the
stand-in tests/adbdevice/benchmark_model.py. Every process is stopped by pid.
"""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.device import DEVICE_COLUMNS, DeviceError, select_device
from tests.bench_fixtures import adb_lab, phone, standin_binary, tiny_models  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def on_server(monkeypatch):
    """Point adbutils (and so `python -m bench`) at a given test adb server."""
    def use(server):
        monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(server.port))
        monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    return use


def _affinity_mask() -> str:
    return format(sum(1 << c for c in os.sched_getaffinity(0)), "x")   # CPUs we may use


def test_end_to_end(phone, tiny_models, standin_binary, tmp_path):
    server, dev = phone
    crash = tmp_path / "crash_model.tflite"      # the stand-in dies of SIGSEGV on this name
    shutil.copy(tiny_models["int8"], crash)
    out = tmp_path / "results" / "android.csv"
    args = ["--device", str(tiny_models["int8"]), str(tiny_models["float"]), str(crash),
            "--threads", "1", "--use-gpu", "--benchmark-binary", str(standin_binary),
            "--runs", "20", "--warmup", "2", "--taskset", _affinity_mask(), "--op-profiling",
            "--csv", str(out)]
    # As a user runs it: `python -m bench --device ...` in a process of its own.
    env = {**os.environ, "ANDROID_ADB_SERVER_PORT": str(server.port)}
    env.pop("ANDROID_SERIAL", None)
    proc = subprocess.run([sys.executable, "-m", "bench", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == DEVICE_COLUMNS
    by = {(r["model"], r["config"]): r for r in rows}
    assert sorted(by) == sorted((m, c) for m in ("tiny_int8.tflite", "tiny_float.tflite", "crash_model.tflite")
                                for c in ("CPU-1T", "GPU"))
    for r in rows:
        assert (r["device"], r["serial"], r["abi"]) == ("Test Phone", dev.serial, "arm64-v8a")

    for m in ("tiny_int8.tflite", "tiny_float.tflite"):
        good = by[(m, "CPU-1T")]
        assert (good["status"], good["error"], good["threads"], good["delegate"]) == ("ok", "", "1", "xnnpack")
        t = {k: float(good[k]) for k in ("init_ms", "first_ms", "warmup_avg_ms", "inference_avg_ms", "memory_mb")}
        assert all(v > 0 for v in t.values()), t
        assert t["inference_avg_ms"] < 50       # tiny model: microseconds, not a unit slip

        gpu = by[(m, "GPU")]
        assert (gpu["status"], gpu["delegate"]) == ("failed", "gpu")
        assert gpu["error"].startswith("exit 1: ") and "Failed to apply GPU delegate." in gpu["error"]
        assert gpu["inference_avg_ms"] == ""

    for c in ("CPU-1T", "GPU"):
        crashed = by[("crash_model.tflite", c)]
        assert crashed["status"] == "crashed"
        assert crashed["error"].startswith("crashed: SIGSEGV (exit 139)")

    # flags reached the binary; raw logs beside the CSV
    log = (out.parent / "android_logs" / f"{dev.serial.replace(':', '_')}_tiny_int8.tflite_CPU-1T.log").read_text()
    assert log.startswith(f"$ taskset {_affinity_mask()} /data/local/tmp/benchmark_model --graph=/data/local/tmp/tiny_int8.tflite")
    assert "--num_threads=1 --use_xnnpack=true --use_gpu=false --num_runs=20 --warmup_runs=2" in log
    assert "INFO: Enable op profiling: [1]" in log and "Operator-wise Profiling Info" in log
    # pushed files removed (no --keep)
    assert sorted(os.listdir(dev.root / "data/local/tmp")) == []
    assert "GPU: failed: exit 1" in proc.stdout


def test_keep_serial_and_append(phone, on_server, tiny_models, standin_binary, tmp_path):
    server, dev = phone
    on_server(server)
    out = tmp_path / "a.csv"
    base = ["--device", str(tiny_models["int8"]), "--benchmark-binary", str(standin_binary),
            "--runs", "5", "--warmup", "1", "--xnnpack", "off", "--csv", str(out)]
    assert main(base + ["--serial", dev.serial, "--keep", "--remote-dir", "/data/local/tmp/bench"]) == 0
    kept = dev.root / "data/local/tmp/bench"
    assert sorted(os.listdir(kept)) == ["benchmark_model", "tiny_int8.tflite"]
    assert os.access(kept / "benchmark_model", os.X_OK)
    assert (kept / "tiny_int8.tflite").read_bytes() == tiny_models["int8"].read_bytes()
    shutil.rmtree(kept)
    assert main(base) == 0                     # the only device, no serial needed
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert {(r["config"], r["delegate"]) for r in rows} == {("CPU-1T-noXNN", "none")}
    assert out.read_text().count("device,serial,abi") == 1     # one header


def test_no_device(adb_lab, on_server, tiny_models, standin_binary, capsys):
    on_server(adb_lab.server())
    code = main(["--device", str(tiny_models["int8"]), "--benchmark-binary", str(standin_binary)])
    assert code == 2
    assert "no Android device attached" in capsys.readouterr().err


def test_several_devices_need_serial(adb_lab, on_server, tiny_models, standin_binary, monkeypatch, capsys):
    server = adb_lab.server()
    a, b = adb_lab.device(server), adb_lab.device(server)
    on_server(server)
    args = ["--device", str(tiny_models["int8"]), "--benchmark-binary", str(standin_binary)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 devices attached" in err and a.serial in err and b.serial in err and "--serial" in err
    assert select_device(server.client(), b.serial).serial == b.serial
    monkeypatch.setenv("ANDROID_SERIAL", a.serial)
    assert select_device(server.client()).serial == a.serial
    with pytest.raises(DeviceError, match="'127.0.0.1:1' is not attached"):
        select_device(server.client(), "127.0.0.1:1")


def test_unauthorized(adb_lab, on_server, tiny_models, standin_binary, capsys):
    server = adb_lab.server()
    dev = adb_lab.device(server, "--unauthorized", state="unauthorized")
    on_server(server)
    assert main(["--device", str(tiny_models["int8"]), "--benchmark-binary", str(standin_binary)]) == 2
    err = capsys.readouterr().err
    assert f"device {dev.serial} is unauthorized" in err and "Allow USB debugging" in err


@pytest.mark.parametrize("args, message", [
    (["--benchmark-binary", "/nonexistent/benchmark_model"], "benchmark binary not found: /nonexistent/benchmark_model"),
    (["--taskset", "big"], "--taskset takes a hex CPU mask such as f0, got 'big'"),
])
def test_bad_device_inputs(tiny_models, standin_binary, capsys, args, message):
    # Checked before any adb traffic: no server is needed for these. (A missing binary is
    # no longer an input error: tests/test_bench_binary.py covers the lookup and download.)
    assert main(["--device", str(tiny_models["int8"]), *args] +
                ([] if "--benchmark-binary" in args else ["--benchmark-binary", str(standin_binary)])) == 2
    assert message in capsys.readouterr().err


def test_unreadable_model(tmp_path, standin_binary, capsys):
    bad = tmp_path / "half.tflite"
    bad.write_bytes(b"\x1c\x00\x00\x00TF")     # cut short before the identifier
    assert main(["--device", str(bad), "--benchmark-binary", str(standin_binary)]) == 2
    assert f"{bad} is not a .tflite file" in capsys.readouterr().err
