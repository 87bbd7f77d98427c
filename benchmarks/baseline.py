"""Train the CIFAR-10 FP32 baseline for a given budget and record its accuracy per epoch.

    python benchmarks/baseline.py                                     # train.py's default budget
    python benchmarks/baseline.py --epochs 6 --max-train-images 0 --out runs/baseline_6ep   # the reference recipe

Every argument goes to train.py unchanged. Afterwards <out>/baseline.md holds the command, commit, machine,
wall time and a table of loss and accuracy per epoch, ready to paste into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from common.files import atomic_write_text  # noqa: E402

__all__ = ["main", "machine", "commit"]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} cores, load average {load:.1f} at the end"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    t0 = time.time()
    rc = train.main(argv)
    if rc != 0:
        return rc
    wall = time.time() - t0
    out = Path(vars(train.build_parser().parse_args(argv)).get("out", train.TrainConfig.out))
    metrics = json.loads((out / "metrics.json").read_text())
    rows = ["| epoch | train loss | train acc (augmented) % | test acc % | test images | train img/s |",
            "|---|---|---|---|---|---|"]
    for r in metrics["history"]:
        acc = f"{100 * r['test_acc']:.2f}" if "test_acc" in r else "-"
        rows.append(f"| {r['epoch']} | {r['train_loss']:.4f} | {100 * r['train_acc']:.2f} | {acc} | "
                    f"{r.get('test_images', '-')} | {r['images_per_s']:.0f} |")
    final = metrics["final"]
    text = "\n".join([
        f"command: `python benchmarks/baseline.py {shlex.join(argv)}`",
        f"commit: {commit()}; machine: {machine()}; torch {train.torch.__version__}",
        f"wall time: {wall:.0f} s ({wall / 60:.1f} min), 1 run; final test accuracy "
        f"{100 * final['test_acc']:.2f}% on {final['test_images']} test images",
        "", *rows, ""])
    atomic_write_text(text, out / "baseline.md")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
