"""The smallest file within one point (issue 16, point 2): recipes from the CIFAR-10 reference, each a validated
W8A8 .tflite, measured on all 10,000 test images, drawn as top-1 against file bytes with host latency labelled.

    step  per recipe NAME=CHECKPOINT (the reference itself, or a pruned checkpoint made from it)
    1     python -m quantize --config W8A8 --no-export (per-channel PTQ, 1,000 real calibration images)
    2     python -m export (--weights-storage auto: CSR + DENSIFY wherever smaller; the usual validation gates)
    3     the FILE's top-1 on every test image (XNNPACK, batch 1), not the simulation's
    4     host latency of every file in one run (bench host: 1 thread, XNNPACK), beside the CPU
    then  smallest.csv, pareto.png, meta.json, README.md; the smallest file that meets the goal is copied to
          smallest.tflite (+ .json)

    goal  file <= 1,000,000 bytes and top-1 >= the FP32 reference's 82.40 % minus 1.0 point (all 10,000 images)

Each step is skipped when its output exists, so an interrupted run resumes. The recipes (the pruning commands
that make their checkpoints) are in benchmarks/results/smallest/README.md.

    python benchmarks/smallest.py --out benchmarks/results/smallest \\
        --recipe "dense=../shared/models/cifar10_mobilenetv2_w1.0.pt" --recipe "L1 86.5 %=runs/small865/pruned.pt"
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common import plots  # noqa: E402
from common.files import atomic_write_bytes, atomic_write_text  # noqa: E402
from common.provenance import collect_meta, write_meta  # noqa: E402

GOAL_BYTES = 1_000_000
REFERENCE_TOP1 = 0.8240      # ../shared/models/README.md: the reference checkpoint on all 10,000 test images
GOAL_TOP1 = REFERENCE_TOP1 - 0.010
COLUMNS = ["recipe", "checkpoint", "file", "file_bytes", "sparse_weights", "zero_weight_fraction", "top1_file",
           "test_images", "max_lsb", "top1_sim_1000", "host_ms_median", "host_ms_p5", "host_ms_p95", "goal"]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _quantize(ckpt: str, d: Path) -> Path:
    if not (d / "quantized.pt").exists():
        _run([sys.executable, "-m", "quantize", "--checkpoint", ckpt, "--config", "W8A8", "--calib-size", "1000",
              "--eval-images", "1000", "--no-export", "--out", str(d)])
    return d / "quantized.pt"


def _export(q: Path, f: Path) -> dict:
    if not Path(str(f) + ".json").exists():
        _run([sys.executable, "-m", "export", "--checkpoint", str(q), "--out", str(f), "--val-images", "1000",
              "--reported-images", "200"])
    return json.loads(Path(str(f) + ".json").read_text())


def _test_set():
    from mobilenet.data import DEFAULT_DATA, BatchLoader, DataConfig, load_dataset
    ds = load_dataset(DataConfig(root=DEFAULT_DATA, layout="cifar"))
    return next(iter(BatchLoader(ds.test, len(ds.test), "cifar")))


def _file_top1(q: Path, f: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    from export.pipeline import load_for_export
    from export.validate import run_file
    qm, _ = load_for_export(str(q))
    got = run_file(f.read_bytes(), qm, x, kernels="xnnpack")
    return (got.argmax(1) == y).double().mean().item()


def _pareto(rows: list[dict], path: Path, footer: str) -> Path:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    xs = [r["file_bytes"] / 1e6 for r in rows]
    ys = [100 * r["top1_file"] for r in rows] + [100 * GOAL_TOP1, 100 * REFERENCE_TOP1]
    ax.set_xlim(0, max(xs + [GOAL_BYTES / 1e6]) * 1.25)
    ax.set_ylim(min(ys) - 0.4, max(ys) + 0.4)
    ax.axvline(GOAL_BYTES / 1e6, color="#b22222", ls="--", lw=1)
    ax.axhline(100 * GOAL_TOP1, color="#b22222", ls="--", lw=1)
    ax.axhline(100 * REFERENCE_TOP1, color="#777777", ls=":", lw=1)
    ax.fill_between([0, GOAL_BYTES / 1e6], 100 * GOAL_TOP1, ax.get_ylim()[1], color="#b22222", alpha=0.06)
    ax.text(0.02, 100 * GOAL_TOP1 - 0.03, "goal: <= 1,000,000 bytes and >= 81.40 % (shaded)", color="#b22222",
            va="top", fontsize=8)
    ax.text(0.02, 100 * REFERENCE_TOP1 + 0.02, "FP32 reference 82.40 %", color="#555555", va="bottom", fontsize=8)
    for r, x in zip(rows, xs):
        met = r["goal"] == "met"
        ax.scatter(x, 100 * r["top1_file"], s=46, color="#1f77b4" if met else "#888888", zorder=3)
        ms = f"{r['host_ms_median']:.2f} ms" if r.get("host_ms_median") is not None else "latency n/a"
        ax.annotate(f"{r['recipe']}\n{r['file_bytes']:,} B, {ms}", (x, 100 * r["top1_file"]), fontsize=8,
                    xytext=(-8, 6), textcoords="offset points", ha="right", va="bottom")
    ax.set_xlabel("file size (MB, 1 MB = 10^6 bytes)")
    ax.set_ylabel("top-1 of the .tflite file, all 10,000 test images (%)")
    ax.set_title("Every recipe tried: W8A8 files from the CIFAR-10 reference\n(label: file bytes, host latency "
                 "median at 1 thread, XNNPACK)", fontsize=10)
    ax.grid(True, alpha=0.3)
    return plots.save_figure(fig, path, footer)


def _recipe_line(name: str, ckpt: str) -> str:
    d = Path(ckpt).parent
    line = f"- **{name}**: `{ckpt}`"
    if (d / "prune_meta.json").exists():
        pm = json.loads((d / "prune_meta.json").read_text())
        line += f", made by `{pm['command']}` (commit `{(pm.get('commit') or '?')[:10]}`)"
    if (d / "prune_report.json").exists():
        pr = json.loads((d / "prune_report.json").read_text())
        ft = pr.get("finetune") or {}
        line += (f"; global sparsity {pr.get('global_sparsity', 0):.3f}, BN re-estimated, "
                 f"{ft.get('steps', 0)} fine-tuning steps ({ft.get('images', 0):,} images, "
                 f"{ft.get('seconds', 0) / 60:.0f} min)")
    return line


def _readme(rows: list[dict], meta: dict, best: dict | None, recipes: list[tuple[str, str]]) -> str:
    m = meta["machine"]
    lines = ["# The smallest file within one point (issue 16, point 2)", "",
             "Generated by `benchmarks/smallest.py`; every figure below is measured, none typed by hand.", "",
             f"- command: `{meta['command']}`", f"- commit: `{meta['commit']}`" +
             (" (with uncommitted changes)" if meta.get("commit_dirty") else ""),
             f"- machine: {m['cpu']} ({m.get('isa')}), {m['cores']} cores; {meta['date']}",
             f"- goal: at most {GOAL_BYTES:,} bytes and top-1 at least {100 * GOAL_TOP1:.2f} % (the FP32 "
             f"reference's {100 * REFERENCE_TOP1:.2f} % minus 1.0 point) on all 10,000 test images, measured on the "
             "file (XNNPACK)", "",
             "| recipe | file bytes | sparse weights | zero weights | top-1 (file, 10,000) | max LSB vs integer "
             "simulation | host latency, median (p5-p95) | goal |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = (f"{r['host_ms_median']:.3f} ms ({r['host_ms_p5']:.3f}-{r['host_ms_p95']:.3f})"
               if r.get("host_ms_median") is not None else "n/a")
        lines.append(f"| {r['recipe']} | {r['file_bytes']:,} | {r['sparse_weights']} | "
                     f"{100 * r['zero_weight_fraction']:.1f} % | {100 * r['top1_file']:.2f} % | {r['max_lsb']} | "
                     f"{lat} | {r['goal']} |")
    lines += ["", "![top-1 against file bytes](pareto.png)", "",
              "Recipes: each a checkpoint, and the command that made it where a pruning run recorded one "
              "(its prune_meta.json and prune_report.json beside the checkpoint), then W8A8 per-channel PTQ "
              "(`python -m quantize --config W8A8 --calib-size 1000`) and `python -m export` (sparse storage "
              "where smaller):", ""] + [_recipe_line(n, c) for n, c in recipes] + [""]
    if best:
        lines.append(f"The smallest file that meets the goal: `smallest.tflite` ({best['recipe']}, "
                     f"{best['file_bytes']:,} bytes, top-1 {100 * best['top1_file']:.2f} %), its export report "
                     "`smallest.tflite.json`.")
    else:
        lines.append("No recipe met the goal: nothing is published as smallest.tflite.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="results directory (resumes from what it holds)")
    ap.add_argument("--recipe", action="append", required=True, help="NAME=CHECKPOINT, repeatable")
    ap.add_argument("--work", default="", help="where the quantized checkpoints go (default: <out>/work)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    work = Path(a.work) if a.work else out / "work"
    recipes = []
    for spec in a.recipe:
        name, sep, ckpt = spec.partition("=")
        if not sep or not name or not Path(ckpt).is_file():
            print(f"error: --recipe {spec!r}: expected NAME=CHECKPOINT with an existing checkpoint", file=sys.stderr)
            return 2
        recipes.append((name, ckpt))
    out.mkdir(parents=True, exist_ok=True)
    x, y = _test_set()
    rows = []
    for name, ckpt in recipes:
        d = work / _slug(name)
        q = _quantize(ckpt, d)
        f = d / "model_w8a8.tflite"
        rep = _export(q, f)
        done = d / "top1_file.json"
        if not done.exists():
            atomic_write_text(json.dumps({"top1": _file_top1(q, f, x, y), "images": len(y)}) + "\n", done)
        t = json.loads(done.read_text())
        w = rep["graph"]["weights"]
        qm_metrics = json.loads((d / "metrics.json").read_text()).get("metrics", {})
        size = f.stat().st_size
        rows.append({"recipe": name, "checkpoint": ckpt, "file": str(f), "file_bytes": size,
                     "sparse_weights": f"{w['sparse_weights']} of {w['sparse_weights'] + w['dense_weights']}",
                     "zero_weight_fraction": rep["weights"]["zero_fraction_file"],
                     "top1_file": t["top1"], "test_images": t["images"],
                     "max_lsb": rep["validation"]["runs"]["xnnpack"]["max_lsb"],
                     "top1_sim_1000": qm_metrics.get("acc_q"),
                     "goal": "met" if size <= GOAL_BYTES and t["top1"] >= GOAL_TOP1 - 1e-12 else
                             "missed: " + ", ".join(s for s in (
                                 f"{size - GOAL_BYTES:,} bytes over" if size > GOAL_BYTES else "",
                                 f"{100 * (GOAL_TOP1 - t['top1']):.2f} points under" if t["top1"] < GOAL_TOP1
                                 else "") if s)})
    from bench.host import HostConfig, run_host
    timed = {Path(r["model"]).resolve(): r for r in run_host(HostConfig(models=[r["file"] for r in rows], runs=200))}
    for r in rows:
        h = timed[Path(r["file"]).resolve()]
        r.update(host_ms_median=h["median_ms"], host_ms_p5=h["p5_ms"], host_ms_p95=h["p95_ms"])
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    wr.writeheader()
    wr.writerows(rows)
    atomic_write_text(buf.getvalue(), out / "smallest.csv")
    meta = collect_meta("python benchmarks/smallest.py " + " ".join(
        f"'{s}'" if " " in s else s for s in (argv if argv is not None else sys.argv[1:])), recipes[0][1],
        eval_subset="all 10,000 CIFAR-10 test images")
    write_meta(out / "meta.json", meta)
    _pareto(rows, out / "pareto.png", plots.footer_text(meta))
    met = [r for r in rows if r["goal"] == "met"]
    best = min(met, key=lambda r: r["file_bytes"]) if met else None
    if best:
        atomic_write_bytes(Path(best["file"]).read_bytes(), out / "smallest.tflite")
        shutil.copyfile(best["file"] + ".json", out / "smallest.tflite.json")
    atomic_write_text(_readme(rows, meta, best, recipes), out / "README.md")
    for r in rows:
        print(f"{r['recipe']:>28}: {r['file_bytes']:>10,} bytes, top-1 {100 * r['top1_file']:.2f} % (file, "
              f"{r['test_images']:,} images), {r['host_ms_median']:.3f} ms, {r['goal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
