"""Time .tflite files on this computer with the ai_edge_litert interpreter.

Each (model, threads, XNNPACK) runs in a child process of its own (bench.worker), so the
memory figures are that model's alone, like one `benchmark_model` invocation. Reported
per row, as benchmark_model does: init time, first inference, warm-up average, and the
timed runs as mean, median, p5/p95, std, min, max; memory as RSS growth from the start
of the child (MB).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from bench import worker
from bench.stats import summarize
from common.machine import cpu_summary

__all__ = ["HostConfig", "HOST_COLUMNS", "check_model", "run_host", "runtime_version", "host_description"]

@dataclass
class HostConfig:
    models: list[str] = field(default_factory=list, metadata={"help": ".tflite files to time"})
    threads: list[int] = field(default_factory=lambda: [1], metadata={
        "help": "comma-separated interpreter thread counts, e.g. 1,2"})
    xnnpack: list[bool] = field(default_factory=lambda: [True], metadata={
        "help": "comma-separated on/off: with the XNNPACK delegate or the builtin kernels"})
    runs: int = field(default=50, metadata={"help": "timed inferences per configuration"})
    warmup: int = field(default=5, metadata={"help": "untimed inferences after the first one"})
    budget_s: float | None = field(default=None, metadata={
        "help": "time budget in seconds per configuration; replaces --runs when given"})
    csv: str | None = field(default=None, metadata={
        "help": "results CSV: replaced by bench host, one row appended per run by bench phone"})

    def validate(self) -> None:
        if not self.models:
            raise ValueError("no model given: pass one or more .tflite files")
        for m in self.models:
            check_model(m)
        if not self.threads or any(t < 1 for t in self.threads):
            raise ValueError(f"--threads must be positive integers, got {self.threads}")
        if self.runs < 1:
            raise ValueError(f"--runs must be at least 1, got {self.runs}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ValueError(f"--budget-s must be positive, got {self.budget_s}")


HOST_COLUMNS = [
    "model", "threads", "xnnpack", "runs", "init_ms", "first_ms", "warmup_avg_ms",
    "mean_ms", "median_ms", "p5_ms", "p95_ms", "std_ms", "min_ms", "max_ms",
    "mem_init_mb", "mem_peak_mb", "runtime", "cpu",
]


def check_model(path: str) -> None:
    """Raise ValueError naming `path` unless it is a readable, well-formed .tflite flatbuffer (every offset and
    index checked: export.tflite_file), so that no worker or phone is handed a file that would crash it."""
    from export.tflite_file import read_tflite
    read_tflite(path)


def runtime_version() -> str:
    from importlib.metadata import version
    return f"ai_edge_litert {version('ai-edge-litert')}"


def _run_worker(job: dict) -> dict:
    """One child process per configuration; its last stdout line is the JSON result."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.worker"], input=json.dumps(job), capture_output=True,
        text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == worker.REFUSED:     # the interpreter would not load or run the file
        raise ValueError(f"LiteRT cannot run {job['model']}: {json.loads(last)['error']}")
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["no message"])[-1].strip()
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise RuntimeError(f"timing {job['model']} failed ({how}): {err}")
    return json.loads(last)


def run_host(cfg: HostConfig) -> list[dict]:
    """Time every (model, threads, xnnpack) of cfg; one row per configuration (ms, MB)."""
    cfg.validate()
    jobs = [(m, t, x) for m in cfg.models for t in cfg.threads for x in cfg.xnnpack]
    runtime, cpu = runtime_version(), cpu_summary()
    rows = []
    for model, threads, xnn in tqdm(jobs, desc="host bench", unit="cfg", disable=None):
        r = _run_worker({"model": os.path.abspath(model), "threads": threads, "xnnpack": xnn,
                         "runs": cfg.runs, "warmup": cfg.warmup, "budget_s": cfg.budget_s})
        st = summarize(r["times_us"])
        ms = lambda us: None if us is None else round(us / 1e3, 6)  # noqa: E731 (ns resolution)
        rows.append({
            "model": model, "threads": threads, "xnnpack": "on" if xnn else "off",
            "runs": st.count, "init_ms": ms(r["init_us"]), "first_ms": ms(r["first_us"]),
            "warmup_avg_ms": ms(r["warmup_avg_us"]), "mean_ms": ms(st.mean_us),
            "median_ms": ms(st.median_us), "p5_ms": ms(st.p5_us), "p95_ms": ms(st.p95_us),
            "std_ms": ms(st.std_us), "min_ms": ms(st.min_us), "max_ms": ms(st.max_us),
            "mem_init_mb": round(r["mem_init_mb"], 3), "mem_peak_mb": round(r["mem_peak_mb"], 3),
            "runtime": runtime, "cpu": cpu,
        })
    return rows


def host_description() -> str:
    """CPU model, the instruction sets that decide int8 speed (VNNI) and core count, for every printed figure
    and the config saved beside a result."""
    return f"{cpu_summary()}, {os.cpu_count()} cores, Python {platform.python_version()}"
