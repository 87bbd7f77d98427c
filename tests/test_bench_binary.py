"""bench.binary: finding, fetching, checking and caching the phone's benchmark_model, offline.

The download location is an http.server on 127.0.0.1 in a thread of the test, named by
$MNV2_BENCHMARK_MODEL_URL; the cache is $XDG_CACHE_HOME under tmp_path. What it serves is the
stand-in tests/adbdevice/benchmark_model.py behind a synthetic ELF header for the phone's ABI,
which the test device runs as its own executable (tests/adbdevice/server.py). Nothing here
reaches the network.
"""

import base64
import csv
import hashlib
import http.server
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.binary import (ABIS, OFFICIAL_URL, URL_ENV, BinaryError, base_url, cache_path,
                          check_elf, resolve_binary)
from tests.bench_fixtures import STANDIN_SCRIPT, phone, tiny_models  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


# ---------------------------------------------------------------------------- files
def elf_header(bits: int, machine: int, e_type: int = 3, little: bool = True) -> bytes:
    """An ELF file header (52 or 64 bytes): e_ident, then e_type, e_machine, e_version = 1."""
    order = "<" if little else ">"
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1 if little else 2, 1]) + bytes(9)
    return (ident + struct.pack(order + "HHI", e_type, machine, 1)).ljust(52 if bits == 32 else 64, b"\0")


