"""Image folders larger than memory: files listed once, decoded (and augmented) on demand in DataLoader workers.

A `FileSplit` offers what an in-memory `Split` offers to its callers (`len`, `labels`, `subset`, `stratified`,
`resolution`), so calibration subsets, the sweep's and evaluation's stratified subsets, QAT and export validation
take their images the same way whichever path holds them; `BatchLoader` iterates either. The evaluation image of
a file is `fit_image` of its decoded pixels, bit for bit the image the in-memory path caches.

Training augmentation, decided per image from a seed the sampler hands out (so an epoch is reproducible whatever
worker decodes which image):
    imagenet layout   RandomResizedCrop of the full decoded image (scale 0.08-1, aspect 3/4-4/3) + horizontal flip
                      (data.random_resized_crop, which the in-memory path applies to its stored center crops)
    cifar layout      the evaluation image, then the in-memory path's pad-4 random crop + horizontal flip

Ranks: a DistributedSampler gives each rank of a torchrun job its own shard of every epoch (disjoint, together
the whole epoch but for fewer than world_size images), from a permutation seeded with (seed, epoch).
"""
from __future__ import annotations

import ctypes
import importlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .data import (DATA_MODES, DataError, Split, augment_batch, check_mode, fit_image, random_resized_crop,
                   stratified_indices)

