"""Folders larger than memory (issue 14, point 2): streamed from their files in DataLoader workers, the same
evaluation pixels as the in-memory path, each torchrun rank its own shard, auto choosing by the memory budget."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import mobilenet.stream as stream
import train
from conftest import ROOT, make_image_tree
from mobilenet.data import BatchLoader, DataConfig, DataError, load_dataset
from mobilenet.data import random_resized_crop
from mobilenet.stream import FileSplit


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x (8 train, 4 test) generated 40x56 images, PNG and JPEG, some grayscale."""
    return make_image_tree(tmp_path_factory.mktemp("stream") / "tree", per_class=(8, 4), size=(40, 56))


def _load(tree, tmp_path, mode, layout="imagenet", res=64, **kw):
    return load_dataset(DataConfig(root=str(tree), layout=layout, resolution=res, mode=mode, calib_size=5,
                                   cache_dir=str(tmp_path / "cache"), **kw))


def _all(split, layout, batch=5):
    xs, ys = zip(*BatchLoader(split, batch, layout))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("layout,res", [("imagenet", 64), ("cifar", 32)])
def test_streamed_images_equal_the_in_memory_ones(tree, tmp_path, layout, res):
    for f in tree.glob(".decoded*"):      # left by another test of this module
        f.unlink()
    streamed = _load(tree, tmp_path, "stream", layout, res, workers=2)
    assert isinstance(streamed.train, FileSplit) and streamed.mode == "stream"
    assert not list(tree.glob(".decoded*")), "the streamed path must not write the decoded cache"
    held = _load(tree, tmp_path, "memory", layout, res)
    assert held.mode == "memory" and list(tree.glob(".decoded*"))
    # exact: the same file gives the same pixels (decode + fit_image), for every subset the callers take
    for pick in (lambda d: d.test, lambda d: d.calib, lambda d: d.test.stratified(5), lambda d: d.train.subset([3, 1])):
        xs, ys = _all(pick(streamed), layout)
        xm, ym = _all(pick(held), layout)
        assert torch.equal(xs, xm) and torch.equal(ys, ym)
    assert streamed.describe()["resolution"] == held.describe()["resolution"] == res
    assert torch.equal(streamed.test.in_memory().images, held.test.images)


def test_auto_streams_only_above_the_memory_budget(tree, tmp_path, monkeypatch):
    assert _load(tree, tmp_path, "auto").mode == "memory"      # 36 small images fit any budget
    # 36 images x 3 x 64 x 64 bytes = 442,368 bytes: a 1 MB machine at a quarter holds 262,144
    monkeypatch.setattr(stream, "memory_bytes", lambda: 2 ** 20)
    assert _load(tree, tmp_path, "auto").mode == "stream"
    assert _load(tree, tmp_path, "auto", memory_budget=0.5).mode == "memory"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")                # every process of a torchrun job holds a copy
    assert _load(tree, tmp_path, "auto", memory_budget=0.5).mode == "stream"


def test_ranks_read_disjoint_shards_that_cover_the_epoch(tree, tmp_path):
    train_split = _load(tree, tmp_path, "stream").train        # 24 images
    for epoch in (0, 1):
        shards = [list(train_split.shard(rank, 2, shuffle=True, seed=3, epoch=epoch)) for rank in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == 12
        assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(24))
    assert list(train_split.shard(0, 2, True, 3, 0)) != list(train_split.shard(0, 2, True, 3, 1))
    labels = [torch.cat([y for _, y in BatchLoader(train_split, 4, "imagenet", shuffle=True, drop_last=True,
                                                   rank=r, world_size=2)]) for r in (0, 1)]
    assert sorted(torch.cat(labels).tolist()) == sorted(train_split.labels.tolist())


def test_augmentation_is_reproducible_whichever_worker_decodes(tree, tmp_path):
    def epoch(workers, e, layout="imagenet"):
        ds = _load(tree, tmp_path, "stream", layout, 64 if layout == "imagenet" else 32, workers=workers)
        loader = BatchLoader(ds.train, 6, layout, shuffle=True, augment=True, drop_last=True, seed=1)
        loader.set_epoch(e)
        return torch.cat([x for x, _ in loader])
    assert torch.equal(epoch(0, 0), epoch(2, 0))
    assert not torch.equal(epoch(0, 0), epoch(0, 1))
    assert torch.equal(epoch(0, 0, "cifar"), epoch(2, 0, "cifar"))


def test_random_resized_crop_of_the_whole_image_is_a_resize():
    img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    from torchvision.transforms.v2 import functional as TF
    out = random_resized_crop(img, 16, g, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    whole = TF.resize(img, [16, 16], antialias=True)
    assert torch.equal(out, whole) or torch.equal(out, whole.flip(-1))
    crops = torch.stack([random_resized_crop(img, 16, g) for _ in range(8)])
    assert crops.shape == (8, 3, 16, 16) and not all(torch.equal(crops[0], c) for c in crops[1:])


def test_a_broken_file_is_one_line_naming_it(tree, tmp_path):
    import shutil
    bad = shutil.copytree(tree, tmp_path / "bad")
    victim = sorted((bad / "test" / "checker").glob("*.jpg"))[0]
    victim.write_bytes(b"\xff\xd8\xff not a jpeg")
    ds = _load(bad, tmp_path, "stream", workers=1)
    with pytest.raises(DataError) as e:
        _all(ds.test, "imagenet")
    assert str(victim) in str(e.value) and "\n" not in str(e.value)


def test_bad_mode_flags_are_user_errors(capsys, tmp_path):
    assert train.main(["--data-mode", "disk", "--out", str(tmp_path / "o")]) == 2
    assert "--data-mode should be one of auto, memory, stream instead of 'disk'" in capsys.readouterr().err
    assert train.main(["--data-source", "random", "--data-mode", "stream", "--out", str(tmp_path / "o")]) == 2
    assert "needs --data-source folder" in capsys.readouterr().err
    assert train.main(["--memory-budget", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "--memory-budget should be a fraction of memory in (0, 1] instead of 1.5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


TINY_STREAM = ["--layout", "imagenet", "--resolution", "64", "--width", "0.25", "--batch-size", "8", "--epochs", "1",
               "--max-steps-per-epoch", "2", "--budget-minutes", "0", "--eval-images", "6", "--data-mode", "stream",
               "--data-workers", "1", "--device", "cpu", "--calib-size", "4"]


def test_torchrun_two_processes_stream_their_shards(tree, tmp_path):
    """`torchrun --standalone --nproc-per-node 2 train.py ... --data-mode stream` with gloo on the CPU: train.py
    streams, each rank its shard, and the ranks end with the same weights."""
    for f in tree.glob(".decoded*"):
        f.unlink()
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "train.py",
           "--data", str(tree), "--cache-dir", str(tmp_path / "c"), "--out", str(out), *TINY_STREAM]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    res = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    digests = doc["final"]["rank_param_sha256"]
    assert doc["data"]["mode"] == "stream" and len(digests) == 2 and digests[0] == digests[1]
    assert doc["history"][0]["train_images"] == 16       # 2 ranks x 2 steps x 4 images
    assert doc["data"]["resolution"] == 64 and doc["final"]["test_images"] == 6
    assert res.stdout.count("data: streaming") == 1 and not list(tree.glob(".decoded*"))
