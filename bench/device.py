"""Run the official `benchmark_model` binary on an Android phone through adb.

Steps (`run_device`):
1. check the local files, then choose the device (--serial, ANDROID_SERIAL, or the only one);
2. read its ABI and model name, and find benchmark_model for that ABI (bench.binary: the given
   path, $BENCHMARK_MODEL, the per-user cache, or a download of Google's prebuilt);
3. push the binary and the models to --remote-dir and make the binary executable;
4. per model and configuration, run benchmark_model (optionally under `taskset MASK`),
   collect stdout, stderr and the exit code, parse the log, append one CSV row;
   a failed run (GPU delegate missing, crash) becomes a row with its error;
5. remove the pushed files unless --keep.
Everything goes through adbutils and the adb server, as `adb` itself would.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import signal
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from bench.binary import given_binary, resolve_binary
from bench.host import check_model
from bench.parse import parse_benchmark_output
from bench.report import append_csv, write_text

__all__ = ["DeviceConfig", "DeviceError", "DEVICE_COLUMNS", "select_device",
           "benchmark_command", "row_from_output", "run_device"]

# One row per run, in the shape of the study's results/android_benchmark_results.csv.
DEVICE_COLUMNS = [
    "device", "serial", "abi", "model", "config", "threads", "delegate",
    "init_ms", "first_ms", "warmup_avg_ms", "inference_avg_ms", "memory_mb",
    "status", "error",
]
MAX_ERROR_CHARS = 300     # the error column stays readable in a spreadsheet


class DeviceError(Exception):
    """The phone or the adb set-up is not usable; the message says what to do."""


@dataclass
class DeviceConfig:
    models: list[str] = field(default_factory=list, metadata={"help": ".tflite files to time"})
    threads: list[int] = field(default_factory=lambda: [1], metadata={
        "help": "comma-separated interpreter thread counts, e.g. 1,2"})
    xnnpack: list[bool] = field(default_factory=lambda: [True], metadata={
        "help": "comma-separated on/off: with the XNNPACK delegate or the builtin kernels"})
    runs: int = field(default=50, metadata={"help": "timed inferences per configuration"})
    warmup: int = field(default=5, metadata={"help": "untimed inferences after the first one"})
    csv: str | None = field(default=None, metadata={"help": "append one row per run to this CSV"})
    serial: str | None = field(default=None, metadata={
        "help": "device serial (default: $ANDROID_SERIAL, or the only device attached)"})
    benchmark_binary: str | None = field(default=None, metadata={
        "help": "local benchmark_model built for the phone's ABI (default: $BENCHMARK_MODEL, then the "
                "per-user cache, then a download of Google's prebuilt; see docs/phone.md)"})
    remote_dir: str = field(default="/data/local/tmp", metadata={
        "help": "directory on the phone for the binary and the models"})
    keep: bool = field(default=False, metadata={"help": "leave the pushed files on the phone"})
    use_gpu: bool = field(default=False, metadata={
        "help": "also run each model once with the GPU delegate (config GPU)"})
    taskset: str | None = field(default=None, metadata={
        "help": "CPU affinity mask in hex for taskset, e.g. f0 for the big cores of an 4+4 SoC"})
    op_profiling: bool = field(default=False, metadata={
        "help": "pass --enable_op_profiling=true (per-op table kept in the raw logs)"})
    timeout_s: float = field(default=600.0, metadata={"help": "seconds allowed per run"})

    def validate(self) -> None:
        if not self.models:
            raise ValueError("no model given: pass one or more .tflite files")
        for m in self.models:
            check_model(m)
        names = [os.path.basename(m) for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a file name, which would collide on the phone: {names}")
        given_binary(self.benchmark_binary)     # a path named but missing fails before any adb traffic
        if not self.threads or any(t < 1 for t in self.threads):
            raise ValueError(f"--threads must be positive integers, got {self.threads}")
        if self.runs < 1 or self.warmup < 0:
            raise ValueError(f"need --runs >= 1 and --warmup >= 0, got {self.runs} and {self.warmup}")
        if self.taskset is not None and not re.fullmatch(r"(0x)?[0-9a-fA-F]+", self.taskset):
            raise ValueError(f"--taskset takes a hex CPU mask such as f0, got {self.taskset!r}")
        if not self.remote_dir.startswith("/"):
            raise ValueError(f"--remote-dir must be an absolute path on the phone, got {self.remote_dir!r}")


def select_device(client, serial: str | None = None):
    """The AdbDevice to use; DeviceError for none, unauthorized, offline, or ambiguous."""
    from adbutils import AdbError

    serial = serial or os.environ.get("ANDROID_SERIAL") or None
    try:
        infos = client.list()
    except (AdbError, OSError) as e:
        raise DeviceError(f"cannot reach the adb server at {client.host}:{client.port}: {e}") from None
    if serial:
        found = [i for i in infos if i.serial == serial]
        if not found:
            attached = ", ".join(i.serial for i in infos) or "none"
            raise DeviceError(f"device {serial!r} is not attached (attached: {attached})")
        info = found[0]
    elif not infos:
        raise DeviceError("no Android device attached: plug in a phone with USB debugging on, "
                          "or `adb connect HOST:PORT` (see docs/phone.md)")
    elif len(infos) > 1:
        listed = ", ".join(f"{i.serial} ({i.state})" for i in infos)
        raise DeviceError(f"{len(infos)} devices attached: {listed}; "
                          "choose one with --serial or ANDROID_SERIAL")
    else:
        info = infos[0]
    if info.state == "unauthorized":
        raise DeviceError(f"device {info.serial} is unauthorized: unlock the phone and accept "
                          "'Allow USB debugging?' for this computer (see docs/phone.md)")
    if info.state != "device":
        raise DeviceError(f"device {info.serial} is {info.state!r}, not ready; reconnect it")
    return client.device(serial=info.serial)


def benchmark_command(binary: str, graph: str, threads: int, xnnpack: bool, gpu: bool,
                      runs: int, warmup: int, taskset: str | None = None,
                      op_profiling: bool = False) -> str:
    """The shell command line for one run (remote paths), with the study's flags."""
    args = [binary, f"--graph={graph}", f"--num_threads={threads}",
            f"--use_xnnpack={str(xnnpack and not gpu).lower()}", f"--use_gpu={str(gpu).lower()}",
            f"--num_runs={runs}", f"--warmup_runs={warmup}"]
    if op_profiling:
        args.append("--enable_op_profiling=true")
    if taskset:
        args = ["taskset", taskset] + args
    return " ".join(shlex.quote(a) for a in args)


