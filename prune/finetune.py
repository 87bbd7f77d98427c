"""Fine-tuning a pruned model at a low learning rate, with masks held, optionally ramping sparsity (Zhu & Gupta).

Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune"): at step t of a ramp of T steps,

    s_t = s_f * (1 - (1 - t / T)^3)        (s_i = 0: start dense, prune fast early, slowly near the end)

recomputing global L1 masks every `gradual_every` steps over weights not yet pruned (pruned ones score -1, so
masks only ever grow). The ramp ends at `gradual_end` of the planned steps; whatever happens (a time budget
cutting the run short), the target masks are applied at the end.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from mobilenet.data import BatchLoader
from mobilenet.engine import autocast_ctx, train_one_epoch

from .masks import MaskKeeper, global_l1_masks

__all__ = ["fine_tune", "cubic_sparsity", "recalibrate_bn"]


def cubic_sparsity(step: int, ramp_steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: sparsity at `step` of a ramp of `ramp_steps` steps."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return final
    return final + (initial - final) * (1 - step / ramp_steps) ** 3


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split, cfg, device="cpu", images: int = 2000) -> int:
    """Re-estimate every BatchNorm's running mean/var from `images` training images (no augmentation, no weight
    change): pruning shifts each layer's output statistics, and stale BN statistics cost much of the accuracy a
    freshly pruned model loses. Cumulative averages (momentum None) over the batches. Returns images seen."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was = model.training
    model.train()
    seen = 0
    loader = BatchLoader(split, cfg.batch_size, cfg.layout, shuffle=True, seed=cfg.seed + 1,
                         channels_last=cfg.channels_last, device=device)
    for x, _ in loader:
        with autocast_ctx(device, cfg.bf16):
            model(x)
        seen += len(x)
        if seen >= images:
            break
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was)
    return seen


class _Deadline:
    """A loader that stops yielding once the wall-clock deadline has passed (a time budget for fine-tuning)."""

    def __init__(self, loader, deadline: float | None):
        self.loader, self.deadline = loader, deadline

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.deadline is not None and time.monotonic() > self.deadline:
                return
            yield batch


def fine_tune(model: nn.Module, dataset, cfg, layers: dict[str, nn.Module], ratio: float | None,
              masks: dict[str, torch.Tensor] | None, device="cpu", log=print) -> dict:
    """Fine-tune `model` in place for cfg.epochs (capped by cfg.images_per_epoch and cfg.budget_minutes).

    `masks` are held in force (or, with cfg.gradual, replaced by a cubic ramp toward `ratio` over `layers`).
    Returns {"epochs": [per-epoch dicts], "steps", "images", "seconds", "masks": the masks in force at the end}.
    Long because the loop's order matters and is easiest to check in one place: mask ramp, step, re-mask, budget
    check, evaluation.
    """
    steps_per_epoch = -(-len(dataset.train) // cfg.batch_size) if not cfg.images_per_epoch else \
        max(1, min(len(dataset.train), cfg.images_per_epoch) // cfg.batch_size)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params_wd = [p for n, p in model.named_parameters() if p.dim() > 1]      # no decay on BN and biases
    params_nowd = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": params_wd, "weight_decay": cfg.weight_decay},
                           {"params": params_nowd, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    deadline = time.monotonic() + 60 * cfg.budget_minutes if cfg.budget_minutes else None
    t0 = time.monotonic()

    def progress(step: int) -> float:
        """Fraction of the run done: by steps, or by the time budget if that runs out first (so a budgeted run
        still ends its cosine at a low learning rate instead of being cut off at a high one)."""
        p = step / total_steps
        if deadline is not None:
            p = max(p, (time.monotonic() - t0) / (deadline - t0))
        return min(p, 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * progress(s))))
    gradual = cfg.gradual and ratio
    ramp = int(cfg.gradual_end * total_steps)
    keeper = MaskKeeper(model, masks or {}, opt) if (masks or gradual) else None
    state = {"step": 0}

    def after_step():
        state["step"] += 1
        if keeper is None:
            return
        s = state["step"]
        if gradual and s <= ramp and s % cfg.gradual_every == 0:
            target = cubic_sparsity(s, ramp, ratio)
            scores = {n: torch.where(keeper.masks[f"{n}.weight"], m.weight.detach().abs().float(),
                                     torch.tensor(-1.0)) for n, m in layers.items()}
            keeper.set_masks(global_l1_masks(layers, target, cfg.min_density, scores))
        else:
            keeper.after_step()

    if gradual:  # start dense (s_i = 0) with empty masks over the pruned layers
        keeper.set_masks({f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()})
    history = []
    for epoch in range(cfg.epochs):
        loader = BatchLoader(dataset.train, cfg.batch_size, cfg.layout, shuffle=True, augment=True, drop_last=True,
                             seed=cfg.seed, channels_last=cfg.channels_last, device=device)
        loader.set_epoch(epoch)
        stats = train_one_epoch(model, _Deadline(loader, deadline), opt, sched, label_smoothing=cfg.label_smoothing,
                                bf16=cfg.bf16, after_step=after_step, max_steps=steps_per_epoch,
                                desc=f"fine-tune {epoch + 1}/{cfg.epochs}")
        stats.update(epoch=epoch + 1, seconds=round(time.monotonic() - t0, 1), lr=sched.get_last_lr()[0])
        history.append(stats)
        log(f"fine-tune epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.4f}, train acc {stats['acc']:.4f}, "
            f"{stats['images']} images, {stats['seconds']:.0f} s")
        if deadline is not None and time.monotonic() > deadline:
            log(f"fine-tune stopped by the {cfg.budget_minutes} min budget after {state['step']} steps")
            break
    final = masks
    if gradual:
        final = global_l1_masks(layers, ratio, cfg.min_density, {
            n: torch.where(keeper.masks[f"{n}.weight"], m.weight.detach().abs().float(), torch.tensor(-1.0))
            for n, m in layers.items()})
        keeper.set_masks(final)
    if keeper is not None:
        keeper.remove()
    model.to(memory_format=torch.contiguous_format).eval()
    return {"epochs": history, "steps": state["step"], "images": sum(h["images"] for h in history),
            "seconds": round(time.monotonic() - t0, 1), "planned_steps": total_steps, "masks": final}
