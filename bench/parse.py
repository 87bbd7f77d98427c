"""Parse the log of TensorFlow Lite / LiteRT's `benchmark_model` tool, tolerantly.

Formats seen across versions (all timings in microseconds, memory in MB):

    newer:  Inference timings in us: Init: 66024, First inference: 18133,
            Warmup (avg): 6350.9, Inference (avg): 5916.06
            Memory footprint delta from the start of the tool (MB): init=9.32 overall=11.95
            Overall peak memory footprint (MB) via periodic monitoring: 21.418
    older:  Average inference timings in us: Warmup: 31270, Init: 2950340, Inference: 28410.9
            (earliest: "no stats: 28410.9" instead of "Inference: ...")
            Peak memory footprint (MB): init=3.21 overall=9.46
    both:   count=50 first=31270 curr=28410 min=27900 max=31270 avg=28410.9 std=597

Lines may carry `INFO:` / logcat prefixes and CRLF ends; numbers may be written
`2.95034e+06`. A value the log does not give is None.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

__all__ = ["BenchmarkLog", "parse_benchmark_output", "error_lines"]

NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"

_NEW_SUMMARY = re.compile(
    rf"Inference timings in us:\s*Init:\s*{NUM},\s*First inference:\s*{NUM},"
    rf"\s*Warmup \(avg\):\s*{NUM},\s*Inference \(avg\):\s*{NUM}")
_OLD_SUMMARY = re.compile(r"Average inference timings in us:(.*)")
_OLD_FIELD = re.compile(rf"(Warmup|Init|Inference|no stats):\s*{NUM}")
_COUNT = re.compile(r"\bcount=(\d+)(.*)")
_KV = re.compile(rf"\b(first|curr|min|max|avg|std)={NUM}")
_SESSION = re.compile(rf"Initialized session in\s*{NUM}\s*ms")
_FOOTPRINT = re.compile(
    rf"(?:Memory footprint delta from the start of the tool|Peak memory footprint) \(MB\):"
    rf"\s*init={NUM}\s*overall={NUM}")
_PEAK = re.compile(rf"Overall peak memory footprint \(MB\) via periodic monitoring:\s*{NUM}")
_ERROR = re.compile(
    r"(ERROR:|\bE tflite|Segmentation fault|Aborted|CANNOT LINK EXECUTABLE|"
    r"Permission denied|not found|No such file|Illegal instruction|Bus error)")


@dataclass
class BenchmarkLog:
    """What one benchmark_model run printed; None where the log is silent."""

    init_us: float | None = None
    first_us: float | None = None
    warmup_avg_us: float | None = None
    inference_avg_us: float | None = None
    inference_count: int | None = None      # timed runs in the last count= line
    inference_min_us: float | None = None
    inference_max_us: float | None = None
    inference_std_us: float | None = None
    mem_init_mb: float | None = None        # footprint delta after init
    mem_overall_mb: float | None = None     # footprint delta at the end
    mem_peak_mb: float | None = None        # periodic-monitoring peak (newer tools)
    errors: list[str] = field(default_factory=list)

    @property
    def has_timings(self) -> bool:
        return self.inference_avg_us is not None

    def as_dict(self) -> dict:
        return asdict(self)


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]


def error_lines(text: str) -> list[str]:
    """Lines that report an error, prefixes kept, duplicates dropped, order kept."""
    seen: dict[str, None] = {}
    for ln in _lines(text):
        if ln and _ERROR.search(ln):
            seen.setdefault(ln, None)
    return list(seen)


def parse_benchmark_output(text: str) -> BenchmarkLog:
    """Parse a benchmark_model log (stdout and stderr together) into a BenchmarkLog."""
    log = BenchmarkLog(errors=error_lines(text))
    counts: list[dict[str, float]] = []
    for ln in _lines(text):
        if m := _NEW_SUMMARY.search(ln):
            log.init_us, log.first_us, log.warmup_avg_us, log.inference_avg_us = (
                float(g) for g in m.groups())
        elif m := _OLD_SUMMARY.search(ln):
            kv = {k: float(v) for k, v in _OLD_FIELD.findall(m.group(1))}
            log.init_us = kv.get("Init", log.init_us)
            log.warmup_avg_us = kv.get("Warmup", log.warmup_avg_us)
            log.inference_avg_us = kv.get("Inference", kv.get("no stats", log.inference_avg_us))
        elif m := _COUNT.search(ln):
            stats = {k: float(v) for k, v in _KV.findall(m.group(2))}
            stats["count"] = int(m.group(1))
            counts.append(stats)
        elif m := _SESSION.search(ln):
            if log.init_us is None:
                log.init_us = float(m.group(1)) * 1000.0     # ms -> us
        elif m := _FOOTPRINT.search(ln):
            log.mem_init_mb, log.mem_overall_mb = float(m.group(1)), float(m.group(2))
        elif m := _PEAK.search(ln):
            log.mem_peak_mb = float(m.group(1))
    # The first count= line is the warm-up phase, the last one the timed phase.
    if counts:
        last = counts[-1]
        log.inference_count = int(last["count"])
        log.inference_min_us = last.get("min")
        log.inference_max_us = last.get("max")
        log.inference_std_us = last.get("std")
        if log.inference_avg_us is None and len(counts) > 1:
            log.inference_avg_us = last.get("avg")
        if log.first_us is None:     # a single warm-up run prints only curr=
            first = counts[0]
            log.first_us = first.get("first", first.get("curr") if first["count"] == 1 else None)
        if log.warmup_avg_us is None and len(counts) > 1:
            log.warmup_avg_us = counts[0].get("avg")
    return log