def elf_standin(abi: str = "arm64-v8a") -> bytes:
    """The stand-in benchmark_model as the test device's executable for `abi`: ELF header + zip app."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("__main__.py", STANDIN_SCRIPT.read_text())
    return elf_header(ABIS[abi].bits, ABIS[abi].machine) + buf.getvalue()


def md5_header(data: bytes) -> dict:
    """The x-goog-hash header Google Cloud Storage sends with an object (crc32c not checked)."""
    return {"x-goog-hash": "crc32c=AAAAAA==,md5=" + base64.b64encode(hashlib.md5(data).digest()).decode()}


# ---------------------------------------------------------------------------- server
@dataclass
class Served:
    body: bytes
    headers: dict = field(default_factory=dict)
    send: int | None = None      # bytes actually sent before closing; fewer = a cut connection


class Mirror:
    """A download location on 127.0.0.1: path -> Served, and the paths asked for."""

    def __init__(self):
        self.files: dict[str, Served] = {}
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                f = mirror.files.get(self.path)
                if f is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(f.body)))
                for k, v in f.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(f.body[:f.send])     # HTTP/1.0: the connection closes after this

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/nightly"

    def serve(self, abi: str, served: Served) -> None:
        self.files[f"/nightly/{ABIS[abi].stem}_benchmark_model"] = served

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()      # the port now refuses connections
            self.thread.join()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A running Mirror named by $MNV2_BENCHMARK_MODEL_URL, an empty cache, no proxy, no $BENCHMARK_MODEL."""
    m = Mirror()
    monkeypatch.setenv(URL_ENV, m.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCHMARK_MODEL", raising=False)
    for v in PROXY_VARS:
        monkeypatch.delenv(v, raising=False)
    yield m
    m.stop()


def cached_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/nightly"    # nothing listens once closed


# ---------------------------------------------------------------------------- ELF
@pytest.mark.parametrize("abi", list(ABIS))
def test_elf_check_accepts_only_its_abi(abi):
    a = ABIS[abi]
    check_elf(elf_header(a.bits, a.machine)[:20], abi, "f")              # PIE (ET_DYN)
    check_elf(elf_header(a.bits, a.machine, e_type=2)[:20], abi, "f")    # ET_EXEC
    for other, b in ABIS.items():
        if other != abi:
            with pytest.raises(BinaryError, match=f"{b.bits}-bit little-endian ELF for e_machine {b.machine}; "
                                                  f"the phone's ABI {abi} needs {a.bits}-bit"):
                check_elf(elf_header(b.bits, b.machine)[:20], abi, "f")
    with pytest.raises(BinaryError, match="big-endian"):
        check_elf(elf_header(a.bits, a.machine, little=False)[:20], abi, "f")
    with pytest.raises(BinaryError, match="an ELF of type 1, not an executable"):
        check_elf(elf_header(a.bits, a.machine, e_type=1)[:20], abi, "f")      # ET_REL: an object file
    with pytest.raises(BinaryError, match=r"f is not an ELF executable \(it starts with b'<!DOCTYPE html>"):
        check_elf(b"<!DOCTYPE html><html>", abi, "f")


# ---------------------------------------------------------------------------- download and cache
def test_download_then_cache_then_reuse_offline(mirror, tmp_path):
    body = elf_standin()
    mirror.serve("arm64-v8a", Served(body, md5_header(body)))
    got = resolve_binary(None, "arm64-v8a")
    dest = tmp_path / "cache/mnv2-compress/benchmark_model/arm64-v8a/benchmark_model"
    assert got.path == str(dest) == str(cache_path("arm64-v8a"))
    assert got.source.startswith(f"downloaded from {mirror.url}/android_aarch64_benchmark_model")
    assert dest.read_bytes() == body and os.access(dest, os.X_OK)
    record = json.loads(dest.with_name("benchmark_model.json").read_text())
    assert (record["url"], record["abi"], record["bytes"], record["sha256"]) == (
        f"{mirror.url}/android_aarch64_benchmark_model", "arm64-v8a", len(body), hashlib.sha256(body).hexdigest())
    assert cached_files(tmp_path) == ["mnv2-compress/benchmark_model/arm64-v8a/benchmark_model",
                                      "mnv2-compress/benchmark_model/arm64-v8a/benchmark_model.json"]
    assert mirror.requests == ["/nightly/android_aarch64_benchmark_model"]

    mirror.stop()                               # offline: the cached copy serves
    again = resolve_binary(None, "arm64-v8a")
    assert again.path == str(dest) and again.source.startswith(f"cache: {mirror.url}/android_aarch64")
    assert mirror.requests == ["/nightly/android_aarch64_benchmark_model"]


def test_truncated_download_is_refused(mirror, tmp_path):
    body = elf_standin()
    mirror.serve("arm64-v8a", Served(body, send=len(body) - 1000))
    with pytest.raises(BinaryError, match=f"truncated: {len(body) - 1000} of {len(body)} bytes; nothing was cached"):
        resolve_binary(None, "arm64-v8a")
    assert cached_files(tmp_path) == []


def test_checksum_mismatch_is_refused(mirror, tmp_path):
    body = elf_standin()
    mirror.serve("arm64-v8a", Served(body, md5_header(body[:-1] + b"x")))     # same length, other bytes
    with pytest.raises(BinaryError, match="does not match the MD5 the server sent"):
        resolve_binary(None, "arm64-v8a")
    assert cached_files(tmp_path) == []


@pytest.mark.parametrize("served, message", [
    (elf_header(32, 40) + b"\0" * 4000, "is a 32-bit little-endian ELF for e_machine 40; the phone's ABI arm64-v8a"),
    (elf_header(64, 62) + b"\0" * 4000, "is a 64-bit little-endian ELF for e_machine 62; the phone's ABI arm64-v8a"),
    (b"<!DOCTYPE html><title>Error</title>", "is not an ELF executable"),
])
def test_wrong_abi_download_is_refused(mirror, tmp_path, served, message):
    mirror.serve("arm64-v8a", Served(served, md5_header(served)))
    with pytest.raises(BinaryError, match=message):
        resolve_binary(None, "arm64-v8a")
    assert cached_files(tmp_path) == []


def test_damaged_cache_is_fetched_again(mirror, tmp_path, capsys):
    body = elf_standin()
    mirror.serve("arm64-v8a", Served(body))                    # no x-goog-hash: a plain mirror
    dest = Path(resolve_binary(None, "arm64-v8a").path)
    dest.write_bytes(body[:-10])                               # truncated on disk
    assert resolve_binary(None, "arm64-v8a").source.startswith("downloaded from")
    assert f"has {len(body) - 10} bytes" in capsys.readouterr().err
    assert dest.read_bytes() == body and len(mirror.requests) == 2

    dest.write_bytes(body[:-1] + b"x")                         # same size, changed: sha256 differs
    mirror.stop()
    with pytest.raises(BinaryError, match="is unreachable"):
        resolve_binary(None, "arm64-v8a")
    assert "sha256" in capsys.readouterr().err and cached_files(tmp_path) == []


def test_offline_says_where_to_get_it(mirror, monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv(URL_ENV, url)
    with pytest.raises(BinaryError) as e:                       # connection refused
        resolve_binary(None, "armeabi-v7a")
    msg = str(e.value)
    assert msg.startswith(f"cannot download benchmark_model: {url}/android_arm_benchmark_model is unreachable (")
    assert "Connection refused" in msg and "--benchmark-binary PATH or set BENCHMARK_MODEL=PATH" in msg
    assert "\n" not in msg

    with socket.socket() as silent:                             # accepts (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(BinaryError, match=r"is unreachable \(timed out\)"):
            resolve_binary(None, "arm64-v8a", timeout=0.5)


def test_lookup_order_and_unpublished_abis(mirror, tmp_path, monkeypatch):
    own = tmp_path / "my_benchmark_model"
    own.write_bytes(elf_header(64, 183))
    env_bin = tmp_path / "env_benchmark_model"
    env_bin.write_bytes(elf_header(64, 183))
    monkeypatch.setenv("BENCHMARK_MODEL", str(env_bin))
    assert resolve_binary(str(own), "arm64-v8a").source == "--benchmark-binary"
    got = resolve_binary(None, "arm64-v8a")
    assert (got.path, got.source) == (str(env_bin), "$BENCHMARK_MODEL")
    monkeypatch.setenv("BENCHMARK_MODEL", str(tmp_path / "gone"))
    with pytest.raises(ValueError, match=r"benchmark binary not found: .*/gone \(from \$BENCHMARK_MODEL\)"):
        resolve_binary(None, "arm64-v8a")
    monkeypatch.delenv("BENCHMARK_MODEL")

    monkeypatch.delenv(URL_ENV)                                  # the official location: no x86 builds
    assert base_url() == OFFICIAL_URL
    with pytest.raises(BinaryError, match="Google publishes no prebuilt benchmark_model for x86_64 .*"
                                          "--config=android_x86_64"):
        resolve_binary(None, "x86_64")
    with pytest.raises(BinaryError, match="no prebuilt benchmark_model for the phone's ABI 'mips'"):
        resolve_binary(None, "mips")
    assert mirror.requests == [] and cached_files(tmp_path) == []


def test_cache_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path("x86") == tmp_path / "xdg/mnv2-compress/benchmark_model/x86/benchmark_model"
    for value in ("", "relative/cache"):                         # unset or relative: ~/.cache
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert cache_path("x86") == tmp_path / "home/.cache/mnv2-compress/benchmark_model/x86/benchmark_model"


# ---------------------------------------------------------------------------- the command
def test_missing_env_binary_stops_before_adb(tiny_models, monkeypatch, capsys):
    # Checked in DeviceConfig.validate, before any adb traffic: no server is needed.
    monkeypatch.setenv("BENCHMARK_MODEL", "/nonexistent/benchmark_model")
    assert main(["--device", str(tiny_models["int8"])]) == 2
    assert ("error: benchmark binary not found: /nonexistent/benchmark_model (from $BENCHMARK_MODEL)"
            in capsys.readouterr().err)


def test_bench_device_downloads_and_times(phone, tiny_models, mirror, tmp_path, monkeypatch, capsys):
    server, dev = phone
    dev_abi = "arm64-v8a"                                       # the test device's default ABI
    body = elf_standin(dev_abi)
    mirror.serve(dev_abi, Served(body, md5_header(body)))
    out = tmp_path / "results" / "android.csv"
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k != "ANDROID_SERIAL"}
    env["ANDROID_ADB_SERVER_PORT"] = str(server.port)
    # As a user runs it, without --benchmark-binary: `python -m bench --device MODEL`.
    proc = subprocess.run([sys.executable, "-m", "bench", "--device", str(tiny_models["int8"]),
                           "--runs", "5", "--warmup", "1", "--csv", str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dest = cache_path(dev_abi)
    assert f"benchmark_model: {dest} (downloaded from {mirror.url}/android_aarch64_benchmark_model" in proc.stdout
    assert dest.read_bytes() == body
    rows = list(csv.DictReader(out.open()))
    assert [(r["model"], r["config"], r["abi"], r["status"]) for r in rows] == [
        ("tiny_int8.tflite", "CPU-1T", "arm64-v8a", "ok")]
    assert 0 < float(rows[0]["inference_avg_ms"]) < 50       # tiny model: microseconds, not a unit slip
    saved = json.loads((out.parent / "android.config.json").read_text())
    assert saved["config"]["benchmark_binary"] == str(dest)
    assert sorted(os.listdir(dev.root / "data/local/tmp")) == []

    # Offline afterwards: the cache serves, in-process this time.
    mirror.stop()
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(server.port))
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    assert main(["--device", str(tiny_models["int8"]), "--runs", "3", "--warmup", "0"]) == 0
    assert f"benchmark_model: {dest} (cache: {mirror.url}" in capsys.readouterr().out

    # Offline with nothing cached: one line, exit 2.
    for p in dest.parent.iterdir():
        p.unlink()
    assert main(["--device", str(tiny_models["int8"])]) == 2
    downloading, error = capsys.readouterr().err.strip().splitlines()
    assert downloading == f"benchmark_model: downloading {mirror.url}/android_aarch64_benchmark_model"
    assert error.startswith("python -m bench: error: cannot download benchmark_model:") and "is unreachable" in error
    assert "--benchmark-binary PATH or set BENCHMARK_MODEL=PATH" in error
