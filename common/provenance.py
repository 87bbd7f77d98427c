"""Provenance: what every figure must name (command, checkpoint and its sha256, commit, machine, versions, date),
written beside results as JSON (the matrix's meta.json, a pruning run's prune_meta.json)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .files import atomic_write_text, sha256_file
from .machine import cpu_isa, cpu_name

__all__ = ["collect_meta", "write_meta", "read_meta", "command_line"]


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a person would type it: `python -m prune ...` for a package's
    __main__, `python train.py ...` for a script."""
    argv = list(sys.argv if argv is None else argv)
    head = Path(argv[0]) if argv else Path("?")
    if head.name == "__main__.py":
        prog = f"python -m {head.parent.name}"
    else:
        try:
            prog = f"python {head.resolve().relative_to(Path(__file__).resolve().parent.parent)}"
        except ValueError:
            prog = f"python {head}"
    return " ".join([prog] + argv[1:])


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect_meta(command: str, checkpoint, eval_subset: str = "", seed: int | None = None) -> dict:
    """Everything a figure must name: command, checkpoint (+ sha256), commit, machine, versions, date."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": command,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "commit": commit,
        "commit_dirty": bool(dirty) if dirty is not None else None,   # tracked files changed since the commit
        "machine": {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                    "system": f"{platform.system()} {platform.release()}"},
        "versions": {"python": platform.python_version(), "torch": _version("torch"),
                     "ai_edge_litert": _version("ai-edge-litert"), "litert_torch": _version("litert-torch"),
                     "numpy": _version("numpy")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "eval_subset": eval_subset,
        "seed": seed,
    }


def write_meta(path, meta: dict) -> None:
    atomic_write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", path)


def read_meta(path) -> dict | None:
    """meta.json as a dict, or None if it is missing (a report then says the provenance is unknown)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} should hold a JSON object, not {type(meta).__name__}")
    return meta
