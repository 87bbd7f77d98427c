"""Fixtures shared by the bench tests: tiny .tflite models, an adb server, test devices.

Import the fixtures into a test module (`from tests.bench_fixtures import tiny_models`);
tests/conftest.py is not used. Every process started here is stopped by its pid in a
finalizer, and only 127.0.0.1 is used.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["tiny_models", "standin_binary", "adb_lab", "phone", "AdbLab", "AdbServer",
           "TestDeviceProc", "adb_path", "adb_env", "start_adb_server", "start_device", "stop_pid"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVER_SCRIPT = HERE / "adbdevice" / "server.py"
STANDIN_SCRIPT = HERE / "adbdevice" / "benchmark_model.py"
EMULATOR_PORTS = range(5555, 5586)   # the adb server scans these on localhost


# ---------------------------------------------------------------------------- models
def _build_models(out: Path) -> dict[str, Path]:
    """A tiny float and a tiny fully-INT8 .tflite (conv 3->8, ReLU6, avg pool, 1x1 classifier)."""
    import litert_torch
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    qd = torch.ops.quantized_decomposed

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.act = nn.ReLU6()
            self.fc = nn.Conv2d(8, 10, 1, bias=False)   # classifier as 1x1 conv

        def forward(self, x):            # (1, 3, 32, 32) -> (1, 10)
            x = F.adaptive_avg_pool2d(self.act(self.conv(x)), 1)
            return self.fc(x).squeeze(3).squeeze(2)

    class TinyInt8(Tiny):
        # Static Q/DQ in the patterns of docs/notes litert-export.md: per-tensor int8
        # activations (float scale, int zero-point), per-channel symmetric int8 weights.
        def __init__(self):
            super().__init__()
            for name in ("conv", "fc"):      # scales as buffers: the converter needs constants
                w = getattr(self, name).weight.detach()
                self.register_buffer(f"{name}_s", w.abs().amax(dim=(1, 2, 3)) / 127)
                self.register_buffer(f"{name}_zp", torch.zeros(w.shape[0], dtype=torch.int64))

        def _w(self, name):
            w, s, zp = getattr(self, name).weight, getattr(self, f"{name}_s"), getattr(self, f"{name}_zp")
            q = qd.quantize_per_channel(w, s, zp, 0, -127, 127, torch.int8)
            return qd.dequantize_per_channel(q, s, zp, 0, -127, 127, torch.int8)

        @staticmethod
        def _a(x, s, z):
            q = qd.quantize_per_tensor(x, s, z, -128, 127, torch.int8)
            return qd.dequantize_per_tensor(q, s, z, -128, 127, torch.int8)

        def forward(self, x):
            x = self._a(x, 4.0 / 255, 0)
            x = self._a(self.act(F.conv2d(x, self._w("conv"), padding=1)), 6.0 / 255, -128)
            x = self._a(F.adaptive_avg_pool2d(x, 1), 6.0 / 255, -128)
            x = self._a(F.conv2d(x, self._w("fc")), 8.0 / 255, 0)
            return x.squeeze(3).squeeze(2)

    sample = (torch.randn(1, 3, 32, 32),)
    paths = {"float": out / "tiny_float.tflite", "int8": out / "tiny_int8.tflite"}
    litert_torch.convert(Tiny().eval(), sample).export(str(paths["float"]))
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    quant = QuantConfig(pt2e_quantizer=PT2EQuantizer().set_global(get_symmetric_quantization_config()))
    litert_torch.convert(TinyInt8().eval(), sample, quant_config=quant).export(str(paths["int8"]))
    return paths


_BUILT: dict[str, dict[str, Path]] = {}   # one build per session, whichever module asks first


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    # Imported into several test modules, this fixture has one definition per module;
    # the cache keeps it to a single conversion (~5 s) per session.
    if "models" not in _BUILT:
        _BUILT["models"] = _build_models(tmp_path_factory.mktemp("models"))
    return _BUILT["models"]


@pytest.fixture(scope="session")
def standin_binary(tmp_path_factory) -> Path:
    """The stand-in benchmark_model as an executable with this Python in its #! line."""
    path = tmp_path_factory.mktemp("bin") / "benchmark_model"
    path.write_text(f"#!{sys.executable}\n" + STANDIN_SCRIPT.read_text())
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------- processes
def adb_path() -> str:
    import adbutils
    return adbutils.adb_path()


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in EMULATOR_PORTS and port != 5037:
            return port


