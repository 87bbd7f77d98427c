"""The pieces of train.py's loop that are not the loop: learning-rate schedule, random state, --init weights,
devices and ranks, the time budget. `cfg` is train.TrainConfig (or anything with the same fields).
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

from common.cli import torch_device

from .checkpoint import FORMAT, CheckpointError, from_torchvision_state_dict
from .engine import fit_steps_to_budget
from .model import ModelConfig, build_model

__all__ = ["MIN_WARMUP_STEPS", "warmup_steps", "peak_scale", "make_scheduler", "rng_state", "set_rng_state",
           "seed_everything", "init_state", "resolve_device", "fit_budget", "rank0_first", "world_info"]

# A warm-up of a few steps to a peak of 0.2 blows a fresh network up (a 3-step warm-up on a small grayscale set
# went from loss 2.34 to 9.4); at least this many steps (or half the run, if shorter) rise to the peak.
MIN_WARMUP_STEPS = 50


def seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def world_info() -> tuple[int, int]:
    """(processes, this process's local rank) of a torchrun job; (1, 0) for a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def rng_state() -> dict:
    """Every random state, as the plain values a checkpoint holds (numpy's key array as an int64 tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, where: str):
    try:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        torch.set_rng_state(state["torch"])
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"--resume: {where} holds a malformed random state ({type(e).__name__}: {e})") from None
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_state(path: str, ckpt: dict, mcfg: ModelConfig) -> tuple[ModelConfig, dict, list[str]]:
    """Weights of `ckpt` in our key names for a model of `mcfg`; a classifier of another class count is dropped.

    Returns (model config, state_dict to load with strict=False, notes for the user).
    """
    notes = []
    if ckpt.get("format") == FORMAT:
        if ckpt.get("kind") not in ("fp32", "pruned"):
            raise CheckpointError(f"--init {path}: a {ckpt.get('kind')!r} checkpoint cannot be trained in FP32")
        src = ckpt["model_config"]
        if src.get("hidden_channels"):
            mcfg = replace(mcfg, hidden_channels=src["hidden_channels"])  # a structured-pruned network
        if src.get("layout") != mcfg.layout:
            notes.append(f"--init {path}: weights of a {src.get('layout')}-layout model used in the "
                         f"{mcfg.layout} layout (strides carry no weights)")
        sd = dict(ckpt["model"])
    else:
        sd = from_torchvision_state_dict(ckpt, build_model(mcfg))
    own = build_model(mcfg).state_dict()
    stem = sd.get("features.0.0.weight")
    if stem is not None and stem.shape != own["features.0.0.weight"].shape:
        raise CheckpointError(f"--init {path}: the checkpoint's stem has {stem.shape[0]} channels, a width "
                              f"{mcfg.width_mult} model has {own['features.0.0.weight'].shape[0]}: "
                              f"is it a checkpoint of another width? (pass its --width)")
    w = sd.get("classifier.1.weight")
    if w is not None and w.shape[0] != mcfg.num_classes:
        notes.append(f"--init {path}: the checkpoint has {w.shape[0]} classes, the model {mcfg.num_classes}: "
                     f"the classifier is re-initialized")
        sd.pop("classifier.1.weight")
        sd.pop("classifier.1.bias", None)
    for k, v in own.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"--init {path}: {k} has shape {tuple(sd[k].shape)}, the model "
                                  f"{tuple(v.shape)}: a checkpoint of another width or structure?")
        if k not in sd and not k.startswith("classifier.1."):
            raise CheckpointError(f"--init {path}: missing {k}")
    extra = [k for k in sd if k not in own]
    if extra:
        raise CheckpointError(f"--init {path}: unexpected keys, e.g. {extra[:3]}")
    return mcfg, sd, notes


def warmup_steps(cfg, total_steps: int) -> int:
    """Steps rising to the peak: --warmup of the run, but at least MIN_WARMUP_STEPS or half of a shorter run."""
    if cfg.warmup == 0:
        return 0
    return max(1, round(cfg.warmup * total_steps), min(MIN_WARMUP_STEPS, total_steps // 2))


def peak_scale(cfg, total_steps: int) -> float:
    """The warm-up never climbs faster than a MIN_WARMUP_STEPS ramp to --lr: a run too short for that ramp peaks
    where the ramp has got to (a 16-step run of a width-0.25 model diverged at step 8 on an 8-step ramp to 0.2)."""
    warm = warmup_steps(cfg, total_steps)
    return min(1.0, warm / MIN_WARMUP_STEPS) if warm else 1.0


def make_scheduler(opt, cfg, total_steps: int):
    scale = peak_scale(cfg, total_steps)
    peak = opt.param_groups[0]["lr"] * scale
    warm = warmup_steps(cfg, total_steps)
    if cfg.schedule == "onecycle" and total_steps >= 4:   # OneCycleLR needs >= 2 steps in each of its phases
        warm = min(max(warm, 2), total_steps - 2)
        # peak/25 -> peak over the warm-up, cosine down to peak/25/1e4; momentum held at --momentum
        return torch.optim.lr_scheduler.OneCycleLR(opt, peak, total_steps=total_steps,
                                                   pct_start=min(warm / total_steps, 0.99), cycle_momentum=False)

    def factor(step):  # multiplier of --lr at `step` (0-based)
        if cfg.schedule == "onecycle":   # fewer than 4 steps: no room for a cycle, stay at its starting rate
            return scale / 25
        if step < warm:
            return scale * (step + 1) / warm
        return scale * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def resolve_device(name: str, local_rank: int) -> torch.device:
    """--device as common.cli reads it; under torchrun a plain `cuda` is this process's GPU."""
    dev = torch_device(name)
    return torch.device(f"cuda:{local_rank}") if dev.type == "cuda" and dev.index is None else dev


def fit_budget(model, loader, cfg, bf16: bool, test_images: int, world: int) -> dict:
    """Steps per epoch that make all epochs (and their evaluations) fit in --budget-minutes, from the step time
    measured on a copy of the model. Every rank gets the smallest count, so DDP ranks stay in step."""
    evals = -(-cfg.epochs // cfg.eval_every) + 1
    budget = fit_steps_to_budget(model, loader, bf16, cfg.budget_minutes, cfg.epochs, evals * test_images)
    if world > 1:
        t = torch.tensor([budget["steps_per_epoch"]])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        budget.update(steps_per_epoch=int(t.item()), images_per_s=world * budget["images_per_s"])
    return budget


def rank0_first(world: int, rank: int, fn):
    """Run fn on rank 0 first (it unpacks and caches the data), then on the others; an error reaches every rank."""
    if world == 1:
        return fn()
    result, err = None, None
    if rank == 0:
        try:
            result = fn()
        except ValueError as e:
            err = str(e)
    msg = [err]
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise ValueError(msg[0])
    return result if rank == 0 else fn()
