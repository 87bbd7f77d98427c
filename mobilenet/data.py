"""Image data held in memory as uint8 tensors, with augmentation done on whole batches.

Sources (`DataConfig.source`):
    cifar-batches   torchvision's `cifar-10-batches-py` pickles under `root` (`download=True` fetches them)
    folder          an ImageFolder tree with train/ and test/ (`root` is the directory, or a .tar.gz that is
                    unpacked once into `cache_dir`); class order is alphabetical, files are sorted by name
                    (mobilenet/folder.py)
    random          synthetic tensors for smoke runs (no files at all)

Images are decoded once and cached as uint8 (N, 3, H, W) tensors beside the unpacked tree. Normalization to
float and training augmentation happen per batch:
    cifar layout      pad-4 random crop + horizontal flip, on the whole batch in a few tensor ops (augment_batch)
    imagenet layout   torchvision's RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3) + horizontal flip of each
                      image (resized_crop_batch), the augmentation the streamed path applies to its files
A folder whose decoded images exceed `memory_budget` of the machine's memory is streamed instead: read from
its files on demand in DataLoader workers (mobilenet/stream.py), nothing decoded is cached.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import check_resolution

__all__ = ["DataConfig", "Split", "Dataset", "load_dataset", "BatchLoader", "normalize", "augment_batch",
           "crop_box", "random_resized_crop", "resized_crop_batch", "RRC_SCALE", "RRC_RATIO", "fit_image",
           "stratified_indices", "check_mode", "DataError", "SOURCES", "DATA_MODES", "CIFAR10_CLASSES",
           "DEFAULT_DATA", "DEFAULT_CACHE"]

SOURCES = ("folder", "cifar-batches", "random")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_HERE = Path(__file__).resolve().parent.parent
DEFAULT_DATA = str(_HERE.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
DEFAULT_CACHE = os.environ.get("MNV2_CACHE", str(Path.home() / ".cache" / "mnv2-compress"))
RRC_SCALE = (0.08, 1.0)       # RandomResizedCrop: area of a crop, fraction of the image's (torchvision's default)
RRC_RATIO = (3 / 4, 4 / 3)    # RandomResizedCrop: width / height of a crop (torchvision's default)
MEAN_STD = {
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DataError(ValueError):
    """Data that is missing or malformed."""


DATA_MODES = ("auto", "memory", "stream")


def check_mode(mode: str, budget: float) -> None:
    if mode not in DATA_MODES:
        raise DataError(f"--data-mode should be one of {', '.join(DATA_MODES)} instead of {mode!r}")
    if not 0 < budget <= 1:
        raise DataError(f"--memory-budget should be a fraction of memory in (0, 1] instead of {budget!r}")


@dataclass
class DataConfig:
    source: str = "folder"           # folder | cifar-batches | random
    root: str = DEFAULT_DATA         # directory or .tar.gz (folder), directory holding cifar-10-batches-py
    layout: str = "cifar"            # mean/std and the default resolution (cifar 32, imagenet 224)
    resolution: int | None = None    # images are res x res: None = the layout's default (see fit_image)
    cache_dir: str = DEFAULT_CACHE   # where archives are unpacked and decoded tensors kept
    download: bool = False           # cifar-batches only: fetch with torchvision if missing (needs a network)
    calib_size: int = 1000           # images in the fixed calibration split, drawn from the training set
    random_size: int = 512           # random source: images per split
    seed: int = 0                    # calibration split and random source
    mode: str = "auto"               # folder: memory | stream | auto (stream when memory_budget is exceeded)
    memory_budget: float = 0.25      # auto: fraction of physical memory the decoded images may take
    workers: int = min(4, os.cpu_count() or 1)  # stream: DataLoader worker processes decoding images


def stratified_indices(n: int, total: int) -> torch.Tensor | None:
    """n indices evenly spaced over range(total) (test sets are sorted by class, so this is stratified): 2,000
    of CIFAR-10's 10,000 is every 5th image, the reference subset. None (all of it) for n = 0 or n >= total."""
    if n < 0:
        raise ValueError(f"--eval-images should be >= 0 instead of {n}")
    if n == 0 or n >= total:
        return None
    return torch.arange(n) * total // n


@dataclass
class Split:
    images: torch.Tensor   # (N, 3, H, W) uint8
    labels: torch.Tensor   # (N,) int64

    def __len__(self):
        return len(self.labels)

    def subset(self, idx) -> "Split":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx])

    def stratified(self, n: int) -> "Split":
        """n images evenly spaced over the whole split (see stratified_indices); n = 0 or n >= len: all of it."""
        idx = stratified_indices(n, len(self))
        return self if idx is None else self.subset(idx)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def in_memory(self, desc: str = "") -> "Split":
        return self