def stop_pid(proc: subprocess.Popen) -> None:
    """Stop one process we started, by its pid: SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


@dataclass
class AdbServer:
    port: int
    proc: subprocess.Popen
    env: dict

    def client(self):
        import adbutils
        return adbutils.AdbClient(host="127.0.0.1", port=self.port)

    def adb(self, *args: str, timeout: float = 20) -> str:
        r = subprocess.run([adb_path(), "-P", str(self.port), *args], env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        return r.stdout + r.stderr


def adb_env(home: Path, port: int) -> dict:
    """Environment of an isolated adb server: own port, own HOME for its key, no mDNS/USB."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANDROID_", "ADB_"))}
    env.update(HOME=str(home), ANDROID_USER_HOME=str(home / ".android"),
               ANDROID_ADB_SERVER_PORT=str(port), ADB_MDNS="0", ADB_MDNS_AUTO_CONNECT="0",
               ADB_LIBUSB="0")
    return env


def start_adb_server(tmp: Path) -> AdbServer:
    port = _free_port()
    home = tmp / "adbhome"
    home.mkdir(parents=True, exist_ok=True)
    env = adb_env(home, port)
    proc = subprocess.Popen([adb_path(), "-L", f"tcp:localhost:{port}",   # loopback only
                             "nodaemon", "server"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "adb-server.log", "w"))
    server = AdbServer(port, proc, env)
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"adb server exited: {(tmp / 'adb-server.log').read_text()[-500:]}")
        # A plain socket, not adbutils: adbutils would start a default server on 5037
        # if this one were not listening yet.
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    stop_pid(proc)
    raise RuntimeError("adb server did not start in 20 s")


@dataclass
class TestDeviceProc:
    port: int
    proc: subprocess.Popen
    root: Path

    @property
    def serial(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_device(tmp: Path, server: AdbServer, name: str, *extra: str,
                 state: str = "device") -> TestDeviceProc:
    """Start a test device, `adb connect` it, and wait for the adb server to list it in `state`."""
    root = tmp / name
    proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "--root", str(root), *extra],
                            stdout=subprocess.PIPE, stderr=open(tmp / f"{name}.log", "w"), text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        stop_pid(proc)
        raise RuntimeError(f"test device did not start: {(tmp / f'{name}.log').read_text()[-500:]}")
    dev = TestDeviceProc(int(line.split()[1]), proc, root)
    assert dev.port not in EMULATOR_PORTS
    server.client().connect(dev.serial, timeout=20)
    deadline = time.time() + 20
    while time.time() < deadline:
        states = {i.serial: i.state for i in server.client().list()}
        if states.get(dev.serial) == state:
            return dev
        time.sleep(0.1)
    stop_pid(proc)
    raise RuntimeError(f"{dev.serial} not listed as {state}: {states}")


class AdbLab:
    """Adb servers and test devices started for a test; `close()` stops each by pid."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.n = 0

    def server(self) -> AdbServer:
        self.n += 1
        d = self.tmp / f"adb{self.n}"
        d.mkdir(parents=True, exist_ok=True)
        s = start_adb_server(d)
        self.procs.append(s.proc)
        return s

    def device(self, server: AdbServer, *extra: str, state: str = "device") -> TestDeviceProc:
        self.n += 1
        dev = start_device(self.tmp, server, f"device{self.n}", *extra, state=state)
        self.procs.append(dev.proc)
        return dev

    def close(self) -> None:
        for p in reversed(self.procs):
            stop_pid(p)


@pytest.fixture
def adb_lab(tmp_path):
    lab = AdbLab(tmp_path)
    yield lab
    lab.close()


@pytest.fixture(scope="module")
def phone(tmp_path_factory):
    """One adb server with one authorized test device, shared by a module's tests."""
    lab = AdbLab(tmp_path_factory.mktemp("phone"))
    try:
        server = lab.server()
        yield server, lab.device(server, "--model", "Test Phone")
    finally:
        lab.close()
