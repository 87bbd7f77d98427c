"""W4A8 by QAT from the reference checkpoint, against FP32 and W4A8 PTQ on the same images (issue 4: goal
QAT top-1 within 2 points of FP32).

    python benchmarks/qat_w4a8.py --epochs 2 --images 3200 --lr 5e-4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mobilenet import load_model  # noqa: E402
from mobilenet.data import BatchLoader, DataConfig, load_dataset  # noqa: E402
from mobilenet.engine import evaluate  # noqa: E402
from quantize import prepare, recipe  # noqa: E402
from quantize.qat import QATConfig, run_qat  # noqa: E402
from quantize.qmodel import calibrate, freeze  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "models" / "cifar10_mobilenetv2_w1.0.pt"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(REFERENCE))
    p.add_argument("--recipe", default="W4A8")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=3200, help="training images per epoch")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--freeze-bn-epoch", type=int, default=1)
    p.add_argument("--freeze-observer-epoch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "runs" / "qat_w4a8.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.monotonic()
    model, _ = load_model(a.model)
    ds = load_dataset(DataConfig())
    test = ds.test.subset(torch.arange(0, len(ds.test), 5))   # the 2,000-image every-5th subset
    res = {"fp32": evaluate(model, test, ds.layout, disable_bar=True)["acc"]}
    qcfg = recipe(a.recipe)
    ptq = prepare(model, qcfg)
    calibrate(ptq, [x for x, _ in BatchLoader(ds.calib, 100, ds.layout)])
    freeze(ptq)
    res["ptq"] = evaluate(ptq, test, ds.layout, disable_bar=True)["acc"]
    print(f"FP32 {100 * res['fp32']:.2f}%, {a.recipe} PTQ {100 * res['ptq']:.2f}%, {time.monotonic() - t0:.0f} s",
          flush=True)
    cfg = QATConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch, max_images_per_epoch=a.images,
                    freeze_bn_epoch=a.freeze_bn_epoch, freeze_observer_epoch=a.freeze_observer_epoch)
    qat = run_qat(model, ds, qcfg, cfg, log=lambda s: print(s, flush=True))
    res["qat"] = evaluate(qat, test, ds.layout, disable_bar=True)["acc"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    res.update(recipe=a.recipe, qat_config=cfg.to_dict(), history=qat.qat_history, commit=commit,
               eval_images=len(test), seconds=round(time.monotonic() - t0), torch=torch.__version__,
               machine=f"{platform.machine()} x{os.cpu_count()}")
    print(f"{a.recipe}: FP32 {100 * res['fp32']:.2f}%, PTQ {100 * res['ptq']:.2f}%, QAT {100 * res['qat']:.2f}% "
          f"({len(test)} test images), {res['seconds']} s, commit {commit}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
