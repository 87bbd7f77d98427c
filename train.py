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
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.cli import (DATA_HELP, DATA_MODE_HELP, DATA_SOURCE_HELP, DEVICE_HELP, EVAL_IMAGES_HELP,
                        MEMORY_BUDGET_HELP, Parser, add_config, opt, run_command)
from common.files import atomic_write_text, tensor_digest
from mobilenet import CheckpointError, ModelConfig, atomic_save, build_model, load_checkpoint
from mobilenet.checkpoint import FORMAT
from mobilenet.data import DEFAULT_CACHE, DEFAULT_DATA, SOURCES, BatchLoader, DataConfig, load_dataset
from mobilenet.engine import DivergenceGuard, eval_batch_size, evaluate, train_one_epoch
from mobilenet.model import LAYOUTS, check_resolution
from mobilenet.precision import resolve_precision
from mobilenet.runs import record, runs_dir
from mobilenet.training import (MIN_WARMUP_STEPS, fit_budget, init_state, make_scheduler, peak_scale, rank0_first,
                                resolve_device, rng_state, seed_everything, set_rng_state, warmup_steps,
                                world_info)

__all__ = ["TrainConfig", "build_parser", "main", "train"]

SCHEDULES = ("onecycle", "cosine")
# Fields that may differ on --resume: where things live and what runs after the baseline, not how it trains.
RESUME_MAY_CHANGE = ("device", "out", "resume", "data", "cache_dir", "eval_images", "download", "data_workers",
                     "prune", "prune_structured", "prune_sweep_minutes", "prune_budget_minutes")
# Saved configs of earlier releases spelled these flags differently (--root, --source).
_RENAMED = {"root": "data", "source": "data_source"}
_f = opt
PROG = "train.py"


# ---------------------------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    # model
    layout: str = _f("cifar", "cifar (32x32 input, stem and stage-2 stride 1) or imagenet (224x224)")
    resolution: int | None = _f(None, "input height = width: a multiple of 8 from 32 (cifar) or 64 (imagenet) up, "
                                      "e.g. 96, 128, 160, 192; default: the layout's, 32 or 224")
    width: float = _f(1.0, "width multiplier of every layer")
    classes: int = _f(0, "output classes; 0 = the number of classes in the data")
    dropout: float = _f(0.2, "dropout before the classifier")
    # data
    data: str = _f(DEFAULT_DATA, DATA_HELP)
    data_source: str = _f("folder", DATA_SOURCE_HELP)
    cache_dir: str = _f(DEFAULT_CACHE, "where archives are unpacked and decoded images kept")
    data_mode: str = _f("auto", DATA_MODE_HELP)
    memory_budget: float = _f(0.25, MEMORY_BUDGET_HELP)
    data_workers: int = _f(DataConfig.workers, "streamed data: DataLoader worker processes per process (0: none)")
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
        ranges = [(n, lambda v: v >= 0, ">= 0") for n in (
            "epochs", "classes", "max_train_images", "max_steps_per_epoch", "calib_size", "weight_decay", "eval_images",
            "budget_minutes", "prune_sweep_minutes", "prune_budget_minutes", "data_workers")]
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
        check_resolution(self.layout, self.resolution)
        if self.prune not in ("", "auto"):
            try:
                ratio = float(self.prune)
            except ValueError:
                ratio = -1.0
            if not 0 < ratio < 1:
                bad("prune", self.prune, "a ratio in (0, 1) or auto")

    def data_config(self) -> DataConfig:
        return DataConfig(source=self.data_source, root=self.data, layout=self.layout, resolution=self.resolution,
                          cache_dir=self.cache_dir, download=self.download, calib_size=self.calib_size,
                          mode=self.data_mode, memory_budget=self.memory_budget, workers=self.data_workers)


