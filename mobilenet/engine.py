"""The loops every command shares: one training epoch, prediction over a split, top-1 accuracy."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import BatchLoader, Split

__all__ = ["train_one_epoch", "predict", "evaluate", "autocast_ctx"]


def autocast_ctx(device: torch.device | str, bf16: bool):
    device = torch.device(device)
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_one_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer,
                    scheduler=None, *, label_smoothing: float = 0.0, bf16: bool = False,
                    after_step: Callable[[], None] | None = None, max_steps: int | None = None,
                    desc: str = "train", disable_bar: bool = False) -> dict:
    """One pass over `loader`. `after_step` runs after every optimizer step (pruning re-applies its masks there).

    Returns {"loss": mean loss, "acc": top-1 on the augmented batches, "steps": steps taken, "images": n}.
    """
    model.train()
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
        total_loss += loss.item() * n
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


def evaluate(model: nn.Module, split: Split, layout: str = "cifar", **kw) -> dict:
    """{"acc": top-1 in [0, 1], "n": images} over the split."""
    logits = predict(model, split, layout, **kw)
    return {"acc": (logits.argmax(1) == split.labels).float().mean().item(), "n": len(split)}