__all__ = ["FileSplit", "list_images", "decode_file", "memory_bytes", "choose_mode",
           "DATA_MODES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_images(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Every image file of an ImageFolder split, class by class (alphabetical), files sorted by name."""
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((split_dir / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(c)
    if not files:
        raise DataError(f"no .jpg/.jpeg/.png images under {split_dir}")
    return files, labels


def decode_file(path: str | Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB pixels of one file; a file that does not decode is a DataError naming it."""
    from torchvision.io import ImageReadMode, decode_image   # ~3 s to import: only where images are decoded
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise DataError(f"cannot decode {path}: {e}") from None


class _Files(torch.utils.data.Dataset):
    """What a DataLoader worker runs: (index, augmentation seed) -> (uint8 (3, res, res), label), or (None, the
    error) for a file that does not decode. A worker returns its error rather than raising it: raised, it would
    reach the user wrapped in the worker's traceback, and the stopped DataLoader takes seconds to shut down."""

    def __init__(self, split: "FileSplit", augment: bool):
        self.split, self.augment = split, augment

    def __len__(self):
        return len(self.split)

    def __getitem__(self, item):
        i, seed = item
        s = self.split
        try:
            img = decode_file(s.path(i))
        except DataError as e:
            return None, str(e)
        if self.augment:
            g = torch.Generator().manual_seed(seed)
            if s.layout == "imagenet":
                img = random_resized_crop(img, s.res, g)
            else:
                img = augment_batch(fit_image(img, s.layout, s.res)[None], g)[0]
        else:
            img = fit_image(img, s.layout, s.res)
        return img, s.labels[i]


class _Seeded(torch.utils.data.Sampler):
    """A rank's indices from a DistributedSampler, each with its own augmentation seed drawn from (seed, epoch,
    rank): the batches do not depend on which worker decodes them."""

    def __init__(self, sampler: DistributedSampler, seed: int, epoch: int, rank: int):
        self.sampler, self.seed, self.epoch, self.rank = sampler, seed, epoch, rank

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch + 7919 * (self.rank + 1))
        seeds = torch.randint(0, 2 ** 62, (len(self.sampler),), generator=g).tolist()
        return iter(zip(self.sampler, seeds))


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor] | str:
    """A batch (uint8 (B, 3, res, res), int64 (B,)), or the first error among its files."""
    errors = [err for img, err in items if img is None]
    return errors[0] if errors else torch.utils.data.default_collate(items)


def release_free_heap() -> None:
    """Hand the C allocator's free pages back to the kernel (glibc's malloc_trim; elsewhere nothing). A forked
    worker maps every resident page of its parent, and after a training epoch glibc keeps the freed activation
    memory of the last steps resident: workers forked for the evaluation that follows would map it too."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def _worker_init(_):
    torch.set_num_threads(1)   # one decoding thread per worker: the workers, not threads, use the cores


class FileSplit:
    """One split of an ImageFolder tree, read on demand. `paths`: file paths relative to `root` as a numpy bytes
    array (one buffer, not a list of Python strings: forked workers then share it without copying it page by
    page as reference counts change)."""
    streamed = True

    def __init__(self, root: Path, paths: np.ndarray, labels: torch.Tensor, layout: str, res: int, workers: int):
        self.root, self.paths, self.labels = Path(root), paths, labels
        self.layout, self.res, self.workers = layout, res, workers

    @classmethod
    def from_files(cls, root: Path, files: list[Path], labels: list[int], layout: str, res: int, workers: int):
        paths = np.array([os.fsencode(f.relative_to(root)) for f in files], dtype=bytes)
        return cls(root, paths, torch.tensor(labels, dtype=torch.long), layout, res, workers)

    def __len__(self):
        return len(self.labels)

    @property
    def resolution(self) -> int:
        return self.res

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.paths[i])

    def subset(self, idx) -> "FileSplit":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return FileSplit(self.root, self.paths[idx.numpy()], self.labels[idx], self.layout, self.res, self.workers)

    def stratified(self, n: int) -> "FileSplit":
        """As Split.stratified: n images evenly spaced over the class-sorted split; 0 or >= len: all."""
        idx = stratified_indices(n, len(self))
        return self if idx is None else self.subset(idx)

    def in_memory(self, desc: str = "decode") -> Split:
        """The split decoded at its evaluation convention (for a small subset read many times, e.g. a sweep)."""
        imgs = [fit_image(decode_file(self.path(i)), self.layout, self.res)
                for i in tqdm(range(len(self)), desc=desc, unit="img", mininterval=1.0, leave=False)]
        return Split(torch.stack(imgs), self.labels.clone())

    def shard(self, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int) -> DistributedSampler:
        """This rank's indices of epoch `epoch` (with world_size > 1 the last len % world_size are dropped, so
        every rank takes as many steps)."""
        shard = DistributedSampler(self, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                   drop_last=world_size > 1)
        shard.set_epoch(epoch)
        return shard

    def batches(self, batch_size: int, *, shuffle: bool, augment: bool, drop_last: bool, seed: int, epoch: int,
                rank: int, world_size: int, pin_memory: bool = False):
        """Batches (uint8 (B, 3, res, res), int64 (B,)) of this rank's shard of epoch `epoch`."""
        for name in ("torchvision.io", "torchvision.transforms.v2.functional"):   # before the workers fork,
            importlib.import_module(name)                                          # so that they inherit them
        if self.workers:
            release_free_heap()
        shard = self.shard(rank, world_size, shuffle, seed, epoch)
        sampler = torch.utils.data.BatchSampler(_Seeded(shard, seed, epoch, rank), batch_size, drop_last)
        loader = DataLoader(_Files(self, augment), batch_sampler=sampler, collate_fn=_collate,
                            num_workers=self.workers, worker_init_fn=_worker_init if self.workers else None,
                            pin_memory=pin_memory, prefetch_factor=2 if self.workers else None)
        for batch in loader:
            if isinstance(batch, str):
                raise DataError(batch)
            yield batch


def memory_bytes() -> int:
    """Physical memory of this machine, bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_mode(mode: str, n_images: int, res: int, budget: float) -> tuple[str, str]:
    """("memory" | "stream", why). The in-memory path holds every image decoded, 3 * res * res bytes each, once
    per process of this machine (torchrun's LOCAL_WORLD_SIZE): `auto` streams when that exceeds `budget` of the
    physical memory."""
    check_mode(mode, budget)
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need, have = n_images * 3 * res * res * procs, memory_bytes()
    why = (f"{n_images:,} images at {res}x{res} decoded x{procs} process(es) = {need / 2 ** 30:.2f} GiB, budget "
           f"{budget:g} x {have / 2 ** 30:.1f} GiB = {budget * have / 2 ** 30:.2f} GiB")
    if mode != "auto":
        return mode, f"--data-mode {mode} ({why})"
    return ("stream" if need > budget * have else "memory"), why