@dataclass
class Dataset:
    train: Split
    test: Split
    calib: Split
    classes: tuple[str, ...]
    layout: str
    source: str
    root: str = ""          # where the images came from ("" for the random source)
    mode: str = "memory"    # memory | stream (a FileSplit per split, decoded on demand)

    @property
    def mean_std(self):
        return MEAN_STD[self.layout]

    def check_classes(self, num_classes: int, model: str) -> None:
        """A model must score every class of the data it is evaluated on (class names and count come from the
        data); DataError names both counts."""
        if num_classes != len(self.classes):
            raise DataError(f"{model} has {num_classes} classes but the data ({self.root or self.source}) has "
                            f"{len(self.classes)} ({', '.join(self.classes[:5])}{', ...' if len(self.classes) > 5 else ''})")

    def describe(self) -> dict:
        """What every step's report records about its data."""
        return {"source": self.source, "root": self.root, "classes": list(self.classes), "layout": self.layout,
                "resolution": self.test.resolution if len(self.test) else None, "mode": self.mode,
                "train_images": len(self.train), "test_images": len(self.test)}


def normalize(images: torch.Tensor, layout: str = "cifar") -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalized with the layout's channel mean and std."""
    mean, std = MEAN_STD[layout]
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Pad-`pad` random crop and horizontal flip of a whole uint8 batch (N, 3, H, W) in a few tensor ops."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).to(images.device)     # (N, H)
    cols = (dx[:, None] + torch.arange(w)[None]).to(images.device)     # (N, W)
    idx_n = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, 3)
    out = out.permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device).view(n, 1, 1, 1)
    return torch.where(flip, out.flip(3), out).contiguous()


def crop_box(h: int, w: int, g: torch.Generator, scale=RRC_SCALE, ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop box in an h x w image, torchvision's rule:
    1. up to 10 tries: area uniform in scale x h*w, aspect (width / height) log-uniform in ratio, the box's sides
       rounded; the first box that fits is placed uniformly at random;
    2. none fits: the centred box at the allowed aspect nearest the image's (the whole image when it is allowed).
    The draws are torchvision's (`RandomResizedCrop.make_params`), in its order and float32 arithmetic, taken from
    `g` instead of the global generator: a generator seeded like `torch.manual_seed(s)` gives torchvision's box."""
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"RandomResizedCrop scale should be (low, high) with 0 < low <= high instead of {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"RandomResizedCrop ratio should be (low, high) with 0 < low <= high instead of {ratio}")
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        area = h * w * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, w - cw + 1, size=(1,), generator=g).item())
            return top, left, ch, cw
    ch, cw = h, w
    if w / h < min(ratio):
        ch = int(round(w / min(ratio)))
    elif w / h > max(ratio):
        cw = int(round(h * max(ratio)))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(img: torch.Tensor, res: int, g: torch.Generator, scale=RRC_SCALE,
                        ratio=RRC_RATIO) -> torch.Tensor:
    """RandomResizedCrop (crop_box, resized to res x res with antialiasing) and a horizontal flip with
    probability 1/2, every draw from `g`. uint8 (3, H, W) -> (3, res, res)."""
    from torchvision.transforms.v2 import functional as TF   # ~3 s to import: only where images are cropped
    top, left, ch, cw = crop_box(img.shape[-2], img.shape[-1], g, scale, ratio)
    out = TF.resized_crop(img, top, left, ch, cw, [res, res], antialias=True)
    return out.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else out


def resized_crop_batch(images: torch.Tensor, g: torch.Generator, scale=RRC_SCALE, ratio=RRC_RATIO) -> torch.Tensor:
    """random_resized_crop of each image of a uint8 batch (N, 3, H, W) back to H x W, the images in turn drawing
    from `g` (one image's draws: its box, then its flip). Per image, as each crop has its own size to resize from:
    at 224x224 about 1 ms an image, small beside a training step."""
    if images.shape[-2] != images.shape[-1]:
        raise ValueError(f"resized_crop_batch expects square images, not {tuple(images.shape[-2:])}")
    return torch.stack([random_resized_crop(x, images.shape[-1], g, scale, ratio) for x in images])


class BatchLoader:
    """Iterate over a Split in batches of normalized float tensors.

    shuffle/augment draw from a generator seeded with (seed, epoch), so an epoch is reproducible and a resumed
    run sees the same batches. With world_size > 1 each rank takes every world_size-th batch position. A streamed
    split (FileSplit) is read through its DataLoader instead, each rank its DistributedSampler shard.
    """

    def __init__(self, split: Split, batch_size: int, layout: str = "cifar", shuffle: bool = False,
                 augment: bool = False, drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size should be >= 1 instead of {batch_size}")
        self.split, self.batch_size, self.layout = split, batch_size, layout
        self.shuffle, self.augment, self.drop_last, self.seed = shuffle, augment, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.channels_last, self.device = channels_last, torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _order(self):
        n = len(self.split)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            return torch.randperm(n, generator=g)
        return torch.arange(n)

    def __len__(self):
        n = len(self.split) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        if getattr(self.split, "streamed", False):
            for x, y in self.split.batches(self.batch_size, shuffle=self.shuffle, augment=self.augment,
                                           drop_last=self.drop_last, seed=self.seed, epoch=self.epoch,
                                           rank=self.rank, world_size=self.world_size,
                                           pin_memory=self.device.type == "cuda"):
                yield self._finish(x, y)
            return
        order = self._order()
        per_rank = len(self.split) // self.world_size if self.world_size > 1 else len(self.split)
        order = order[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world_size > 1 else order
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch + 7919 * (self.rank + 1))
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.split.images[idx]
            if self.augment:   # the streamed path's augmentation, from the stored center crop
                x = resized_crop_batch(x, g) if self.layout == "imagenet" else augment_batch(x, g)
            yield self._finish(x, self.split.labels[idx])

    def _finish(self, x: torch.Tensor, y: torch.Tensor):
        """uint8 batch -> normalized float on the device (channels_last when asked), labels beside it."""
        x = normalize(x.to(self.device), self.layout)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device)


