"""The loops every command shares: one training epoch, prediction over a split, top-1 accuracy."""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import BatchLoader, Split

__all__ = ["train_one_epoch", "predict", "evaluate", "eval_batch_size", "autocast_ctx", "TrainingDiverged",
           "DivergenceGuard", "measure_step_seconds", "budget_steps", "fit_steps_to_budget"]


class TrainingDiverged(ValueError):
    """The loss left any sane range: the run stops rather than save a broken model."""


class DivergenceGuard:
    """Stops a run whose loss is not finite, or whose smoothed loss climbs far above where it could be.

    Chance level is ln(classes) (the cross-entropy of a uniform guess; label smoothing keeps it there). A fresh
    run starts near it and falls; a fine-tune of a damaged (e.g. freshly pruned) model may start above it and
    falls too. The limit is max(2 ln C, ln C + 2, 1.5x the first loss): 4.6 for a fresh 10-class run, which a
    noisy run does not reach but one that blew up does (a 3-step warm-up to lr 0.2 on a small grayscale set
    went 2.34 -> 9.4). The loss is smoothed over ~10 steps (EMA 0.1) so one bad batch does not stop a run.
    """

    def __init__(self, lr_hint: str = "lower --lr or lengthen --warmup"):
        self.ema: float | None = None
        self.first: float | None = None
        self.step = 0
        self.lr_hint = lr_hint

    def check(self, loss: float, classes: int):
        self.step += 1
        chance = math.log(max(classes, 2))
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged at step {self.step}: the loss is {loss} ({self.lr_hint}); "
                                   f"nothing was saved for this epoch")
        self.first = loss if self.first is None else self.first
        limit = max(2 * chance, chance + 2, 1.5 * self.first)
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        if self.ema > limit:
            raise TrainingDiverged(f"training diverged at step {self.step}: smoothed loss {self.ema:.2f} is above "
                                   f"{limit:.2f} (chance level ln {classes} = {chance:.2f}); {self.lr_hint}; "
                                   f"nothing was saved for this epoch")


def autocast_ctx(device: torch.device | str, bf16: bool):
    device = torch.device(device)
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_one_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer,
                    scheduler=None, *, label_smoothing: float = 0.0, bf16: bool = False,
                    after_step: Callable[[], None] | None = None, max_steps: int | None = None,
                    desc: str = "train", disable_bar: bool = False, guard: DivergenceGuard | None = None) -> dict:
    """One pass over `loader`. `after_step` runs after every optimizer step (pruning re-applies its masks there).
    `guard` (a fresh DivergenceGuard by default) raises TrainingDiverged when the loss blows up.

    Returns {"loss": mean loss, "acc": top-1 on the augmented batches, "steps": steps taken, "images": n}.
    """
    model.train()
    guard = DivergenceGuard() if guard is None else guard
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    total = len(loader) if max_steps is None else min(len(loader), max_steps)  # the bar ends where the loop does
    bar = tqdm(loader, desc=desc, unit="batch", total=total, leave=False, disable=disable_bar, mininterval=1.0)
    for x, y in bar:
        with autocast_ctx(x.device, bf16):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        n = len(y)
        value = loss.item()
        guard.check(value, logits.shape[1])
        total_loss += value * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        steps += 1
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        if max_steps is not None and steps >= max_steps:
            break
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1), "steps": steps, "images": seen}


@torch.no_grad()
def predict(model: nn.Module, split: Split, layout: str = "cifar", batch_size: int = 250,
            device: str | torch.device = "cpu", channels_last: bool = False, desc: str = "eval",
            disable_bar: bool = False) -> torch.Tensor:
    """Logits (N, num_classes) in float32 over a whole split, in eval mode, in the split's order."""
    was_training = model.training
    model.eval()
    outs = []
    loader = BatchLoader(split, batch_size, layout, channels_last=channels_last, device=device)
    for x, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=disable_bar, mininterval=1.0):
        outs.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def eval_batch_size(resolution: int, train_batch: int) -> int:
    """Images per forward pass when evaluating: 250 at 32x32 (as every accuracy reported so far), and above that
    no more than a training step holds: 250 images at 224x224 take ~1 GB of activations (width 0.35, FP32)."""
    return 250 if resolution <= 32 else max(1, min(250, train_batch))


def evaluate(model: nn.Module, split: Split, layout: str = "cifar", **kw) -> dict:
    """{"acc": top-1 in [0, 1], "n": images} over the split."""
    logits = predict(model, split, layout, **kw)
    return {"acc": (logits.argmax(1) == split.labels).float().mean().item(), "n": len(split)}


def measure_step_seconds(model: nn.Module, loader: BatchLoader, bf16: bool, probe_steps: int = 2,
                         warmup: int = 1) -> float:
    """Median seconds per optimizer step of `model` on `loader`'s batches, timed on a throw-away copy (the model,
    its optimizer state and every RNG stay untouched). The first `warmup` steps are not counted: oneDNN builds
    its kernels there, and it ran up to 20x slower than later steps on a 2-core CPU."""
    probe = copy.deepcopy(model).train()
    opt = torch.optim.SGD(probe.parameters(), lr=1e-6, momentum=0.9)
    times = []
    with torch.random.fork_rng(devices=[]):
        for i, (x, y) in enumerate(loader):
            t0 = time.perf_counter()
            with autocast_ctx(x.device, bf16):
                loss = F.cross_entropy(probe(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - t0)
            if i + 1 >= probe_steps + warmup:
                break
    del probe, opt
    return statistics.median(times[warmup:]) if len(times) > warmup else times[-1]


def budget_steps(step_seconds: float, batch_size: int, minutes: float, epochs: int, eval_images: int = 0) -> int:
    """Optimizer steps per epoch such that `epochs` epochs of `step_seconds` steps, forward passes over
    `eval_images` images in all (a forward pass costs about a third of a training step) and the 3 probe steps fit
    in 95 % of `minutes`; at least 1."""
    eval_s = eval_images * step_seconds / batch_size / 3
    usable = 60 * minutes * 0.95 - eval_s - 3 * step_seconds
    return max(1, int(usable / step_seconds) // max(epochs, 1))


def fit_steps_to_budget(model: nn.Module, loader: BatchLoader, bf16: bool, minutes: float, epochs: int,
                        eval_images: int = 0) -> dict:
    """Steps per epoch that fit `minutes` of wall clock (`budget_steps`), from the step time measured on a copy
    of the model: a slower machine gets fewer steps, never a longer run. Returns what a report states: the
    budget, the measured speed and the steps."""
    step_s = measure_step_seconds(model, loader, bf16)
    return {"minutes": minutes, "step_seconds": round(step_s, 4),
            "images_per_s": round(loader.batch_size / step_s, 1),
            "steps_per_epoch": budget_steps(step_s, loader.batch_size, minutes, epochs, eval_images)}
