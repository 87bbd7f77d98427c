"""The `folder` data source: an ImageFolder tree with train/ and test/, or a .tar/.tar.gz of one.

An archive is unpacked once into the cache directory (a half-finished unpack is never taken for a finished one);
streaming then reads that unpacked tree. Class order is alphabetical, files are sorted by name. Whether the images
are held in memory or streamed is decided here (`DataConfig.mode`, `stream.choose_mode`):
    memory   every image decoded once at the evaluation convention (`fit_image`) and cached beside the tree as
             `.decoded-<layout>[-<res>].pt`, so the next run starts in seconds
    stream   only the file list is read; images are decoded per batch in DataLoader workers, nothing is cached
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import atomic_save
from .data import DataConfig, DataError, Split, fit_image
from .model import INPUT_SIZE, check_resolution
from .stream import FileSplit, choose_mode, decode_file, list_images

__all__ = ["load_folder", "find_tree", "unpack_once"]


def _cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def unpack_once(archive: Path, cache_dir: Path) -> Path:
    """Unpack a .tar.gz into cache_dir/<name>-<key>/ once; a half-finished unpack is never mistaken for done."""
    dest = cache_dir / f"{archive.name.split('.')[0]}-{_cache_key(archive)}"
    if (dest / ".complete").exists():
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache_dir))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / ".complete").touch()
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def find_tree(root: Path) -> Path:
    """The directory that holds train/ and test/ (the archive may wrap them in one more folder)."""
    for cand in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    raise DataError(f"{root} has no train/ and test/ folders (ImageFolder layout expected)")


def _decode_folder(files: list[Path], labels: list[int], layout: str, res: int, desc: str) -> Split:
    images = [fit_image(decode_file(f), layout, res)
              for f in tqdm(files, desc=f"decode {desc}", unit="img", mininterval=1.0, leave=False)]
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.long))


def load_folder(cfg: DataConfig) -> tuple[Split, Split, tuple[str, ...]]:
    root = Path(cfg.root)
    if not root.exists():
        raise DataError(f"data not found: {root}")
    if root.is_file():
        if not (root.name.endswith(".tar.gz") or root.name.endswith(".tgz") or root.name.endswith(".tar")):
            raise DataError(f"{root} is a file but not a .tar.gz/.tar archive")
        root = unpack_once(root, Path(cfg.cache_dir))
    tree = find_tree(root)
    classes = sorted(p.name for p in (tree / "train").iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in (tree / "test").iterdir() if p.is_dir())
    if not classes or classes != test_classes:
        raise DataError(f"{tree}: train/ and test/ must hold the same class folders "
                        f"(train: {classes[:5]}..., test: {test_classes[:5]}...)")
    res = check_resolution(cfg.layout, cfg.resolution)
    listed = {s: list_images(tree / s, classes) for s in ("train", "test")}
    mode, why = choose_mode(cfg.mode, sum(len(f) for f, _ in listed.values()), res, cfg.memory_budget)
    if mode == "stream":
        if os.environ.get("RANK", "0") == "0":   # once per torchrun job
            print(f"data: streaming {tree} from its files ({why})", flush=True)
        train, test = (FileSplit.from_files(tree, *listed[s], cfg.layout, res, cfg.workers)
                       for s in ("train", "test"))
        return train, test, tuple(classes)
    # one cache per layout and resolution (the layout's default keeps the name earlier releases wrote)
    cached = tree / (f".decoded-{cfg.layout}.pt" if res == INPUT_SIZE[cfg.layout] else f".decoded-{cfg.layout}-{res}.pt")
    if cached.exists():
        blob = torch.load(cached, weights_only=True)
        if blob["classes"] == classes:
            return Split(*blob["train"]), Split(*blob["test"]), tuple(classes)
    train = _decode_folder(*listed["train"], cfg.layout, res, "train")
    test = _decode_folder(*listed["test"], cfg.layout, res, "test")
    try:
        atomic_save({"classes": classes, "train": (train.images, train.labels), "test": (test.images, test.labels)},
                    cached)
    except OSError:
        pass  # a read-only tree: decode again next time
    return train, test, tuple(classes)

