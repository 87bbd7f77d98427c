"""Cost of one QAT training step against one FP32 step of the same MobileNetV2 (issue 4: goal <= 1.3x).

Both steps run the same loop (forward, cross-entropy, backward, SGD step) on the same batch, float32,
channels_last; the QAT model is W8A8 per-channel in its early phase (BN batch statistics, observers on, fake
quant on: the most expensive phase). Repeats alternate FP32 / QAT so load on a shared CPU hits both alike;
the figure is the ratio of the medians.

    python benchmarks/qat_step.py --batch 64 --repeats 7 --threads 1
    python benchmarks/qat_step.py --profile      # the top operators of each step
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mobilenet import ModelConfig, build_model, load_model  # noqa: E402
from mobilenet.data import BatchLoader, DataConfig, load_dataset  # noqa: E402
from quantize import prepare, recipe  # noqa: E402
from quantize.qmodel import calibrate, freeze, freeze_bn  # noqa: E402
from quantize.qat import _start_fake_quant  # noqa: E402

REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "cifar10_mobilenetv2_w1.0.pt"


def _step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if not torch.isfinite(loss):   # a diverged step is not a step to time
        raise SystemExit(f"the loss is {float(loss)}: training diverged; the timing would mean nothing")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(REFERENCE),
                   help="the model to train (default: the CIFAR-10 reference); 'random' for a freshly initialized "
                        "one (its BN running statistics are the initial ones, so the ranges calibrated in eval mode "
                        "do not fit the batch statistics of training: QAT from scratch degenerates, see RESULTS.md)")
    p.add_argument("--width", type=float, default=1.0, help="with --checkpoint random")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per model, alternating")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--phase", choices=["observing", "frozen"], default="observing",
                   help="observing: BN batch statistics, observers on; frozen: BN and observers frozen")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    if a.checkpoint == "random":
        model = build_model(ModelConfig(layout="cifar", width_mult=a.width, num_classes=10)).eval()
        x, y = torch.randn(a.batch, 3, 32, 32), torch.randint(0, 10, (a.batch,))
    else:   # a real start: trained weights, real images (the first training batch), their labels
        model, _ = load_model(a.checkpoint)
        model.eval()
        ds = load_dataset(DataConfig())
        x, y = next(iter(BatchLoader(ds.train, a.batch, model.cfg.layout)))
    qm = prepare(model, recipe("W8A8", act_observer="ema"), qat=True)
    calibrate(qm, [x])
    _start_fake_quant(qm)
    if a.phase == "frozen":
        freeze_bn(qm)
        freeze(qm)
    x = x.contiguous(memory_format=torch.channels_last)
    runs = {}
    for name, m in (("fp32", model), ("qat", qm)):
        m.to(memory_format=torch.channels_last).train()
        runs[name] = (m, torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9), [])
        _step(m, runs[name][1], x, y)  # warm-up: allocator, oneDNN primitives
    if a.profile:
        from torch.profiler import profile
        for name, (m, opt, _) in runs.items():
            with profile() as prof:
                _step(m, opt, x, y)
            print(f"--- {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    for _ in range(a.repeats):
        for name, (m, opt, times) in runs.items():
            t0 = time.perf_counter()
            _step(m, opt, x, y)
            times.append(time.perf_counter() - t0)
    med = {k: statistics.median(v[2]) for k, v in runs.items()}
    spread = {k: (min(v[2]), max(v[2])) for k, v in runs.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    print(f"model {Path(a.checkpoint).name if a.checkpoint != 'random' else f'random width {a.width}'}, batch {a.batch}, {a.repeats} alternating repeats, {a.threads} thread(s), phase "
          f"{a.phase}, torch {torch.__version__}, {platform.machine()} x{os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}, commit {commit}")
    for k in med:
        print(f"  {k:5s} step: median {med[k] * 1e3:8.1f} ms  (min {spread[k][0] * 1e3:.1f}, "
              f"max {spread[k][1] * 1e3:.1f})  {a.batch / med[k]:.1f} img/s")
    print(f"  QAT / FP32 = {med['qat'] / med['fp32']:.2f}x  (goal <= 1.30x)")
    return med["qat"] / med["fp32"]


if __name__ == "__main__":
    main()