# ---------------------------------------------------------------------------------------------- sources

def fit_image(img: torch.Tensor, layout: str, res: int) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, res, res), torchvision's evaluation convention: ImageNet layout, resize the short
    side to res / 0.875 (256 for 224) and center-crop res; CIFAR layout, images already res x res as stored,
    others resized to res and center-cropped."""
    from torchvision.transforms.v2 import functional as TF
    if layout == "imagenet":
        return TF.center_crop(TF.resize(img, [round(res / 0.875)], antialias=True), [res, res])
    if tuple(img.shape[-2:]) == (res, res):
        return img
    return TF.center_crop(TF.resize(img, [res], antialias=True), [res, res])


def _load_cifar_batches(cfg: DataConfig) -> tuple[Split, Split, tuple[str, ...]]:
    root = Path(cfg.root)
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if not (base / "data_batch_1").exists():
        if cfg.download:
            from torchvision.datasets import CIFAR10
            CIFAR10(str(root), train=True, download=True)
            base = root / "cifar-10-batches-py"
        else:
            raise DataError(f"no cifar-10-batches-py under {root} (pass --download to fetch it, if online)")

    def read(names):
        xs, ys = [], []
        for n in names:
            p = base / n
            if not p.exists():
                raise DataError(f"missing CIFAR-10 batch file {p}")
            d = _load_batch(p)
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d["labels"], dtype=np.int64))
        images = torch.from_numpy(np.concatenate(xs))
        res = check_resolution(cfg.layout, cfg.resolution)
        if cfg.layout == "imagenet" or res != 32:
            images = torch.stack([fit_image(img, cfg.layout, res) for img in images])
        return Split(images, torch.from_numpy(np.concatenate(ys)))

    meta = base / "batches.meta"
    classes = CIFAR10_CLASSES
    if meta.exists():
        classes = tuple(_load_batch(meta)["label_names"])
    return read([f"data_batch_{i}" for i in range(1, 6)]), read(["test_batch"]), classes


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10's batch files are pickles, and a pickle from elsewhere may name any callable for the loader to run.
    These files need only numpy's array rebuilders (protocol 2 from Python 2 as published, or from a newer numpy), so
    every other global is refused before it is looked up, let alone called. (`_codecs.encode` is how protocol 2
    spells a bytes object written by Python 3: a pure function.)"""
    ALLOWED = {("_codecs", "encode"), ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"asks to run Python code ({module}.{name}); a CIFAR-10 batch holds only "
                                         "numpy arrays, lists, numbers and strings")
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict:
    """One cifar-10-batches-py pickle as a dict, loaded without running code; anything else is a DataError."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, OverflowError, MemoryError) as e:
        raise DataError(f"{path} is not a CIFAR-10 batch file: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch file: it holds a {type(d).__name__}, not a dict")
    return d


def _load_random(cfg: DataConfig) -> tuple[Split, Split, tuple[str, ...]]:
    g = torch.Generator().manual_seed(cfg.seed)
    size = check_resolution(cfg.layout, cfg.resolution)
    n = cfg.random_size

    def make():
        return Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (n,), generator=g))
    return make(), make(), CIFAR10_CLASSES


def load_dataset(cfg: DataConfig | None = None, **kwargs) -> Dataset:
    cfg = cfg if cfg is not None else DataConfig(**kwargs)
    from .folder import load_folder   # imports this module: the source that reads files lives beside it
    loaders = {"folder": load_folder, "cifar-batches": _load_cifar_batches, "random": _load_random}
    if cfg.source not in loaders:
        raise DataError(f"unknown data source {cfg.source!r}; expected one of {SOURCES}")
    check_mode(cfg.mode, cfg.memory_budget)
    if cfg.source != "folder" and cfg.mode == "stream":
        raise DataError(f"--data-mode stream reads image files: it needs --data-source folder, not {cfg.source!r}")
    if cfg.layout not in MEAN_STD:
        raise DataError(f"unknown layout {cfg.layout!r}; expected one of {tuple(MEAN_STD)}")
    try:
        check_resolution(cfg.layout, cfg.resolution)
    except ValueError as e:
        raise DataError(str(e)) from None
    train, test, classes = loaders[cfg.source](cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    n_calib = min(cfg.calib_size, len(train))
    calib = train.subset(torch.randperm(len(train), generator=g)[:n_calib])  # from train, never from test
    return Dataset(train, test, calib, classes, cfg.layout, cfg.source,
                   "" if cfg.source == "random" else str(Path(cfg.root).resolve()),
                   "stream" if getattr(train, "streamed", False) else "memory")
