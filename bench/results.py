"""A results directory as the report reads it: the pruning run's files (the matrix's schema is common.matrix).

prune/pipeline.py writes sweep_global.csv, sweep_layers.csv, prune_report.json, prune_config.json and
prune_meta.json; `load_prune` reads whichever of them exist, typed, for bench's report.
"""
from __future__ import annotations

from pathlib import Path

from common.provenance import read_meta
from prune.sweep import read_sweep_rows

__all__ = ["load_prune", "PRUNE_FILES"]

PRUNE_FILES = {"global": "sweep_global.csv", "layers": "sweep_layers.csv", "report": "prune_report.json",
               "config": "prune_config.json", "meta": "prune_meta.json"}
def load_prune(prune_dir) -> dict:
    """The pruning run's files in `prune_dir` (prune/pipeline.py's names), each None or [] when missing:
    {"dir", "global": sweep rows, "layers": per-layer rows, "report": prune_report.json,
     "config": prune_config.json, "meta": prune_meta.json (collect_meta of the prune command, optional)}."""
    d = Path(prune_dir) if prune_dir else None
    out = {"dir": str(d) if d else None, "global": [], "layers": [], "report": None, "config": None, "meta": None}
    if d is None or not d.is_dir():
        return out
    out["global"] = read_sweep_rows(d / PRUNE_FILES["global"])
    out["layers"] = read_sweep_rows(d / PRUNE_FILES["layers"])
    for k in ("report", "config", "meta"):
        out[k] = read_meta(d / PRUNE_FILES[k])
    return out
