"""The quantization study on the reference checkpoint (issue 4): run `python -m quantize --matrix`, then write
its CSV as a table into benchmarks/RESULTS.md under "## Quantization (issue 4)" (replacing that section only).

    nohup .venv/bin/python benchmarks/quant_matrix.py > runs/quant_matrix.log 2>&1 &
    .venv/bin/python benchmarks/quant_matrix.py --table-only     # rewrite the section from the CSV so far
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.files import atomic_write_text  # noqa: E402
from quantize.__main__ import main as quantize_main  # noqa: E402
from common.machine import cpu_summary  # noqa: E402
from common.matrix import read_matrix  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "models" / "cifar10_mobilenetv2_w1.0.pt"
HEADING = "## Quantization (issue 4)"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(rows: list[dict]) -> str:
    head = ("| configuration | granularity | calibration | methods | top-1 % | Δ vs FP32 (pts) | agreement % "
            "| logits SNR (dB) | weights (MB) | × smaller |")
    lines = [head, "|" + "---|" * 10]
    fp32 = next((r["weight_bytes"] for r in rows if r["method"] == "fp32"), None)
    for r in rows:
        ratio = f"{fp32 / r['weight_bytes']:.2f}" if fp32 and r["weight_bytes"] else "?"
        lines.append(f"| {r['config']} | {r['granularity']} | {r['calib']} | {r['method']} | "
                     f"{100 * r['top1']:.2f} | {100 * (r['top1'] - r['top1_fp32']):+.2f} | {100 * r['agreement']:.2f} | "
                     f"{r['snr_db']:.2f} | {r['weight_bytes'] / 1e6:.3f} | {ratio} |")
    return "\n".join(lines)


def section(rows: list[dict], command: str, eval_size: int, iters: int) -> str:
    n = rows[0]["eval_images"] if rows else eval_size
    return f"""{HEADING}

Post-training quantization of the reference checkpoint ({REFERENCE.name}, FP32 82.40% on all 10,000 test images)
in the fake-quant simulation (quantize/qmodel.py: int8 LiteRT quantization points, int32 biases).

- command: `{command}`
- commit: {_git_commit()}
- machine: {cpu_summary()}, CPU simulation
- evaluation: {n} test images, evenly spaced over the class-sorted test set (every {10000 // int(n)}th), one run each
  (deterministic: seeded calibration split, seeded random calibration data); top-1 of FP32 on this subset is in
  the Δ column's reference
- calibration: 1,000 training images (split `calib`, seed 0) or 1,000 N(0, 1) images (`random`); min-max
  observers; AdaRound / bias correction / CLE bounds on the first 256 of them; AdaRound {iters} steps per layer
- SNR: 10 log10(Σ y² / Σ (y - y_q)²) of the logits over the subset, FP32 logits as y
- weights: conv/linear weights at the configured width plus int32 biases (no scales, no graph overhead)

{table(rows)}
"""


def write_section(results: Path, text: str):
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    if HEADING in old:
        start = old.index(HEADING)
        nxt = old.find("\n## ", start + len(HEADING))
        new = old[:start] + text + (old[nxt + 1:] if nxt >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    atomic_write_text(new, results)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(REFERENCE))
    p.add_argument("--out", default=str(ROOT / "runs" / "quant_matrix"))
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--adaround-iters", type=int, default=200)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--table-only", action="store_true", help="only rewrite the RESULTS.md section from the CSV")
    a = p.parse_args(argv)
    argv_q = ["--checkpoint", a.checkpoint, "--matrix", "--out", a.out, "--eval-images", str(a.eval_images),
              "--adaround-iters", str(a.adaround_iters), "--no-progress"]
    command = "python benchmarks/quant_matrix.py " + " ".join(argv or sys.argv[1:])
    if not a.table_only:
        rc = quantize_main(argv_q)
        if rc:
            return rc
    rows = read_matrix(Path(a.out) / "matrix.csv")
    write_section(Path(a.results), section(rows, command.strip(), a.eval_images, a.adaround_iters))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
