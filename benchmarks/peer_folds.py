"""Two files of one matrix pair, ours and ai-edge-quantizer's, scored on the whole test set in folds: is the
published SNR gap (measured on the 2,000-image reference subset) larger than its spread over other images?

The test set is split into K interleaved folds (fold k: images k, k + K, k + 2K, ...; with K = 5 on CIFAR-10,
fold 0 is the 2,000-image subset the matrix reports). Each file's logits come from `bench.peers.file_logits`, the
code the matrix measures both files with, and are compared with the FP32 model's (quantize.metrics.compare_logits):
SNR per fold and over all images, and the difference ours - AEQ with its min / median / max over the folds.

    python benchmarks/peer_folds.py --ours runs/matrix/tflite/W4A32_per-channel.tflite \
        --aeq runs/matrix/peers/W4A32_per-channel_aeq.tflite --out runs/peer_folds/w4a32
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import file_logits  # noqa: E402
from common.files import atomic_write_text  # noqa: E402
from common.provenance import collect_meta, command_line  # noqa: E402
from mobilenet import load_model  # noqa: E402
from mobilenet.checkpoint import load_checkpoint  # noqa: E402
from mobilenet.data import DEFAULT_DATA, DataConfig, load_dataset  # noqa: E402
from mobilenet.engine import predict  # noqa: E402
from quantize.metrics import compare_logits  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "models" / "cifar10_mobilenetv2_w1.0.pt"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/peer_folds.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", required=True, help="our .tflite of the pair")
    p.add_argument("--aeq", required=True, help="ai-edge-quantizer's .tflite of the pair")
    p.add_argument("--checkpoint", default=str(REFERENCE), help="the FP32 checkpoint both files were made from")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--folds", type=int, default=5, help="interleaved folds of the test set (>= 2)")
    p.add_argument("--out", required=True, help="folder for peer_folds.json")
    a = p.parse_args(argv)
    if a.folds < 2:
        p.error(f"--folds should be >= 2 instead of {a.folds}")
    for what in ("ours", "aeq", "checkpoint"):
        if not Path(getattr(a, what)).is_file():
            p.error(f"--{what} {getattr(a, what)} is not a file")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    model, _ = load_model(load_checkpoint(a.checkpoint), where=a.checkpoint)
    ds = load_dataset(DataConfig(root=a.data, layout=model.cfg.layout, resolution=model.cfg.input_size))
    test, layout = ds.test, model.cfg.layout
    ref = predict(model, test, layout, desc="eval fp32")
    logits = {k: file_logits(Path(getattr(a, k)), test, layout) for k in ("ours", "aeq")}
    folds = []
    for k in range(a.folds):
        idx = list(range(k, len(test), a.folds))
        m = {f: compare_logits(ref[idx], logits[f][idx], test.labels[idx]) for f in logits}
        folds.append({"fold": k, "images": len(idx), **{f"{f}_snr_db": round(m[f]["snr_db"], 3) for f in m},
                      **{f"{f}_top1": m[f]["acc_q"] for f in m},
                      "diff_db": round(m["ours"]["snr_db"] - m["aeq"]["snr_db"], 3)})
    whole = {f: compare_logits(ref, logits[f], test.labels) for f in logits}
    diffs = [f["diff_db"] for f in folds]
    result = {"meta": collect_meta(command_line(), a.checkpoint, eval_subset=f"all {len(test)} test images, "
                                   f"{a.folds} interleaved folds"),
              "ours": a.ours, "aeq": a.aeq, "folds": folds,
              "whole": {f"{f}_snr_db": round(whole[f]["snr_db"], 3) for f in whole},
              "diff_db": {"min": min(diffs), "median": statistics.median(diffs), "max": max(diffs)}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=2) + "\n", out / "peer_folds.json")
    for f in folds:
        print(f"fold {f['fold']} ({f['images']} images): ours {f['ours_snr_db']:.3f} dB, AEQ {f['aeq_snr_db']:.3f} dB, "
              f"ours - AEQ {f['diff_db']:+.3f} dB")
    print(f"all {len(test)} images: ours {result['whole']['ours_snr_db']:.3f} dB, AEQ "
          f"{result['whole']['aeq_snr_db']:.3f} dB; ours - AEQ over folds min {min(diffs):+.3f} / median "
          f"{statistics.median(diffs):+.3f} / max {max(diffs):+.3f} dB -> {out / 'peer_folds.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
