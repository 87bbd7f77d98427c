"""Sparse weight storage on a pruned model (issue 16, point 1): file bytes, sparse (CSR + DENSIFY) against dense.

    step  what
    1     (unless --quantized) python -m quantize --config W8A8 --no-export on the pruned checkpoint
    2     the FP32 file of the pruned checkpoint and the INT8 file of its W8A8 model, each exported twice through
          export.pipeline.run_export (what python -m export runs): --weights-storage dense and auto. The two
          exports of one kind share one litert-torch conversion (the same bytes would come out twice); each is
          edited, validated (--val-images, the usual gates) and reported on its own
    3     print bytes and ratios, write <out>/sparse_bench.json

    goal (issue 16, 70 % pruned and fine-tuned reference)   INT8 sparse <= 0.70x INT8 dense; FP32 sparse <= 0.45x
                                                            FP32 dense (bytes, uncompressed)

    python benchmarks/sparse_bench.py --pruned runs/prune/pruned.pt --out runs/sparse_bench [--val-images 1000]
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.files import atomic_write_text  # noqa: E402
from export.pipeline import ExportConfig, run_export  # noqa: E402

GOALS = {"fp32": 0.45, "int8": 0.70}


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def _quantize(pruned: Path, out: Path, eval_images: int) -> Path:
    cmd = [sys.executable, "-m", "quantize", "--checkpoint", str(pruned), "--config", "W8A8", "--out", str(out),
           "--no-export", "--eval-images", str(eval_images)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out / "quantized.pt"


def _export_pair(ckpt: Path, tag: str, out: Path, val_images: int) -> dict:
    """{storage: report} for dense and auto storage of one checkpoint, from one conversion."""
    convert = importlib.import_module("export.convert")
    real, cache = convert.litert_bytes, {}
    convert.litert_bytes = lambda *a: cache.setdefault(a[1:], real(*a))
    try:
        reps = {}
        for storage in ("dense", "auto"):
            cfg = ExportConfig(checkpoint=str(ckpt), out=str(out / f"{tag}_{storage}.tflite"),
                               weights_storage=storage, val_images=val_images)
            reps[storage] = run_export(cfg)
            fs = reps[storage]["file_summary"]
            print(f"{tag} {storage}: {fs['size_bytes']:,} bytes, {fs['sparse_weights']} sparse weights, "
                  f"validation passed {reps[storage]['validation']['passed']}", flush=True)
        return reps
    finally:
        convert.litert_bytes = real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pruned", required=True, help="pruned FP32 checkpoint (python -m prune: pruned.pt)")
    ap.add_argument("--quantized", default="", help="its W8A8 checkpoint (default: made here, step 1)")
    ap.add_argument("--out", default="runs/sparse_bench", help="output directory")
    ap.add_argument("--val-images", type=int, default=1000, help="validation images per export")
    ap.add_argument("--eval-images", type=int, default=0, help="python -m quantize --eval-images (0 = all)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    quantized = Path(a.quantized) if a.quantized else _quantize(Path(a.pruned), out / "quantize", a.eval_images)
    result = {"pruned": a.pruned, "quantized": str(quantized), "cpu": _cpu(), "val_images": a.val_images,
              "kinds": {}}
    for kind, ckpt in (("fp32", Path(a.pruned)), ("int8", quantized)):
        reps = _export_pair(ckpt, kind, out, a.val_images)
        dense, auto = (reps[s]["file_summary"]["size_bytes"] for s in ("dense", "auto"))
        runs = {s: {k: {m: r.get(m) for m in ("agreement", "acc_file", "max_lsb", "max_abs_diff", "n")}
                    for k, r in reps[s]["validation"]["runs"].items()} for s in reps}
        result["kinds"][kind] = {"dense_bytes": dense, "sparse_bytes": auto, "ratio": auto / dense,
                                 "goal": GOALS[kind], "met": auto / dense <= GOALS[kind],
                                 "sparse_weights": reps["auto"]["file_summary"]["sparse_weights"],
                                 "weights": reps["auto"]["graph"].get("weights"),
                                 "validation_passed": {s: reps[s]["validation"]["passed"] for s in reps},
                                 "runs": runs}
    atomic_write_text(json.dumps(result, indent=2) + "\n", str(out / "sparse_bench.json"))
    print(f"\nCPU: {result['cpu']}")
    for kind, r in result["kinds"].items():
        print(f"{kind}: dense {r['dense_bytes']:,} B, sparse {r['sparse_bytes']:,} B, ratio {r['ratio']:.3f} "
              f"(goal <= {r['goal']:.2f}: {'met' if r['met'] else 'NOT met'}), {r['sparse_weights']} sparse weights")
    return 0 if all(r["met"] for r in result["kinds"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
