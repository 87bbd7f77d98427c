"""The experiment matrix on disk: the one schema of every `matrix.csv` (`python -m quantize --matrix`, which
simulates, and `python -m bench matrix`, which also exports and times), its typed reader and writer.

One row per configuration. The key is (config, granularity, calib, method): writing a row with a key
already in the file replaces that row in place, so a matrix run that stops half-way resumes with
`done_keys` and a rerun of one configuration overwrites its old numbers.

    column            type   meaning
    config            str    name, e.g. FP32, W8A8, W4A8, W8A16
    w_bits, a_bits    int    weight / activation bits; a_bits empty for float activations
    act_mode          str    none | static | dynamic
    granularity       str    per-channel | per-tensor | n/a (weights)
    calib             str    real | random | n/a (activation-range calibration data)
    method            str    rtn | adaround | cle+bc | qat | fp32
    top1, top1_fp32   float  top-1 accuracy as a fraction in [0, 1] (this config, the FP32 model)
    agreement         float  fraction of eval images whose top-1 class equals the FP32 model's
    mse               float  mean squared error of the logits against FP32
    snr_db            float  10 log10(signal power / error power) of the logits, dB; inf when identical
    weight_bytes      int    bytes of the stored weights (bits x count / 8, plus scales)
    tflite            str    path of the exported .tflite, empty if none
    export_status     str    ok | refused | failed | skipped
    export_note       str    why refused / failed / skipped; for a 4-bit row, how many weights are packed INT4
                             (and on which kernels) and how many int8 (export/int4.py)
    file_bytes        int    size of the .tflite file
    gzip_bytes        int    size of the .tflite after gzip -9
    exact_match       float  fraction of the file's int8 outputs equal to the simulation's (true/false read as 1/0)
    max_lsb           int    largest output difference file vs simulation, in output quantization steps
    file_agreement    float  fraction of eval images whose top-1 class from the file equals the simulation's
    host_ms_*         float  host latency per image, ms: median, 5th and 95th percentile
    host_threads      int    interpreter threads of the host timing
    device_ms         float  on-phone latency per image, ms (benchmark_model average)
    device            str    phone model / SoC of device_ms
    eval_images       int    test images behind top1 / agreement / mse / snr_db
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
from pathlib import Path

from .files import atomic_write_text

__all__ = ["METHOD_NAMES", "MATRIX_COLUMNS", "COLUMN_TYPES", "KEY_COLUMNS", "CHOICES", "row_key", "row_label",
           "write_matrix_row", "read_matrix", "done_keys"]

# method -> how a report names it. A method is "rtn" (round to nearest) or the PTQ extras joined by "+".
METHOD_NAMES = {"fp32": "FP32", "rtn": "round to nearest", "adaround": "AdaRound", "cle": "CLE",
                "bc": "bias correction", "cle+bc": "CLE + bias correction", "adaround+bc": "AdaRound + bias correction",
                "qat": "QAT"}

# column -> type; the order is the CSV header.
COLUMN_TYPES: dict[str, type] = {
    "config": str, "w_bits": int, "a_bits": int, "act_mode": str, "granularity": str, "calib": str,
    "method": str, "top1": float, "top1_fp32": float, "agreement": float, "mse": float, "snr_db": float,
    "weight_bytes": int, "tflite": str, "export_status": str, "export_note": str, "file_bytes": int,
    "gzip_bytes": int, "exact_match": float, "max_lsb": int, "file_agreement": float,
    "host_ms_median": float, "host_ms_p5": float, "host_ms_p95": float, "host_threads": int,
    "device_ms": float, "device": str, "eval_images": int,
}
MATRIX_COLUMNS = list(COLUMN_TYPES)
KEY_COLUMNS = ("config", "granularity", "calib", "method")
CHOICES = {
    "act_mode": ("none", "static", "dynamic"),
    "granularity": ("per-channel", "per-tensor", "n/a"),
    "calib": ("real", "random", "n/a"),
    "method": tuple(METHOD_NAMES),
    "export_status": ("ok", "refused", "failed", "skipped"),
}
_FRACTIONS = ("top1", "top1_fp32", "agreement", "exact_match", "file_agreement")


def row_key(row: dict) -> tuple[str, str, str, str]:
    return tuple(str(row.get(c) or "") for c in KEY_COLUMNS)


def row_label(row: dict, sep: str = " ") -> str:
    """Short name of a configuration for plots and prose: 'W8A8 pc real rtn' (pc/pt = per-channel/-tensor)."""
    gran = {"per-channel": "pc", "per-tensor": "pt"}.get(row.get("granularity") or "", "")
    parts = [row.get("config") or "?", gran, "" if row.get("calib") in (None, "n/a") else row["calib"],
             "" if row.get("method") in (None, "fp32") else row["method"]]
    return sep.join(p for p in parts if p)


def _parse(column: str, text: str):
    """CSV text -> typed value; empty -> None. Raises ValueError naming the column and the text."""
    text = text.strip()
    kind = COLUMN_TYPES[column]
    if text == "" or kind is str:
        return None if text == "" else text
    if kind is float and column == "exact_match" and text.lower() in ("true", "false"):
        return 1.0 if text.lower() == "true" else 0.0
    try:
        return int(text) if kind is int else float(text)    # float("inf") reads the identical-output SNR
    except ValueError:
        raise ValueError(f"matrix column {column!r} should hold a {kind.__name__}, not {text!r}") from None


def _cell(column: str, value) -> str:
    """Typed value -> CSV text (floats round-trip exactly via repr; inf as 'inf')."""
    if value is None:
        return ""
    kind = COLUMN_TYPES[column]
    if kind is float:
        if isinstance(value, bool):
            value = float(value)
        return repr(float(value))
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"matrix column {column!r} should hold an integer, not {value!r}")
        return str(int(value))
    return str(value)


def _check_row(row: dict) -> dict:
    unknown = sorted(set(row) - set(MATRIX_COLUMNS))
    if unknown:
        raise ValueError(f"unknown matrix columns {unknown}; the schema is common.matrix.MATRIX_COLUMNS")
    missing = [c for c in KEY_COLUMNS if not row.get(c)]
    if missing:
        raise ValueError(f"matrix row lacks its key columns {missing}: {row}")
    for c, allowed in CHOICES.items():
        if row.get(c) not in (None, "") and row[c] not in allowed:
            raise ValueError(f"matrix column {c!r} should be one of {allowed}, not {row[c]!r}")
    for c in _FRACTIONS:     # a percentage written by mistake would show as 8000 %
        v = row.get(c)
        if v is not None and v != "" and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"matrix column {c!r} is a fraction in [0, 1], not {v!r}")
    return {c: _cell(c, row.get(c)) for c in MATRIX_COLUMNS}


def _read_text_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        if list(reader.fieldnames) != MATRIX_COLUMNS:
            raise ValueError(f"{path} has columns {reader.fieldnames}, not the matrix schema {MATRIX_COLUMNS}")
        return list(reader)


@contextlib.contextmanager
def _locked(path: Path):
    """Serialize read-modify-write between processes sharing one matrix (a lock file beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_matrix_row(csv_path, row: dict) -> None:
    """Add `row` to the matrix at `csv_path` (created with the fixed header), or replace the row with the
    same key in place. Read, modify, write a temporary file, rename: a crash leaves the old file whole."""
    path = Path(csv_path)
    new = _check_row(row)
    with _locked(path):
        rows = _read_text_rows(path)
        keys = [row_key(r) for r in rows]
        if row_key(new) in keys:
            rows[keys.index(row_key(new))] = new
        else:
            rows.append(new)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=MATRIX_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(buf.getvalue(), path)


def read_matrix(csv_path) -> list[dict]:
    """Typed rows of the matrix in file order ([] if the file does not exist); empty cells are None."""
    return [{c: _parse(c, r[c] or "") for c in MATRIX_COLUMNS} for r in _read_text_rows(Path(csv_path))]


def done_keys(csv_path) -> set[tuple[str, str, str, str]]:
    """Keys (config, granularity, calib, method) already in the matrix: what a resumed run can skip."""
    return {row_key(r) for r in _read_text_rows(Path(csv_path))}
