"""Train MobileNetV2 in FP32: SGD with Nesterov momentum, OneCycle or cosine, evaluation and a checkpoint every epoch.

    python train.py                                       # CIFAR-10, width 1.0, ~6 min on 2 idle cores (est.)
    python train.py --epochs 30 --max-train-images 0      # every training image in every epoch
    python train.py --data my_images.tar.gz --init mobilenet_v2_imagenet.pt --layout imagenet
    python train.py --resume --out runs/baseline          # continue an interrupted run
    torchrun --nproc_per_node 4 train.py --device cuda    # DistributedDataParallel, one process per GPU

Writes <out>/checkpoint.pt (model, optimizer, scheduler, RNG states, this config, per-epoch metrics) and
<out>/metrics.json after every epoch, atomically. With --prune/--prune-structured the trained (or --init) model
then goes to prune/pipeline.py. A user error prints one line on stderr and exits with code 2, writing nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.cli import (DATA_HELP, DATA_SOURCE_HELP, DEVICE_HELP, EVAL_IMAGES_HELP, Parser, add_config, opt,
                        run_command, torch_device)
from mobilenet import (CheckpointError, ModelConfig, atomic_save, atomic_write_text, build_model,
                       from_torchvision_state_dict, load_checkpoint)
from mobilenet.checkpoint import FORMAT
from mobilenet.data import DEFAULT_CACHE, DEFAULT_DATA, SOURCES, BatchLoader, DataConfig, load_dataset
from mobilenet.engine import DivergenceGuard, evaluate, fit_steps_to_budget, train_one_epoch
from mobilenet.model import LAYOUTS
from mobilenet.precision import resolve_precision
from mobilenet.runs import record, runs_dir

__all__ = ["TrainConfig", "build_parser", "main", "train", "param_digest"]

SCHEDULES = ("onecycle", "cosine")
# Fields that may differ on --resume: where things live and what runs after the baseline, not how it trains.
RESUME_MAY_CHANGE = ("device", "out", "resume", "data", "cache_dir", "eval_images", "download", "prune",
                     "prune_structured", "prune_sweep_minutes", "prune_budget_minutes")
# Saved configs of earlier releases spelled these flags differently (--root, --source).
_RENAMED = {"root": "data", "source": "data_source"}
# A warm-up of a few steps to a peak of 0.2 blows a fresh network up (a 3-step warm-up on a small grayscale set
# went from loss 2.34 to 9.4); at least this many steps (or half the run, if shorter) rise to the peak.
MIN_WARMUP_STEPS = 50


_f = opt
PROG = "train.py"


# ---------------------------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    # model
    layout: str = _f("cifar", "cifar (32x32 input, stem and stage-2 stride 1) or imagenet (224x224)")
    width: float = _f(1.0, "width multiplier of every layer")
    classes: int = _f(0, "output classes; 0 = the number of classes in the data")
    dropout: float = _f(0.2, "dropout before the classifier")
    # data
    data: str = _f(DEFAULT_DATA, DATA_HELP)
    data_source: str = _f("folder", DATA_SOURCE_HELP)
    cache_dir: str = _f(DEFAULT_CACHE, "where archives are unpacked and decoded images kept")
    download: bool = _f(False, "cifar-batches: fetch CIFAR-10 with torchvision if missing (needs a network)")
    calib_size: int = _f(1000, "images in the fixed calibration split drawn from train (for quantization)")
    max_train_images: int = _f(0, "training images per epoch at most, a fresh random subset each epoch; 0 = all")
    max_steps_per_epoch: int = _f(0, "optimizer steps per epoch at most; 0 = no cap")
    budget_minutes: float = _f(6.0, "wall-clock minutes for all epochs: the steps per epoch are fitted to the step "
                                    "time measured at the start, so a slower machine trains on fewer images; "
                                    "0 = none (every image of every epoch)")
    eval_every: int = _f(1, "evaluate every N epochs (and always after the last)")
    eval_images: int = _f(2000, EVAL_IMAGES_HELP)
    # optimization
    epochs: int = _f(2, "training epochs")
    batch_size: int = _f(128, "images per optimizer step, summed over all processes")
    lr: float = _f(0.2, "peak learning rate per batch of 128 images (scaled linearly with --batch-size)")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay, on all parameters")
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy")
    schedule: str = _f("onecycle", "onecycle (peak/25 -> peak -> ~0) | cosine (linear warm-up, cosine to 0)")
    warmup: float = _f(0.2, f"fraction of all steps spent rising to the peak learning rate (at least "
                            f"{MIN_WARMUP_STEPS} steps, or half of a shorter run)")
    # runtime
    bf16: bool | None = _f(None, "bf16 autocast for the forward pass (weights, gradients and optimizer stay FP32); "
                                 "default: bf16 where the device runs it natively (CUDA with bf16, CPUs with "
                                 "AVX512_BF16 or AMX), FP32 elsewhere")
    channels_last: bool = _f(True, "NHWC memory format (faster convolutions on CPU and GPU)")
    device: str = _f("auto", DEVICE_HELP + "; under torchrun each process takes cuda:<LOCAL_RANK>")
    seed: int = _f(0, "seed of weight init, shuffling, augmentation and dropout")
    out: str = _f("", "output directory for checkpoint.pt and metrics.json (default: runs/baseline, under "
                     "$MNV2_RUNS when set)")
    init: str = _f("", "start from this checkpoint: ours, or a torchvision mobilenet_v2 state_dict")
    resume: bool = _f(False, "continue the run saved in <out>/checkpoint.pt")
    # after the baseline (prune/pipeline.py)
    prune: str = _f("", "unstructured pruning to sparsity RATIO in (0, 1), or auto")
    prune_structured: float = _f(0.0, "structured pruning: fraction of expansion channels to remove, in [0, 1)")
    prune_sweep_minutes: float = _f(1.5, "with --prune: minutes for the per-layer sensitivity sweep; 0 = no cap")
    prune_budget_minutes: float = _f(4.0, "with --prune: minutes for fine-tuning the pruned model; 0 = no cap")

    def __post_init__(self):
        self.out = self.out or str(runs_dir() / "baseline")

        def bad(flag, value, want):
            raise ValueError(f"--{flag} should be {want} instead of {value!r}")
        for name, choices in (("layout", LAYOUTS), ("data_source", SOURCES), ("schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                bad(name.replace("_", "-"), getattr(self, name), f"one of {', '.join(choices)}")
        # (field, test, wanted): every range check names the flag and the value it got
        ranges = [(n, lambda v: v >= 0, ">= 0") for n in ("epochs", "classes", "max_train_images",
                                                          "max_steps_per_epoch", "calib_size", "weight_decay",
                                                          "eval_images",
                                                          "budget_minutes", "prune_sweep_minutes",
                                                          "prune_budget_minutes")]
        ranges += [(n, lambda v: v >= 1, ">= 1") for n in ("batch_size", "eval_every")]
        ranges += [(n, lambda v: v > 0, "> 0") for n in ("width", "lr")]
        ranges += [(n, lambda v: 0 <= v < 1, "in [0, 1)") for n in ("dropout", "label_smoothing", "prune_structured")]
        for name, ok, want in ranges:
            if not ok(getattr(self, name)):
                bad(name.replace("_", "-"), getattr(self, name), want)
        if self.nesterov and not self.momentum > 0:
            bad("momentum", self.momentum, "> 0 with Nesterov (or pass --no-nesterov)")
        lo = 0 if self.schedule == "cosine" else 1e-9  # OneCycleLR needs a rising phase
        if not lo <= self.warmup < 1:
            bad("warmup", self.warmup, f"in {'[0' if lo == 0 else '(0'}, 1) for --schedule {self.schedule}")
        if self.prune not in ("", "auto"):
            try:
                ratio = float(self.prune)
            except ValueError:
                ratio = -1.0
            if not 0 < ratio < 1:
                bad("prune", self.prune, "a ratio in (0, 1) or auto")

    def data_config(self) -> DataConfig:
        return DataConfig(source=self.data_source, root=self.data, layout=self.layout, cache_dir=self.cache_dir,
                          download=self.download, calib_size=self.calib_size)


def build_parser() -> argparse.ArgumentParser:
    """One option per TrainConfig field. Defaults are SUPPRESSed so `main` knows which flags the user gave."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_config(p, TrainConfig, suppress=True)
    return p


