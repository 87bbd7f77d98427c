"""Training speed of our MobileNetV2 against torchvision's `mobilenet_v2`, in one run, as a ratio (goal >= 0.95);
with --precision, the default precision against the faster of FP32 and bf16 on this machine (goal >= 0.90).

    python benchmarks/train_speed.py                       # width 1.0, batch 128, default precision, channels_last
    python benchmarks/train_speed.py --width 0.5 --repeats 7
    python benchmarks/train_speed.py --precision           # ours in FP32 and in bf16, interleaved

Both models get the CIFAR layout (torchvision's with the stem and stage-2 strides set to 1, as in
shared/models/README.md), the same SGD-Nesterov step with label smoothing, the same batch of normalized images
(fixed synthetic pixels: this measures the model, not the loader), the precision mobilenet/precision.py picks for
this machine (or --bf16 / --no-bf16) and channels_last. The repeats interleave the two models (ours, torchvision,
ours, ...) so that a change in machine load hits both; the ratio is the median of the per-repeat ratios. Every
figure is printed with the CPU and its instruction sets (AVX2, AVX-512 VNNI, bf16).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models import mobilenet_v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.cli import Parser, add_config  # noqa: E402
from mobilenet import ModelConfig, build_model  # noqa: E402
from mobilenet.data import normalize  # noqa: E402
from mobilenet.engine import autocast_ctx  # noqa: E402
from mobilenet.precision import resolve_precision  # noqa: E402
from common.machine import cpu_summary

__all__ = ["SpeedConfig", "main"]


@dataclass
class SpeedConfig:
    width: float = 1.0        # width multiplier of both models
    batch_size: int = 128     # images per step
    steps: int = 4            # timed optimizer steps per repeat and model
    warmup: int = 2           # untimed steps per model before the first repeat (allocator, oneDNN primitives)
    repeats: int = 5          # interleaved repeats (ours, torchvision) x repeats
    bf16: bool | None = None  # bf16 autocast in the forward pass; None: the hardware's choice
    precision: bool = False   # time ours in FP32 and bf16 instead of ours against torchvision
    channels_last: bool = True
    threads: int = 0          # torch threads; 0 = torch's default (one per core)
    seed: int = 0


def _parser() -> Parser:
    p = Parser(prog="benchmarks/train_speed.py", description=__doc__.split("\n\n")[0])
    add_config(p, SpeedConfig)
    return p


def _torchvision_cifar(width: float) -> torch.nn.Module:
    tv = mobilenet_v2(width_mult=width, num_classes=10)
    tv.features[0][0].stride = (1, 1)           # stem: stride 2 -> 1 for CIFAR
    tv.features[2].conv[1][0].stride = (1, 1)   # stage 2, first block, dw: stride 2 -> 1 for CIFAR
    return tv


def _step_fn(model, bf16: bool, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step():
        with autocast_ctx("cpu", bf16):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv: list[str] | None = None) -> int:
    cfg = SpeedConfig(**vars(_parser().parse_args(argv)))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x = normalize(torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8, generator=g))  # (N, 3, 32, 32)
    y = torch.randint(0, 10, (cfg.batch_size,), generator=g)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory)
    prec = resolve_precision(cfg.bf16, "cpu")
    ours = lambda: build_model(ModelConfig(layout="cifar", width_mult=cfg.width, num_classes=10))  # noqa: E731
    if cfg.precision:   # the same model in both precisions; the default is one of them
        models, bf16 = {"fp32": ours(), "bf16": ours()}, {"fp32": False, "bf16": True}
    else:
        models, bf16 = {"ours": ours(), "torchvision": _torchvision_cifar(cfg.width)}, {}
    steps = {}
    for name, m in models.items():
        m.to(memory_format=memory).train()
        steps[name] = _step_fn(m, bf16.get(name, prec.bf16), x, y)
        for _ in range(cfg.warmup):
            steps[name]()
    rates = {name: [] for name in models}  # images per second, one entry per repeat
    for r in range(cfg.repeats):
        for name in models:
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                steps[name]()
            rates[name].append(cfg.steps * cfg.batch_size / (time.perf_counter() - t0))
        print(f"repeat {r + 1}/{cfg.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nconfig: {asdict(cfg)}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus, {cpu_summary()}; default precision {prec}")
    for k, v in rates.items():
        print(f"{k:12s} median {med[k]:7.1f} img/s  (min {min(v):.1f}, max {max(v):.1f}, {len(v)} repeats)")
    if cfg.precision:
        faster = max(med, key=med.get)
        ratios = [a / max(a, b) if prec.name == "fp32" else b / max(a, b) for a, b in zip(rates["fp32"], rates["bf16"])]
        print(f"bf16/fp32 throughput: {med['bf16'] / med['fp32']:.3f}; default ({prec.name}) / faster ({faster}): "
              f"median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); goal >= 0.90")
        return 0
    ratios = [a / b for a, b in zip(rates["ours"], rates["torchvision"])]
    print(f"ratio ours/torchvision: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); goal >= 0.95")
    return 0


if __name__ == "__main__":
    sys.exit(main())
