"""bench.parse on captured benchmark_model logs (tests/data/benchmark_model_*.txt).

Expected values are copied by hand from the fixture text, so comparisons are exact.
"""

from pathlib import Path

import pytest

from bench.device import row_from_output
from bench.parse import parse_benchmark_output

DATA = Path(__file__).parent / "data"


def load(name: str) -> str:
    return (DATA / f"benchmark_model_{name}.txt").read_bytes().decode()   # keeps CRLF


@pytest.mark.parametrize("name, init, first, warm, avg, count, mem_init, mem_overall, peak", [
    # newer tool, XNNPACK, with the periodic-monitoring peak line
    ("2x_xnnpack", 66024, 18133, 6350.9, 5916.06, 169, 9.32031, 11.9531, 14.6289),
    # CRLF line ends and exponent numbers
    ("2x_crlf", 2.95034e6, 2.95034e6, 203975, 28410.9, 50, 4.16016, 9.46094, None),
    # older "Average inference timings"; a single warm-up run prints only curr=
    ("1x_average", 12893, 1.23456e6, 1.23456e6, 44655.1, 50, 3.21484, 9.46094, None),
    # earliest "no stats:" form, no memory lines
    ("1x_nostats", 2893, 197652, 197652, 160034, 50, None, None, None),
    # logcat prefixes instead of INFO:
    ("logcat", 30500, 9120, 7801.2, 7712.5, 128, 6.5, 8.25, None),
])
def test_formats(name, init, first, warm, avg, count, mem_init, mem_overall, peak):
    log = parse_benchmark_output(load(name))
    assert (log.init_us, log.first_us, log.warmup_avg_us, log.inference_avg_us) == (init, first, warm, avg)
    assert log.inference_count == count
    assert (log.mem_init_mb, log.mem_overall_mb, log.mem_peak_mb) == (mem_init, mem_overall, peak)
    assert log.errors == []


def test_count_lines_give_spread():
    log = parse_benchmark_output(load("2x_xnnpack"))
    assert (log.inference_min_us, log.inference_max_us, log.inference_std_us) == (5557, 6709, 152)


def test_init_from_session_line_when_no_summary():
    log = parse_benchmark_output("INFO: Initialized session in 2.5e+01ms.\r\n")
    assert log.init_us == 25000.0 and not log.has_timings


def test_gpu_failure_row():
    log = parse_benchmark_output(load("gpu_failed"))
    assert not log.has_timings
    assert "ERROR: Failed to apply GPU delegate." in log.errors
    row = row_from_output(load("gpu_failed"), 1, {"model": "m"})
    assert row["status"] == "failed"
    assert row["error"].startswith("exit 1: ")
    assert "Failed to apply GPU delegate." in row["error"]
    assert row["inference_avg_ms"] is None


def test_crash_row():
    text = load("crash")
    row = row_from_output(text, 139, {})
    assert row["status"] == "crashed"
    assert row["error"].startswith("crashed: SIGSEGV (exit 139)")
    assert "Segmentation fault" in row["error"]
    assert row["init_ms"] == 21.3        # what the log did say is kept


def test_ok_row_units():
    row = row_from_output(load("2x_xnnpack"), 0, {"config": "CPU-4T"})
    assert row["status"] == "ok" and row["error"] == ""
    # us -> ms; memory = the end-of-run footprint delta (printed by every version)
    assert (row["init_ms"], row["first_ms"], row["warmup_avg_ms"], row["inference_avg_ms"]) == \
        (66.024, 18.133, 6.3509, 5.9161)
    assert row["memory_mb"] == 11.9531 and row["config"] == "CPU-4T"


def test_exit_zero_without_timings():
    row = row_from_output("INFO: STARTING!\n", 0, {})
    assert row["status"] == "no_timings"
