"""The run-directory convention that joins the design card's three commands:

    python train.py --prune 0.7      -> runs/baseline/checkpoint.pt, runs/baseline/pruned.pt
    python -m quantize --qat         -> runs/quantize/quantized.pt, runs/quantize/model_w8a8.tflite (validated)
    python -m bench --device         -> times that .tflite on the phone

Each command that makes a model records it in `runs/latest.json` (`$MNV2_RUNS/latest.json` when set) under its
kind; a command given no input takes the latest of the kinds it accepts, and prints which file it took and why.
Where none exists, the error names the command that makes one.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from common.files import atomic_write_text

__all__ = ["KINDS", "runs_dir", "record", "latest", "find_input"]

# kind -> the command that makes it (named in the error when a later command finds none)
KINDS = {
    "baseline": "python train.py",
    "pruned": "python train.py --prune 0.7",
    "quantized": "python -m quantize",
    "tflite": "python -m quantize (it ends by exporting the validated .tflite)",
}


def runs_dir() -> Path:
    return Path(os.environ.get("MNV2_RUNS", "runs"))


def _pointer() -> Path:
    return runs_dir() / "latest.json"


def _read() -> dict:
    try:
        doc = json.loads(_pointer().read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def record(kind: str, path, **info) -> None:
    """Note `path` as the latest model of `kind` (atomically; the other kinds are kept)."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}; expected one of {', '.join(KINDS)}")
    doc = _read()
    doc[kind] = {"path": str(Path(path).resolve()), **info,
                 "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(json.dumps(doc, indent=2) + "\n", _pointer())


def latest(kind: str) -> Path | None:
    """The latest recorded model of `kind`, if its file still exists."""
    entry = _read().get(kind)
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return None
    path = Path(entry["path"])
    return path if path.is_file() else None


def find_input(kinds: tuple[str, ...], flag: str, log=print) -> Path:
    """The newest-stage model among `kinds` (tried in order) for a command run without `flag`; says which.
    Raises ValueError naming what is missing and the command that makes it."""
    for kind in kinds:
        path = latest(kind)
        if path is not None:
            log(f"using {path} (the latest {kind} model, from {_pointer()}; pass {flag} to choose another)")
            return path
    raise ValueError(f"no {flag} given, and {_pointer()} records no {' or '.join(kinds)} model yet: run "
                     f"`{KINDS[kinds[-1]]}` first, or pass {flag}")
