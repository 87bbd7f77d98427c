"""Publish an experiment matrix run into the repository: the report regenerated from its CSV into
benchmarks/results/<name>/ (report.md, report.html, plots/, with matrix.csv and meta.json copied beside them so
the page can be rebuilt from what is committed), and the matrix section of benchmarks/RESULTS.md replaced by
that report's text. Nothing in the section is typed by hand: run this again after the matrix changes.

    python benchmarks/publish_matrix.py --results-dir runs/matrix --prune-dir runs/prune_ref
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.study_report import write_report  # noqa: E402
from common.files import atomic_write_text  # noqa: E402

SECTION = "## Experiment matrix on the reference checkpoint (issue 7)"
PRUNE_FILES = ("sweep_global.csv", "sweep_layers.csv", "prune_report.json", "prune_config.json", "prune_meta.json")


def section_text(report_md: str, rel: str) -> str:
    """The report's Markdown as a RESULTS.md section: title dropped, headings one level down, images and links
    pointing into `rel` (the published directory, relative to benchmarks/)."""
    lines = report_md.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    text = "\n".join(("#" + ln) if ln.startswith("## ") or ln.startswith("### ") else ln for ln in lines)
    text = re.sub(r"\]\((plots/[^)]+)\)", lambda m: f"]({rel}/{m.group(1)})", text)
    return f"{SECTION}\n\nPublished by `python benchmarks/publish_matrix.py` from the matrix run below; the whole " \
           f"page with its plots: [{rel}/report.html]({rel}/report.html) ([Markdown]({rel}/report.md)).\n" + text


def replace_section(results: str, new: str) -> str:
    """RESULTS.md with its matrix section (any heading starting with '## Experiment matrix') replaced."""
    m = re.search(r"^## Experiment matrix.*$", results, flags=re.M)
    if not m:
        return results.rstrip("\n") + "\n\n" + new.strip("\n") + "\n"
    nxt = re.search(r"^## ", results[m.end():], flags=re.M)
    tail = results[m.end() + nxt.start():] if nxt else ""
    return results[:m.start()] + new.strip("\n") + "\n" + ("\n" + tail if tail else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=str(ROOT / "runs" / "matrix"))
    p.add_argument("--prune-dir", default="", help="a pruning run (prune/ outputs) for the report's pruning part")
    p.add_argument("--dest", default=str(ROOT / "benchmarks" / "results" / "matrix"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    a = p.parse_args(argv)
    src, dest = Path(a.results_dir).resolve(), Path(a.dest).resolve()
    os.chdir(ROOT)                          # the page names its inputs relative to the repository
    rel_to_root = lambda q: q.relative_to(ROOT) if q.is_relative_to(ROOT) else q  # noqa: E731
    src, dest = rel_to_root(src), rel_to_root(dest)
    prune_src = Path(a.prune_dir).resolve() if a.prune_dir else None
    if not (src / "matrix.csv").is_file():
        print(f"no matrix.csv in {src}", file=sys.stderr)
        return 2
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("matrix.csv", "meta.json", "peers.csv"):     # the report reads all three
        if (src / f).is_file():
            shutil.copyfile(src / f, dest / f)
    prune_dest = dest / "prune"
    if a.prune_dir:
        prune_dest.mkdir(exist_ok=True)
        for f in PRUNE_FILES:
            if (prune_src / f).is_file():
                shutil.copyfile(prune_src / f, prune_dest / f)
    md, _ = write_report(dest, prune_dir=prune_dest if prune_dest.is_dir() else None, out_dir=dest)
    results = Path(a.results).resolve()
    rel = os.path.relpath(dest.resolve(), results.parent)
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    atomic_write_text(replace_section(old, section_text(md.read_text(), rel)), results)
    print(f"published {dest} and the matrix section of {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