def build_parser() -> argparse.ArgumentParser:
    """One option per TrainConfig field. Defaults are SUPPRESSed so `main` knows which flags the user gave."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_config(p, TrainConfig, suppress=True)
    return p


# ---------------------------------------------------------------------------------------------- training

class _Run:
    """One training run (one process of a torchrun job): its data, model, optimizer and history, and the steps
    of `train`, each a method."""

    def __init__(self, cfg: TrainConfig, device: torch.device, world: int, rank: int):
        self.cfg, self.device, self.world, self.rank = cfg, device, world, rank
        self.say = print if rank == 0 else (lambda *a, **k: None)
        self.out = Path(cfg.out)
        self.history, self.start, self.budget, self.sched = [], 0, None, None

    def load_data(self):
        cfg = self.cfg
        self.ds = rank0_first(self.world, self.rank, lambda: load_dataset(cfg.data_config()))
        self.n_classes = cfg.classes or len(self.ds.classes)
        if self.n_classes < len(self.ds.classes):
            raise ValueError(f"--classes {cfg.classes} is fewer than the {len(self.ds.classes)} classes in {cfg.data}")
        self.test = self.ds.test.stratified(cfg.eval_images)

    def build(self, resume_ckpt: dict | None, init_ckpt: dict | None):
        """The model: fresh, from --init, or from the checkpoint being resumed."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        mcfg = ModelConfig(cfg.layout, cfg.width, self.n_classes, cfg.dropout, resolution=cfg.resolution)
        sd, notes = None, []
        if resume_ckpt is not None:
            mcfg, sd = ModelConfig(**resume_ckpt["model_config"]), resume_ckpt["model"]
        elif init_ckpt is not None:
            mcfg, sd, notes = init_state(cfg.init, init_ckpt, mcfg)
        model = build_model(mcfg)
        if sd is not None:
            model.load_state_dict(sd, strict=False)  # strict=False only for a re-initialized classifier, checked
        for n in notes:
            self.say(n)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.mcfg, self.model = mcfg, model
        self.net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None) if self.world > 1 else model

    def plan(self, resume_ckpt: dict | None):
        """Loader, precision, steps per epoch (the time budget), optimizer and schedule; a resumed run's state."""
        cfg, world = self.cfg, self.world
        self.loader = BatchLoader(self.ds.train, cfg.batch_size // world, cfg.layout, shuffle=True, augment=True,
                                  drop_last=True, seed=cfg.seed, rank=self.rank, world_size=world,
                                  channels_last=cfg.channels_last, device=self.device)
        self.prec = resolve_precision(cfg.bf16, self.device)
        self.say(f"precision: {self.prec}")
        steps = len(self.loader)
        if resume_ckpt is not None and resume_ckpt.get("budget"):
            self.budget = resume_ckpt["budget"]          # the fitted step count, so the schedule resumes unchanged
        elif resume_ckpt is None and cfg.budget_minutes and cfg.epochs > 0:
            self.budget = fit_budget(self.model, self.loader, cfg, self.prec.bf16, len(self.test), world)
        if self.budget is not None:
            steps = min(steps, self.budget["steps_per_epoch"])
            self.say(f"budget {cfg.budget_minutes:g} min: {self.budget['step_seconds']:.3f} s per step measured "
                     f"({self.budget['images_per_s']:.0f} img/s) -> {steps} steps per epoch")
        if cfg.max_train_images:
            steps = min(steps, math.ceil(cfg.max_train_images / cfg.batch_size))
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        if steps < 1 and cfg.epochs > 0:
            raise ValueError(f"{len(self.ds.train)} training images make no full batch of {cfg.batch_size}")
        self.steps, total = steps, steps * cfg.epochs
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr * cfg.batch_size / 128, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.sched = make_scheduler(self.opt, cfg, total) if cfg.epochs > 0 else None
        if resume_ckpt is not None:
            self.opt.load_state_dict(resume_ckpt["optimizer"])
            if self.sched is not None and resume_ckpt.get("scheduler") is not None:
                self.sched.load_state_dict(resume_ckpt["scheduler"])
            set_rng_state(resume_ckpt["rng"], str(self.out / "checkpoint.pt"))
            self.history, self.start = list(resume_ckpt["metrics"]), int(resume_ckpt["epoch"])
            self.say(f"resuming {cfg.out} after epoch {self.start} of {cfg.epochs}")
        if cfg.epochs > 0 and peak_scale(cfg, total) < 1:
            self.say(f"a short run ({total} steps): the learning rate peaks at "
                     f"{peak_scale(cfg, total) * cfg.lr * cfg.batch_size / 128:.4g}, where a "
                     f"{MIN_WARMUP_STEPS}-step warm-up would be after {warmup_steps(cfg, total)} steps")
        self.say(f"training {sum(p.numel() for p in self.model.parameters()):,} parameters on {self.device} "
                 f"x{world}: {cfg.epochs} epochs of {steps} steps of {cfg.batch_size} images, "
                 f"{len(self.ds.train)} training images, eval on {len(self.test)} test images")

    def checkpoint(self, epoch: int) -> dict:
        return {"format": FORMAT, "kind": "fp32", "model_config": self.mcfg.to_dict(),
                "model": self.model.state_dict(), "config": asdict(self.cfg), "epoch": epoch,
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None, "metrics": self.history,
                "rng": rng_state(), "torch_version": torch.__version__, "budget": self.budget,
                "precision": self.prec.to_dict()}

    def write_metrics(self, extra: dict | None = None):
        doc = {"config": asdict(self.cfg), "model_config": self.mcfg.to_dict(), "data": self.ds.describe(),
               "precision": self.prec.to_dict(), "budget": self.budget, "history": self.history, **(extra or {})}
        atomic_write_text(json.dumps(doc, indent=2, default=str) + "\n", self.out / "metrics.json")

    def evaluate(self) -> dict:
        return evaluate(self.model, self.test, self.cfg.layout, device=self.device, disable_bar=self.rank != 0,
                        batch_size=eval_batch_size(self.mcfg.input_size, self.cfg.batch_size // self.world),
                        channels_last=self.cfg.channels_last, desc="eval")

    def epoch(self, epoch: int, guard: DivergenceGuard):
        """Train one epoch, reduce its statistics over ranks; on rank 0 evaluate (when due) and save."""
        cfg, world = self.cfg, self.world
        self.loader.set_epoch(epoch)
        t0 = time.time()
        st = train_one_epoch(self.net, self.loader, self.opt, self.sched, label_smoothing=cfg.label_smoothing,
                             bf16=self.prec.bf16, max_steps=self.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                             disable_bar=self.rank != 0, guard=guard)
        seconds = time.time() - t0
        if world > 1:  # DDP syncs BN statistics at the start of a forward: those of the last step are rank-local
            for buf in self.model.buffers():
                dist.broadcast(buf, src=0)
        sums = torch.tensor([st["loss"] * st["images"], st["acc"] * st["images"], st["images"]], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        row = {"epoch": epoch + 1, "train_loss": sums[0].item() / sums[2].item(),
               "train_acc": sums[1].item() / sums[2].item(), "train_images": int(sums[2].item()),
               "train_seconds": round(seconds, 2), "images_per_s": round(sums[2].item() / seconds, 1),
               "lr_last": self.opt.param_groups[0]["lr"]}
        if self.rank == 0 and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            ev = self.evaluate()
            row.update(test_acc=ev["acc"], test_images=ev["n"])
        self.history.append(row)
        if self.rank == 0:
            atomic_save(self.checkpoint(epoch + 1), self.out / "checkpoint.pt")
            self.write_metrics()
            acc = f", test acc {100 * row['test_acc']:.2f}%" if "test_acc" in row else ""
            self.say(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, train acc "
                     f"{100 * row['train_acc']:.2f}%{acc} ({seconds:.0f} s, {row['images_per_s']:.0f} img/s)",
                     flush=True)
        if world > 1:
            dist.barrier()

    def finish(self, t_start: float) -> dict:
        """The final record: accuracy of the final model, and (DDP) proof that every rank holds the same weights."""
        cfg = self.cfg
        final = {"epochs": cfg.epochs, "wall_seconds": round(time.time() - t_start, 1),
                 "param_sha256": tensor_digest(self.model)}
        if self.world > 1:
            digests = [None] * self.world
            dist.all_gather_object(digests, final["param_sha256"])
            final["rank_param_sha256"] = digests
        if self.rank == 0:
            last = next((r for r in reversed(self.history) if "test_acc" in r), None)
            if last is None or last["epoch"] != cfg.epochs:  # --epochs 0: evaluate the --init model as it is
                ev = self.evaluate()
                last = {"epoch": cfg.epochs, "test_acc": ev["acc"], "test_images": ev["n"]}
                if not self.history:
                    atomic_save(self.checkpoint(0), self.out / "checkpoint.pt")
            final.update(test_acc=last["test_acc"], test_images=last["test_images"])
            self.write_metrics({"final": final})
            record("baseline", self.out / "checkpoint.pt")
            self.say(f"final test accuracy {100 * final['test_acc']:.2f}% on {final['test_images']} images; "
                     f"{self.out / 'checkpoint.pt'} ({final['wall_seconds']:.0f} s)")
        return final

    def prune(self, final: dict):
        """Pruning, on rank 0 with the trained FP32 model (prune/pipeline.py owns everything from here)."""
        if self.world > 1:
            dist.destroy_process_group()
            self.world = 1
        if self.rank == 0:
            try:
                from prune.pipeline import run_prune_pipeline
            except ImportError as e:
                raise ValueError(f"--prune needs prune/pipeline.py, which cannot be imported ({e})") from e
            final["prune"] = run_prune_pipeline(self.model, self.ds, self.cfg, self.out, self.device)
            self.write_metrics({"final": final})
            record("pruned", self.out / "pruned.pt")


def train(cfg: TrainConfig, resume_ckpt: dict | None = None) -> dict:
    """Train (or resume) per `cfg`; returns the final metrics. Every process of a torchrun job calls this."""
    world, local_rank = world_info()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    device = resolve_device(cfg.device, local_rank)
    init_ckpt = load_checkpoint(cfg.init) if cfg.init and resume_ckpt is None else None  # fail before data
    rank = 0
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # share the cores: torchrun's OMP_NUM_THREADS=1 is too few when cores > processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    t_start = time.time()
    run = _Run(cfg, device, world, rank)
    run.load_data()
    run.build(resume_ckpt, init_ckpt)
    run.plan(resume_ckpt)
    guard = DivergenceGuard()
    for epoch in range(run.start, cfg.epochs):
        run.epoch(epoch, guard)
    final = run.finish(t_start)
    if cfg.prune or cfg.prune_structured:
        run.prune(final)
    if run.world > 1:
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
    from common.files import exit_cleanly_on_sigterm
    exit_cleanly_on_sigterm()
    sys.exit(main())