def _status(exit_code: int, log) -> tuple[str, str]:
    errors = " | ".join(log.errors[-3:])
    if exit_code >= 128:      # the shell reports death by signal N as 128 + N
        try:
            name = signal.Signals(exit_code - 128).name
        except ValueError:
            name = f"signal {exit_code - 128}"
        msg = f"crashed: {name} (exit {exit_code})"
        return "crashed", (msg + (f": {errors}" if errors else ""))[:MAX_ERROR_CHARS]
    if exit_code != 0:
        return "failed", (f"exit {exit_code}: {errors or 'no error line in the log'}")[:MAX_ERROR_CHARS]
    if not log.has_timings:
        return "no_timings", (f"exit 0 but no timings in the log. {errors}").strip()[:MAX_ERROR_CHARS]
    return "ok", ""


def row_from_output(output: str, exit_code: int, base: dict) -> dict:
    """One CSV row from a run's combined log and exit code; times in ms, memory in MB."""
    log = parse_benchmark_output(output)
    status, error = _status(exit_code, log)
    ms = lambda us: None if us is None else round(us / 1e3, 4)  # noqa: E731
    # memory: the footprint delta at the end of the run, which every tool version prints;
    # the periodic-monitoring peak of newer tools when that is all there is.
    memory = log.mem_overall_mb if log.mem_overall_mb is not None else log.mem_peak_mb
    return {**base, "init_ms": ms(log.init_us), "first_ms": ms(log.first_us),
            "warmup_avg_ms": ms(log.warmup_avg_us), "inference_avg_ms": ms(log.inference_avg_us),
            "memory_mb": memory, "status": status, "error": error}


def _shell(d, cmd: str, timeout: float):
    return d.shell2(cmd, timeout=timeout, v2=True)