# ---------------------------------------------------------------------------------------------- pieces

def param_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in state_dict order: equal digests mean bit-identical models."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rng_state() -> dict:
    """Every random state, as the plain values a checkpoint holds (numpy's key array as an int64 tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, where: str):
    try:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        torch.set_rng_state(state["torch"])
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"--resume: {where} holds a malformed random state ({type(e).__name__}: {e})") from None
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _init_state(path: str, ckpt: dict, mcfg: ModelConfig) -> tuple[ModelConfig, dict, list[str]]:
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


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Steps rising to the peak: --warmup of the run, but at least MIN_WARMUP_STEPS or half of a shorter run."""
    if cfg.warmup == 0:
        return 0
    return max(1, round(cfg.warmup * total_steps), min(MIN_WARMUP_STEPS, total_steps // 2))


def peak_scale(cfg: TrainConfig, total_steps: int) -> float:
    """The warm-up never climbs faster than a MIN_WARMUP_STEPS ramp to --lr: a run too short for that ramp peaks
    where the ramp has got to (a 16-step run of a width-0.25 model diverged at step 8 on an 8-step ramp to 0.2)."""
    warm = warmup_steps(cfg, total_steps)
    return min(1.0, warm / MIN_WARMUP_STEPS) if warm else 1.0


def _scheduler(opt, cfg: TrainConfig, total_steps: int):
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


def _resolve_device(name: str, local_rank: int) -> torch.device:
    """--device as common.cli reads it; under torchrun a plain `cuda` is this process's GPU."""
    dev = torch_device(name)
    return torch.device(f"cuda:{local_rank}") if dev.type == "cuda" and dev.index is None else dev


def _fit_budget(model, loader, cfg: TrainConfig, bf16: bool, test_images: int, world: int) -> dict:
    """Steps per epoch that make all epochs (and their evaluations) fit in --budget-minutes, from the step time
    measured on a copy of the model. Every rank gets the smallest count, so DDP ranks stay in step."""
    evals = -(-cfg.epochs // cfg.eval_every) + 1
    budget = fit_steps_to_budget(model, loader, bf16, cfg.budget_minutes, cfg.epochs, evals * test_images)
    if world > 1:
        t = torch.tensor([budget["steps_per_epoch"]])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        budget.update(steps_per_epoch=int(t.item()), images_per_s=world * budget["images_per_s"])
    return budget


def _rank0_first(world: int, rank: int, fn):
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


# ---------------------------------------------------------------------------------------------- training

def train(cfg: TrainConfig, resume_ckpt: dict | None = None) -> dict:
    """Train (or resume) per `cfg`; returns the final metrics. Every process of a torchrun job calls this."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    device = _resolve_device(cfg.device, local_rank)
    init_ckpt = load_checkpoint(cfg.init) if cfg.init and resume_ckpt is None else None  # fail before data
    rank = 0
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # share the cores: torchrun's OMP_NUM_THREADS=1 is too few when cores > processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    t_start = time.time()

    # 1. data
    ds = _rank0_first(world, rank, lambda: load_dataset(cfg.data_config()))
    n_classes = cfg.classes or len(ds.classes)
    if n_classes < len(ds.classes):
        raise ValueError(f"--classes {cfg.classes} is fewer than the {len(ds.classes)} classes in {cfg.data}")
    test = ds.test.stratified(cfg.eval_images)

    # 2. model: fresh, from --init, or from the checkpoint being resumed
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    mcfg = ModelConfig(cfg.layout, cfg.width, n_classes, cfg.dropout)
    sd, notes = None, []
    if resume_ckpt is not None:
        mcfg, sd = ModelConfig(**resume_ckpt["model_config"]), resume_ckpt["model"]
    elif init_ckpt is not None:
        mcfg, sd, notes = _init_state(cfg.init, init_ckpt, mcfg)
    model = build_model(mcfg)
    if sd is not None:
        model.load_state_dict(sd, strict=False)  # strict=False only for a re-initialized classifier, checked above
    for n in notes:
        say(n)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model

    # 3. loader, optimizer, schedule
    loader = BatchLoader(ds.train, cfg.batch_size // world, cfg.layout, shuffle=True, augment=True, drop_last=True,
                         seed=cfg.seed, rank=rank, world_size=world, channels_last=cfg.channels_last, device=device)
    prec = resolve_precision(cfg.bf16, device)
    say(f"precision: {prec}")
    steps, budget = len(loader), None
    if resume_ckpt is not None and resume_ckpt.get("budget"):
        budget = resume_ckpt["budget"]          # the fitted step count, so the schedule resumes unchanged
    elif resume_ckpt is None and cfg.budget_minutes and cfg.epochs > 0:
        budget = _fit_budget(model, loader, cfg, prec.bf16, len(test), world)
    if budget is not None:
        steps = min(steps, budget["steps_per_epoch"])
        say(f"budget {cfg.budget_minutes:g} min: {budget['step_seconds']:.3f} s per step measured "
            f"({budget['images_per_s']:.0f} img/s) -> {steps} steps per epoch")
    if cfg.max_train_images:
        steps = min(steps, math.ceil(cfg.max_train_images / cfg.batch_size))
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps < 1 and cfg.epochs > 0:
        raise ValueError(f"{len(ds.train)} training images make no full batch of {cfg.batch_size}")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr * cfg.batch_size / 128, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    sched = _scheduler(opt, cfg, steps * cfg.epochs) if cfg.epochs > 0 else None
    history, start = [], 0
    if resume_ckpt is not None:
        opt.load_state_dict(resume_ckpt["optimizer"])
        if sched is not None and resume_ckpt.get("scheduler") is not None:
            sched.load_state_dict(resume_ckpt["scheduler"])
        _set_rng_state(resume_ckpt["rng"], str(Path(cfg.out) / "checkpoint.pt"))
        history, start = list(resume_ckpt["metrics"]), int(resume_ckpt["epoch"])
        say(f"resuming {cfg.out} after epoch {start} of {cfg.epochs}")
    out = Path(cfg.out)
    if cfg.epochs > 0 and peak_scale(cfg, steps * cfg.epochs) < 1:
        say(f"a short run ({steps * cfg.epochs} steps): the learning rate peaks at "
            f"{peak_scale(cfg, steps * cfg.epochs) * cfg.lr * cfg.batch_size / 128:.4g}, where a "
            f"{MIN_WARMUP_STEPS}-step warm-up would be after {warmup_steps(cfg, steps * cfg.epochs)} steps")
    say(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {device} x{world}: "
        f"{cfg.epochs} epochs of {steps} steps of {cfg.batch_size} images, {len(ds.train)} training images, "
        f"eval on {len(test)} test images")

    def checkpoint(epoch):
        return {"format": FORMAT, "kind": "fp32", "model_config": mcfg.to_dict(), "model": model.state_dict(),
                "config": asdict(cfg), "epoch": epoch, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None, "metrics": history,
                "rng": _rng_state(), "torch_version": torch.__version__, "budget": budget,
                "precision": prec.to_dict()}

    def write_metrics(extra=None):
        doc = {"config": asdict(cfg), "model_config": mcfg.to_dict(), "data": ds.describe(), "precision": prec.to_dict(),
               "budget": budget, "history": history, **(extra or {})}
        atomic_write_text(json.dumps(doc, indent=2, default=str) + "\n", out / "metrics.json")

    def evaluate_now() -> dict:
        return evaluate(model, test, cfg.layout, device=device, channels_last=cfg.channels_last,
                        desc="eval", disable_bar=rank != 0)

    # 4. epochs: train, reduce statistics over ranks, evaluate and save on rank 0
    guard = DivergenceGuard()
    for epoch in range(start, cfg.epochs):
        loader.set_epoch(epoch)
        t0 = time.time()
        st = train_one_epoch(net, loader, opt, sched, label_smoothing=cfg.label_smoothing, bf16=prec.bf16,
                             max_steps=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable_bar=rank != 0,
                             guard=guard)
        seconds = time.time() - t0
        if world > 1:  # DDP syncs BN statistics at the start of a forward: those of the last step are rank-local
            for buf in model.buffers():
                dist.broadcast(buf, src=0)
        sums = torch.tensor([st["loss"] * st["images"], st["acc"] * st["images"], st["images"]], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        row = {"epoch": epoch + 1, "train_loss": sums[0].item() / sums[2].item(),
               "train_acc": sums[1].item() / sums[2].item(), "train_images": int(sums[2].item()),
               "train_seconds": round(seconds, 2), "images_per_s": round(sums[2].item() / seconds, 1),
               "lr_last": opt.param_groups[0]["lr"]}
        if rank == 0 and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            ev = evaluate_now()
            row.update(test_acc=ev["acc"], test_images=ev["n"])
        history.append(row)
        if rank == 0:
            atomic_save(checkpoint(epoch + 1), out / "checkpoint.pt")
            write_metrics()
            acc = f", test acc {100 * row['test_acc']:.2f}%" if "test_acc" in row else ""
            say(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, train acc "
                f"{100 * row['train_acc']:.2f}%{acc} ({seconds:.0f} s, {row['images_per_s']:.0f} img/s)", flush=True)
        if world > 1:
            dist.barrier()

    # 5. the final record: accuracy of the final model, and (DDP) proof that every rank holds the same weights
    final = {"epochs": cfg.epochs, "wall_seconds": round(time.time() - t_start, 1), "param_sha256": param_digest(model)}
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, final["param_sha256"])
        final["rank_param_sha256"] = digests
    if rank == 0:
        last = next((r for r in reversed(history) if "test_acc" in r), None)
        if last is None or last["epoch"] != cfg.epochs:  # --epochs 0: evaluate the --init model as it is
            ev = evaluate_now()
            last = {"epoch": cfg.epochs, "test_acc": ev["acc"], "test_images": ev["n"]}
            if not history:
                atomic_save(checkpoint(0), out / "checkpoint.pt")
        final.update(test_acc=last["test_acc"], test_images=last["test_images"])
        write_metrics({"final": final})
        record("baseline", out / "checkpoint.pt")
        say(f"final test accuracy {100 * final['test_acc']:.2f}% on {final['test_images']} images; "
            f"{out / 'checkpoint.pt'} ({final['wall_seconds']:.0f} s)")

    # 6. pruning, on rank 0 with the trained FP32 model (prune/pipeline.py owns everything from here)
    if cfg.prune or cfg.prune_structured:
        if world > 1:
            dist.destroy_process_group()
            world = 1
        if rank == 0:
            try:
                from prune.pipeline import run_prune_pipeline
            except ImportError as e:
                raise ValueError(f"--prune needs prune/pipeline.py, which cannot be imported ({e})") from e
            final["prune"] = run_prune_pipeline(model, ds, cfg, out, device)
            write_metrics({"final": final})
            record("pruned", out / "pruned.pt")
    if world > 1:
        dist.destroy_process_group()
    return final


# ---------------------------------------------------------------------------------------------- command

def _config_for(given: dict) -> tuple[TrainConfig, dict | None]:
    """The config of this run: the flags given, or with --resume the saved run's config (flags must agree)."""
    if not given.get("resume"):
        return TrainConfig(**given), None
    if given.get("init"):
        raise ValueError("--init and --resume exclude each other: --resume continues from <out>/checkpoint.pt")
    path = Path(given.get("out") or runs_dir() / "baseline") / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint to resume at {path}")
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != FORMAT or not {"config", "optimizer", "rng", "epoch"} <= set(ckpt):
        raise CheckpointError(f"--resume: {path} is not a training checkpoint written by train.py")
    saved = {_RENAMED.get(k, k): v for k, v in ckpt["config"].items()}
    saved = {k: v for k, v in saved.items() if k in {f.name for f in fields(TrainConfig)}}
    for k, v in given.items():
        if k not in RESUME_MAY_CHANGE and saved.get(k) != v:
            raise ValueError(f"--resume: --{k.replace('_', '-')} {v!r} differs from the saved run's "
                             f"{saved.get(k)!r} (drop the flag to continue that run)")
    return TrainConfig(**{**saved, **given}), ckpt


def main(argv: list[str] | None = None) -> int:
    try:
        given = vars(build_parser().parse_args(argv))
    except SystemExit as e:  # --help (0) or a malformed flag (2, message already printed)
        return int(e.code or 0)

    def body():
        try:
            train(*_config_for(given))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return run_command(PROG, body)


if __name__ == "__main__":
    from mobilenet.checkpoint import exit_cleanly_on_sigterm
    exit_cleanly_on_sigterm()
    sys.exit(main())
