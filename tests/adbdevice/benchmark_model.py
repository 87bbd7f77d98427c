"""Stand-in for TensorFlow Lite's `benchmark_model`, for the bench tests.

Takes the real tool's flags, runs the model with the ai_edge_litert interpreter on the
host, and logs to stderr in the real tool's format (2.1x "Inference timings in us:" era),
so bench.device and bench.parse meet the same text as on a phone. Failure modes, for tests:
- --use_gpu=true: the GPU delegate error of a phone without OpenCL, exit 1;
- a --graph whose file name contains "crash", or BENCH_STANDIN_CRASH=1: dies of SIGSEGV;
- a --graph that cannot be read: "Could not open", exit 1.
The test fixture copies this file with this Python in its #! line.
"""

import os
import signal
import sys
import time


def log(msg: str) -> None:
    sys.stderr.write(f"INFO: {msg}\n")


def err(msg: str) -> None:
    sys.stderr.write(f"ERROR: {msg}\n")


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def flags(argv: list[str]) -> dict[str, str]:
    out = {}
    for a in argv:
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
    return out


def stats_line(t: list[float]) -> str:
    n = len(t)
    avg = sum(t) / n
    std = (sum((x - avg) ** 2 for x in t) / n) ** 0.5
    return (f"count={n} first={int(t[0])} curr={int(t[-1])} min={int(min(t))} "
            f"max={int(max(t))} avg={avg:g} std={int(std)}")


def main() -> int:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    import numpy as np

    rss0 = status_kb("VmRSS")     # "start of the tool", after the runtime is loaded as in the real binary
    f = flags(sys.argv[1:])
    graph = f.get("graph", "")
    threads = int(f.get("num_threads", "-1"))
    runs, warmup = int(f.get("num_runs", "50")), int(f.get("warmup_runs", "1"))
    min_secs, warmup_min_secs = float(f.get("min_secs", "1")), float(f.get("warmup_min_secs", "0.5"))
    gpu = f.get("use_gpu", "false") == "true"
    xnnpack = f.get("use_xnnpack", "false") == "true"
    profiling = f.get("enable_op_profiling", "false") == "true"

    log("STARTING!")
    log("Log parameter values verbosely: [0]")
    log(f"Min num runs: [{runs}]")
    log(f"Min warmup runs: [{warmup}]")
    log(f"Num threads: [{threads}]")
    log(f"Graph: [{graph}]")
    if profiling:
        log("Enable op profiling: [1]")
    log(f"#threads used for CPU inference: [{threads}]")
    if gpu:
        log("Use gpu: [1]")
    if xnnpack:
        log("Use xnnpack: [1]")
    try:
        with open(graph, "rb") as fh:
            size_mb = len(fh.read()) / 2**20
    except OSError:
        err(f"Could not open '{graph}'.")
        err("Failed to mmap model " + graph)
        err("Benchmarking failed.")
        return 1
    log(f"Loaded model {graph}")
    sys.stderr.flush()
    if "crash" in os.path.basename(graph) or os.environ.get("BENCH_STANDIN_CRASH") == "1":
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)

    log("Initialized TensorFlow Lite runtime.")
    if gpu:
        log("Created TensorFlow Lite delegate for GPU.")
        err('Can not open OpenCL library on this device - dlopen failed: library "libOpenCL.so" not found')
        err("Falling back to OpenGL")
        err("TfLiteGpuDelegate Init: OpenGL-based API disabled")
        err("TfLiteGpuDelegate Prepare: delegate is not initialized")
        err("Node number 4 (TfLiteGpuDelegateV2) failed to prepare.")
        err("Restored original execution plan after delegate application failure.")
        err("Failed to apply GPU delegate.")
        err("Benchmarking failed.")
        return 1

    t0 = time.perf_counter_ns()
    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = Interpreter(model_path=graph, num_threads=max(threads, 1),
                         experimental_op_resolver_type=resolver)
    interp.allocate_tensors()
    init_us = (time.perf_counter_ns() - t0) / 1e3
    mem_init = (status_kb("VmRSS") - rss0) / 1024
    if xnnpack:       # the interpreter itself logs "Created TensorFlow Lite XNNPACK delegate for CPU."
        log("XNNPACK delegate created.")
        log("Explicitly applied XNNPACK delegate, and the model graph will be completely executed by the delegate.")
    log(f"The input model file size (MB): {size_mb:g}")
    log(f"Initialized session in {init_us / 1e3:g}ms.")
    rng = np.random.default_rng(0)
    for d in interp.get_input_details():
        if np.issubdtype(d["dtype"], np.integer):
            i = np.iinfo(d["dtype"])
            x = rng.integers(i.min, i.max, size=d["shape"], endpoint=True, dtype=d["dtype"])
        else:
            x = rng.standard_normal(d["shape"]).astype(d["dtype"])
        interp.set_tensor(d["index"], x)

    def phase(min_runs: int, min_s: float) -> list[float]:
        # The real tool: at least min_runs runs and at least min_s seconds, at most 150 s.
        log(f"Running benchmark for at least {min_runs} iterations and at least {min_s:g} seconds "
            "but terminate if exceeding 150 seconds.")
        times, start = [], time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - start < min_s:
            t = time.perf_counter_ns()
            interp.invoke()
            times.append((time.perf_counter_ns() - t) / 1e3)
        log(stats_line(times) + "\n")
        return times

    warm = phase(max(warmup, 1), warmup_min_secs)
    timed = phase(runs, min_secs)
    if profiling:
        log("Operator-wise Profiling Info for Regular Benchmark Runs:")
        log("============================== Run Order ==============================")
        log("\t             [node type]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]\t  [mem KB]\t[times called]\t[Name]")
        for op in interp._get_ops_details():
            log(f"\t{op['op_name']:>24}\t    0.000\t    0.000\t  0.000%\t  0.000%\t     0.000\t        1\t[{op['index']}]")
    log(f"Inference timings in us: Init: {int(init_us)}, First inference: {int(warm[0])}, "
        f"Warmup (avg): {sum(warm) / len(warm):g}, Inference (avg): {sum(timed) / len(timed):g}")
    log("Note: as the benchmark tool itself affects memory footprint, the following is only "
        "APPROXIMATE to the actual memory footprint of the model at runtime. Take the "
        "information at your discretion.")
    overall = (status_kb("VmRSS") - rss0) / 1024
    log(f"Memory footprint delta from the start of the tool (MB): init={mem_init:g} overall={overall:g}")
    log(f"Overall peak memory footprint (MB) via periodic monitoring: {(status_kb('VmHWM') - rss0) / 1024:g}")
    log("Memory status at the end of exeution:")
    log(f"- VmRSS              : {status_kb('VmRSS') // 1024} MB")
    log(f"+ RssAnnon           : {status_kb('RssAnon') // 1024} MB")
    log(f"+ RssFile + RssShmem : {(status_kb('RssFile') + status_kb('RssShmem')) // 1024} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