def _configs(cfg: DeviceConfig) -> list[tuple[str, int, bool, bool, str]]:
    """(config name, threads, xnnpack, gpu, delegate) in the study's naming (CPU-4T, GPU)."""
    out = [(f"CPU-{t}T" + ("" if x else "-noXNN"), t, x, False, "xnnpack" if x else "none")
           for t in cfg.threads for x in cfg.xnnpack]
    if cfg.use_gpu:
        out.append(("GPU", cfg.threads[0], False, True, "gpu"))
    return out


def run_device(cfg: DeviceConfig, client=None, log_dir: str | None = None) -> list[dict]:
    """Steps 1-5 of the module docstring; returns the rows also appended to cfg.csv."""
    import adbutils

    cfg.validate()
    client = client or adbutils.AdbClient()
    try:
        return _session(cfg, client, log_dir)
    except adbutils.AdbError as e:      # lost device, full storage, read-only remote dir ...
        raise DeviceError(f"adb failed: {e}") from None


def _session(cfg: DeviceConfig, client, log_dir: str | None) -> list[dict]:
    import adbutils

    d = select_device(client, cfg.serial)
    abi = _shell(d, "getprop ro.product.cpu.abi", 30).output.strip()
    name = _shell(d, "getprop ro.product.model", 30).output.strip()
    binary = resolve_binary(cfg.benchmark_binary, abi)
    print(f"benchmark_model: {binary.path} ({binary.source})")
    cfg.benchmark_binary = binary.path     # so the config saved beside the CSV names the binary that ran

    remote_bin = posixpath.join(cfg.remote_dir, "benchmark_model")
    remote_models = {m: posixpath.join(cfg.remote_dir, os.path.basename(m)) for m in cfg.models}
    pushed: list[str] = []
    rows: list[dict] = []
    try:
        _shell(d, f"mkdir -p {shlex.quote(cfg.remote_dir)}", 30)
        for local, remote, mode in [(cfg.benchmark_binary, remote_bin, 0o755)] + \
                [(m, r, 0o644) for m, r in remote_models.items()]:
            d.sync.push(local, remote, mode=mode)
            pushed.append(remote)
        chmod = _shell(d, f"chmod 755 {shlex.quote(remote_bin)}", 30)
        if chmod.returncode != 0:
            raise DeviceError(f"cannot make {remote_bin} executable: {chmod.output.strip()}")

        runs = [(m, c) for m in cfg.models for c in _configs(cfg)]
        for model, (config, threads, xnn, gpu, delegate) in tqdm(runs, desc=f"{d.serial}", unit="run", disable=None):
            base = {"device": name, "serial": d.serial, "abi": abi, "model": os.path.basename(model),
                    "config": config, "threads": threads, "delegate": delegate}
            cmd = benchmark_command(remote_bin, remote_models[model], threads, xnn, gpu,
                                    cfg.runs, cfg.warmup, cfg.taskset, cfg.op_profiling)
            try:
                res = _shell(d, cmd, cfg.timeout_s)
                output, code = res.output, res.returncode
            except adbutils.AdbTimeout:
                output, code = "", None
            if code is None:
                row = {**base, "status": "timeout", "error": f"no result within {cfg.timeout_s} s"}
            else:
                row = row_from_output(output, code, base)
            rows.append(row)
            if log_dir:
                _save_log(log_dir, base, cmd, output, code)
            if cfg.csv:
                append_csv(cfg.csv, [row], DEVICE_COLUMNS)
    finally:
        if pushed and not cfg.keep:
            try:
                _shell(d, "rm -f " + " ".join(shlex.quote(p) for p in pushed), 30)
            except adbutils.AdbError as e:
                print(f"warning: could not remove {pushed} from the phone: {e}", file=sys.stderr)
    return rows


def _save_log(log_dir: str, base: dict, cmd: str, output: str, code: int | None) -> None:
    stem = re.sub(r"[^\w.-]+", "_", f"{base['serial']}_{base['model']}_{base['config']}")
    write_text(os.path.join(log_dir, stem + ".log"), f"$ {cmd}\n# exit code: {code}\n{output}")
