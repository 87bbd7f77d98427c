"""Our W8A8 PTQ against litert-torch's own PT2E quantizer, side by side in one run (issue 4).

Both start from the same FP32 model, calibrate on the same images and are scored on the same images:

    ours   prepare(model, recipe("W8A8")) -> calibrate -> freeze: int8 weights per output channel, asymmetric
           int8 activations per tensor (min/max), int32 biases at s_in * s_w, BN folded first
    PT2E   torch.export -> prepare_pt2e(PT2EQuantizer with get_symmetric_quantization_config(is_per_channel=True))
           -> calibrate -> convert_pt2e(fold_quantize=False): litert-torch's static per-channel int8 recipe
           (histogram observers on activations, per-channel min/max on weights)

Figure of merit: logits SNR against FP32, 10 log10(sum fp^2 / sum (fp - q)^2) over all logits of the
evaluation images (dB); top-1 and agreement with FP32 beside it. Goal: ours >= 30 dB and >= PT2E + 1 dB.

    python benchmarks/pt2e_peer.py --calib 1000 --eval-images 2000
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

from common.cli import EVAL_IMAGES_HELP  # noqa: E402
from mobilenet import load_model  # noqa: E402
from mobilenet.data import BatchLoader, DataConfig, load_dataset  # noqa: E402
from mobilenet.engine import predict  # noqa: E402
from quantize import prepare, recipe  # noqa: E402
from quantize.qmodel import calibrate, freeze  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "models" / "cifar10_mobilenetv2_w1.0.pt"


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    err = (ref.double() - out.double()).pow(2).sum()
    return float(10 * torch.log10(ref.double().pow(2).sum() / err.clamp_min(1e-300)))


def _pt2e(model, calib_batches, batch: int):
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e import quantize_pt2e
    example = (torch.zeros(batch, 3, 32, 32),)
    exported = torch.export.export(model.eval(), example).module()
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in calib_batches:
            prepared(x)
    return quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)


@torch.no_grad()
def _logits(fn, split, layout, batch):
    out = []
    for x, _ in BatchLoader(split, batch, layout):
        out.append(fn(x).float())
    return torch.cat(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REFERENCE))
    p.add_argument("--calib", type=int, default=1000, help="calibration images (the calibration split)")
    p.add_argument("--eval-images", type=int, default=2000, help=EVAL_IMAGES_HELP)
    p.add_argument("--batch", type=int, default=100, help="images per batch; must divide both counts (PT2E "
                                                          "exports a static batch)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "runs" / "pt2e_peer.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.monotonic()

    model, _ = load_model(a.model)
    ds = load_dataset(DataConfig(calib_size=a.calib))
    test = ds.test.stratified(a.eval_images)
    for n, what in ((len(ds.calib), "calibration"), (len(test), "evaluation")):
        if n % a.batch:
            raise ValueError(f"--batch {a.batch} does not divide the {n} {what} images")
    calib = [x for x, _ in BatchLoader(ds.calib, a.batch, ds.layout)]
    labels = test.labels

    fp = predict(model, test, ds.layout, batch_size=a.batch, disable_bar=True)
    rows = {"FP32": fp}

    qm = prepare(model, recipe("W8A8"))
    calibrate(qm, calib)
    freeze(qm)
    rows["ours W8A8"] = predict(qm, test, ds.layout, batch_size=a.batch, disable_bar=True)
    print(f"ours done, {time.monotonic() - t0:.0f} s", flush=True)

    conv = _pt2e(model, calib, a.batch)
    rows["PT2E W8A8"] = _logits(conv, test, ds.layout, a.batch)
    print(f"PT2E done, {time.monotonic() - t0:.0f} s", flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    result = {"model": a.model, "calib_images": len(ds.calib), "eval_images": len(test), "commit": commit,
              "torch": torch.__version__, "machine": f"{platform.machine()} x{os.cpu_count()}", "rows": {}}
    print(f"{len(ds.calib)} calibration images, {len(test)} evaluation images (class-stratified), "
          f"commit {commit}, torch {torch.__version__}")
    print(f"  {'':10s} {'SNR dB':>7s} {'top-1':>7s} {'agree':>7s}")
    for name, logits in rows.items():
        r = {"snr_db": snr_db(fp, logits) if name != "FP32" else float("inf"),
             "top1": (logits.argmax(1) == labels).float().mean().item(),
             "agree_fp32": (logits.argmax(1) == fp.argmax(1)).float().mean().item()}
        result["rows"][name] = r
        print(f"  {name:10s} {r['snr_db']:7.2f} {100 * r['top1']:6.2f}% {100 * r['agree_fp32']:6.2f}%")
    gap = result["rows"]["ours W8A8"]["snr_db"] - result["rows"]["PT2E W8A8"]["snr_db"]
    result["ours_minus_pt2e_db"] = gap
    print(f"  ours - PT2E = {gap:+.2f} dB (goal >= +1 dB; ours >= 30 dB)   {time.monotonic() - t0:.0f} s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
