"""Time one .tflite in this process; run as `python -m bench.worker` by bench.host.

A process of its own per (model, threads, XNNPACK) so that the memory figures belong to
that model alone. Reads one JSON job on stdin, writes one JSON result line on stdout;
the progress bar goes to stderr.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

__all__ = ["proc_status_kb", "time_model", "main", "REFUSED"]


def proc_status_kb(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB (VmRSS: resident now, VmHWM: resident peak)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])
    return out


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the
    # peak below excludes the import of numpy and the interpreter.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _random_inputs(interp, rng: np.random.Generator) -> None:
    for d in interp.get_input_details():
        dtype, shape = d["dtype"], d["shape"]
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            x = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
        else:
            x = rng.standard_normal(shape).astype(dtype)
        interp.set_tensor(d["index"], x)


def time_model(model: str, threads: int, xnnpack: bool, runs: int, warmup: int,
               budget_s: float | None = None, progress: bool | None = None) -> dict:
    """Init, first inference, warm-up and timed runs of one model; times in us, memory in MB."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tqdm import tqdm

    _reset_peak_rss()
    rss0_kb = proc_status_kb("VmRSS")["VmRSS"]
    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    t0 = time.perf_counter_ns()
    interp = Interpreter(model_path=model, num_threads=threads,
                         experimental_op_resolver_type=resolver)
    interp.allocate_tensors()
    init_us = (time.perf_counter_ns() - t0) / 1e3
    mem_init_mb = (proc_status_kb("VmRSS")["VmRSS"] - rss0_kb) / 1024
    _random_inputs(interp, np.random.default_rng(0))

    def one() -> float:
        t = time.perf_counter_ns()
        interp.invoke()
        return (time.perf_counter_ns() - t) / 1e3

    first_us = one()
    warm = [one() for _ in range(warmup)]
    times: list[float] = []
    quiet = None if progress is None else not progress   # None: tqdm hides itself off a TTY
    if budget_s is not None:
        # Time budget: as many runs as fit in budget_s seconds, at least one.
        end = time.perf_counter() + budget_s
        with tqdm(desc="runs", unit="run", disable=quiet, file=sys.stderr) as bar:
            while not times or time.perf_counter() < end:
                times.append(one())
                bar.update()
    else:
        for _ in tqdm(range(runs), desc="runs", unit="run", leave=False, file=sys.stderr,
                      disable=quiet):
            times.append(one())
    st = proc_status_kb("VmRSS", "VmHWM")
    return {
        "init_us": init_us, "first_us": first_us,
        "warmup_avg_us": float(np.mean(warm)) if warm else None,
        "times_us": times,
        "mem_init_mb": mem_init_mb,
        "mem_overall_mb": (st["VmRSS"] - rss0_kb) / 1024,
        "mem_peak_mb": (st["VmHWM"] - rss0_kb) / 1024,
    }


REFUSED = 3     # exit code: the interpreter refused the file; stdout's last line is {"error": one line}


def main() -> int:
    job = json.loads(sys.stdin.read())
    try:
        result = time_model(**job)
    except (ValueError, RuntimeError) as e:      # what LiteRT raises for a file it cannot load, prepare or run
        sys.stdout.write(json.dumps({"error": " ".join(str(e).split())[:300]}) + "\n")
        return REFUSED
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
