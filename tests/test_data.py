"""Every data source on the real CIFAR-10 JPEGs, the calibration split, batch augmentation and data errors."""
from __future__ import annotations

import pickle
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

import mobilenet.data as data_mod
from conftest import CIFAR_TGZ
from mobilenet.data import (RRC_RATIO, RRC_SCALE, BatchLoader, DataConfig, DataError, Split, augment_batch, crop_box,
                            load_dataset, normalize, random_resized_crop, resized_crop_batch)
from mobilenet.folder import find_tree


def _unpacked_tree(cache_dir: Path) -> Path:
    trees = sorted(p for p in cache_dir.glob("cifar10-jpeg-*") if (p / ".complete").exists())
    assert trees, f"the session fixture should have unpacked {CIFAR_TGZ.name} into {cache_dir}"
    return find_tree(trees[0])


def _small_tree(src: Path, dst: Path, classes=("bird", "cat", "ship"), n_train=4, n_test=2) -> Path:
    """A few real JPEGs copied into the ImageFolder layout."""
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            (dst / split / c).mkdir(parents=True)
            for f in sorted((src / split / c).iterdir())[:n]:
                shutil.copy(f, dst / split / c / f.name)
    return dst


# ---------------------------------------------------------------------------------------------- folder

def test_folder_from_archive_is_the_full_dataset(cifar):
    assert cifar.train.images.shape == (50_000, 3, 32, 32) and cifar.train.images.dtype == torch.uint8
    assert cifar.test.images.shape == (10_000, 3, 32, 32)
    assert cifar.classes == data_mod.CIFAR10_CLASSES  # alphabetical folder order is the CIFAR-10 label order
    assert torch.equal(cifar.train.labels.bincount(), torch.full((10,), 5000))
    assert torch.equal(cifar.test.labels.bincount(), torch.full((10,), 1000))
    # archive order: sorted by class, then file name
    assert torch.equal(cifar.test.labels, torch.arange(10).repeat_interleave(1000))
    # the README's channel means of the original data set, to JPEG precision
    mean = cifar.train.images[::10].float().mean((0, 2, 3)) / 255
    torch.testing.assert_close(mean, torch.tensor([0.4914, 0.4822, 0.4465]), rtol=0, atol=3e-3)


def test_archive_second_call_does_not_unpack(cifar, cache_dir, monkeypatch):
    def no_unpack(*a, **k):
        raise AssertionError("the archive was unpacked a second time")
    monkeypatch.setattr(tarfile, "open", no_unpack)
    again = load_dataset(DataConfig(source="folder", root=str(CIFAR_TGZ), cache_dir=str(cache_dir)))
    assert torch.equal(again.test.images, cifar.test.images)
    assert torch.equal(again.train.labels, cifar.train.labels)


def test_small_archive_unpacks_once_into_cache(cifar, cache_dir, tmp_path, monkeypatch):
    tree = _small_tree(_unpacked_tree(cache_dir), tmp_path / "src" / "wrapped")
    archive = tmp_path / "small.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="wrapped")  # one extra folder level, as many archives have
    calls = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: calls.append(a) or real_open(*a, **k))
    cfg = DataConfig(source="folder", root=str(archive), cache_dir=str(tmp_path / "cache"), calib_size=4)
    first = load_dataset(cfg)
    second = load_dataset(cfg)
    assert len(calls) == 1
    assert first.classes == ("bird", "cat", "ship")
    assert first.train.images.shape == (12, 3, 32, 32) and first.test.images.shape == (6, 3, 32, 32)
    assert torch.equal(first.train.images, second.train.images)
    assert not list((tmp_path / "cache").glob(".unpack-*"))  # no half-finished unpack left behind


def test_folder_from_directory_decodes_the_same_pixels(cifar, cache_dir, tmp_path):
    src = _unpacked_tree(cache_dir)
    tree = _small_tree(src, tmp_path / "imgs")
    ds = load_dataset(DataConfig(source="folder", root=str(tree), cache_dir=str(tmp_path / "unused"), calib_size=4))
    assert ds.classes == ("bird", "cat", "ship")
    assert ds.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # the first 4 training files of "bird" are CIFAR-10 training images 2*5000 .. 2*5000+3
    bird = data_mod.CIFAR10_CLASSES.index("bird") * 5000
    assert torch.equal(ds.train.images[:4], cifar.train.images[bird:bird + 4])
    assert not (tmp_path / "unused").exists()  # a directory is read in place, nothing unpacked


# ---------------------------------------------------------------------------------------------- cifar-batches

def _write_cifar_batches(root: Path, train, test, classes):
    """torchvision's cifar-10-batches-py: 5 training pickles, a test pickle and batches.meta, data (N, 3072) uint8."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    chunks = torch.arange(len(train)).chunk(5)

    def dump(name, split, idx, label):
        d = {"batch_label": label, "labels": split.labels[idx].tolist(),
             "data": split.images[idx].reshape(len(idx), -1).numpy(),  # R plane, G plane, B plane, row-major
             "filenames": [f"img_{i}.png" for i in idx.tolist()]}
        with open(base / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    for i, idx in enumerate(chunks):
        dump(f"data_batch_{i + 1}", train, idx, f"training batch {i + 1} of 5")
    dump("test_batch", test, torch.arange(len(test)), "testing batch 1 of 1")
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(classes), "num_cases_per_batch": len(chunks[0]), "num_vis": 3072}, f,
                    protocol=2)
    return base


def test_cifar_batches_from_real_pixels(cifar_small, tmp_path):
    train = cifar_small.train.subset(torch.arange(50))
    test = cifar_small.test.subset(torch.arange(20))
    _write_cifar_batches(tmp_path, train, test, cifar_small.classes)
    for download in (False, True):  # files present: --download must not try the network
        ds = load_dataset(DataConfig(source="cifar-batches", root=str(tmp_path), calib_size=10, download=download))
        assert torch.equal(ds.train.images, train.images) and torch.equal(ds.train.labels, train.labels)
        assert torch.equal(ds.test.images, test.images) and torch.equal(ds.test.labels, test.labels)
        assert ds.classes == cifar_small.classes
    # root may also be the batches directory itself
    ds = load_dataset(DataConfig(source="cifar-batches", root=str(tmp_path / "cifar-10-batches-py"), calib_size=10))
    assert torch.equal(ds.test.images, test.images)


def test_cifar_batches_errors(cifar_small, tmp_path):
    with pytest.raises(DataError, match="no cifar-10-batches-py under .*--download"):
        load_dataset(DataConfig(source="cifar-batches", root=str(tmp_path)))
    base = _write_cifar_batches(tmp_path, cifar_small.train.subset(torch.arange(10)),
                                cifar_small.test.subset(torch.arange(5)), cifar_small.classes)
    (base / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(DataConfig(source="cifar-batches", root=str(tmp_path)))
    (base / "data_batch_3").write_bytes(b"\x80\x02}q\x00")        # a pickle cut short
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR-10 batch file"):
        load_dataset(DataConfig(source="cifar-batches", root=str(tmp_path)))


class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_cifar_batch_that_runs_code_is_refused(cifar_small, tmp_path):
    """The batch files are pickles from elsewhere: one that names a callable is refused, and the callable never
    runs (the same file does run it under a plain pickle.load, so the check can fail)."""
    base = _write_cifar_batches(tmp_path, cifar_small.train.subset(torch.arange(10)),
                                cifar_small.test.subset(torch.arange(5)), cifar_small.classes)
    marker = tmp_path / "marker"
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(cifar_small.classes), "note": _WritesMarker(marker)}, f, protocol=2)
    with pytest.raises(DataError, match=r"batches.meta is not a CIFAR-10 batch file: asks to run Python code \(\w+\.open\)"):
        load_dataset(DataConfig(source="cifar-batches", root=str(tmp_path)))
    assert not marker.exists()
    with open(base / "batches.meta", "rb") as f:
        pickle.load(f)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- random, calibration

def test_random_source():
    a = load_dataset(DataConfig(source="random", random_size=64, calib_size=16))
    b = load_dataset(DataConfig(source="random", random_size=64, calib_size=16))
    c = load_dataset(DataConfig(source="random", random_size=64, calib_size=16, seed=1))
    assert a.train.images.shape == (64, 3, 32, 32) and a.train.images.dtype == torch.uint8
    assert a.calib.images.shape == (16, 3, 32, 32)
    assert torch.equal(a.train.images, b.train.images) and not torch.equal(a.train.images, c.train.images)
    assert not torch.equal(a.train.images, a.test.images)
    assert load_dataset(DataConfig(source="random", layout="imagenet", random_size=2)).train.images.shape[-1] == 224


def test_calibration_split_from_train_and_fixed(cifar, cache_dir):
    again = load_dataset(DataConfig(source="folder", root=str(CIFAR_TGZ), cache_dir=str(cache_dir)))
    assert len(cifar.calib) == 1000
    assert torch.equal(again.calib.images, cifar.calib.images) and torch.equal(again.calib.labels, cifar.calib.labels)

    def keys(images):  # one exact fingerprint per image
        return {bytes(im.numpy().tobytes()) for im in images}
    train, test, calib = keys(cifar.train.images), keys(cifar.test.images), keys(cifar.calib.images)
    assert calib <= train
    assert not calib & test
    # spread over the classes, not the first 1000 files of "airplane"
    assert (cifar.calib.labels.bincount(minlength=10) > 50).all()


# ---------------------------------------------------------------------------------------------- augmentation

def test_augment_is_a_crop_of_the_padded_image_and_a_flip(cifar_small):
    images = cifar_small.train.images[:64]
    out = augment_batch(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    offsets, flips = [], []
    for i in range(len(images)):
        found = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert found, f"image {i} is not a pad-4 crop (or its mirror) of its input"
        offsets.append(found[0][:2])
        flips.append(found[0][2])
    moved = sum(not torch.equal(out[i], images[i]) for i in range(len(images)))
    assert moved >= 60  # P(offset (4, 4) and no flip) = 1/162 per image
    assert len(set(offsets)) > 20 and 16 <= sum(flips) <= 48  # offsets spread out, about half mirrored


def test_augment_deterministic_per_generator(cifar_small):
    images = cifar_small.train.images[:32]
    a = augment_batch(images, torch.Generator().manual_seed(3))
    b = augment_batch(images, torch.Generator().manual_seed(3))
    c = augment_batch(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batch_loader_reproducible_per_epoch(cifar_small):
    def batches(epoch, **kw):
        loader = BatchLoader(cifar_small.train, 64, shuffle=True, augment=True, seed=5, **kw)
        loader.set_epoch(epoch)
        return list(loader)
    a, b, c = batches(0), batches(0), batches(1)
    assert len(a) == 8 and a[0][0].shape == (64, 3, 32, 32) and a[0][0].dtype == torch.float32
    assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])  # another epoch, another order
    cl = batches(0, channels_last=True)
    assert cl[0][0].is_contiguous(memory_format=torch.channels_last) and torch.equal(cl[0][0], a[0][0])


def test_batch_loader_ranks_split_the_epoch(cifar_small):
    seen = []
    for rank in range(2):
        loader = BatchLoader(cifar_small.train, 32, shuffle=True, seed=1, rank=rank, world_size=2)
        assert len(loader) == 8
        seen.append(torch.cat([y for _, y in loader]))
    plain = BatchLoader(cifar_small.train, 32, shuffle=True, seed=1)
    # the two ranks together take one epoch's order exactly once
    assert torch.equal(torch.cat(seen), torch.cat([y for _, y in plain]))


# ---------------------------------------------------------------------------------------------- RandomResizedCrop

SIZES = [(224, 224), (256, 320), (30, 40), (50, 400), (400, 50)]   # (H, W): square, photo, tiny, too wide, too tall


@pytest.mark.parametrize("h,w", SIZES)
def test_crop_box_is_torchvisions_box(h, w):
    """Exact: torchvision's RandomResizedCrop.get_params under torch.manual_seed(s) is the independent reference."""
    from torchvision.transforms import RandomResizedCrop
    img = torch.empty(3, h, w)
    with torch.random.fork_rng():
        for s in range(100):
            torch.manual_seed(s)
            ref = tuple(int(v) for v in RandomResizedCrop.get_params(img, list(RRC_SCALE), list(RRC_RATIO)))
            assert crop_box(h, w, torch.Generator().manual_seed(s)) == ref, f"seed {s}"


@pytest.mark.parametrize("h,w", SIZES[:3])
def test_crop_boxes_follow_the_scale_and_ratio_rules(h, w):
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([crop_box(h, w, g) for _ in range(500)], dtype=torch.float64)   # (500, 4) t, l, h, w
    top, left, ch, cw = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
    # sides are rounded to whole pixels: the area may stray from scale by the half-pixel border (ch + cw) / 2
    area = ch * cw
    slack = (ch + cw) / 2 + 0.25
    assert (area >= RRC_SCALE[0] * h * w - slack).all() and (area <= RRC_SCALE[1] * h * w + slack).all()
    # and the aspect by a half pixel on either side
    assert ((cw + 0.5) / (ch - 0.5) >= RRC_RATIO[0]).all() and ((cw - 0.5) / (ch + 0.5) <= RRC_RATIO[1]).all()
    frac = area / (h * w)      # spread over the whole range, not stuck at one end
    assert frac.min() < 0.15 and frac.max() > 0.85 and (cw / ch).min() < 0.8 and (cw / ch).max() > 1.25


@pytest.mark.parametrize("h,w,box", [(50, 400, (0, 166, 50, 67)),     # wider than 4/3: full height, 4/3 wide
                                     (400, 50, (166, 0, 67, 50)),     # taller than 3/4: full width, 4/3 high
                                     (30, 40, (0, 0, 30, 40))])       # 4/3 allowed: the whole image
def test_crop_box_falls_back_to_the_centre(h, w, box):
    # an area of 2-3 times the image never fits in 10 tries
    assert crop_box(h, w, torch.Generator().manual_seed(0), scale=(2.0, 3.0)) == box


@pytest.mark.parametrize("scale,ratio,bad", [((0.0, 1.0), RRC_RATIO, "scale"), ((0.5, 0.2), RRC_RATIO, "scale"),
                                             (RRC_SCALE, (1.5, 1.0), "ratio")])
def test_crop_box_rejects_bad_ranges_naming_them(scale, ratio, bad):
    value = re.escape(str(scale if bad == "scale" else ratio))
    with pytest.raises(ValueError, match=f"{bad} should be .* instead of {value}"):
        crop_box(10, 10, torch.Generator(), scale, ratio)


def test_resized_crop_batch_crops_flips_and_repeats_per_seed():
    images = torch.randint(0, 256, (32, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = resized_crop_batch(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, resized_crop_batch(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, resized_crop_batch(images, torch.Generator().manual_seed(4)))
    # a box of the whole image: the output is the image or its mirror, about half mirrored
    whole = resized_crop_batch(images, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flipped = [torch.equal(o, x.flip(-1)) for o, x in zip(whole, images)]
    assert all(f or torch.equal(o, x) for f, o, x in zip(flipped, whole, images)) and 8 <= sum(flipped) <= 24
    with pytest.raises(ValueError, match=r"square images, not \(24, 20\)"):
        resized_crop_batch(images[..., :20], torch.Generator())


def test_in_memory_and_streamed_paths_share_one_random_resized_crop():
    import mobilenet.stream as stream
    assert stream.random_resized_crop is random_resized_crop   # the streamed path's per-file augmentation
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(9)
    one_by_one = torch.stack([random_resized_crop(x, 24, g) for x in images])
    assert torch.equal(resized_crop_batch(images, torch.Generator().manual_seed(9)), one_by_one)


@pytest.mark.parametrize("layout,crop", [("imagenet", "resized_crop_batch"), ("cifar", "augment_batch")])
def test_batch_loader_augments_by_layout(layout, crop, monkeypatch):
    split = Split(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.zeros(16, dtype=torch.long))
    called = []
    for name in ("resized_crop_batch", "augment_batch"):
        real = getattr(data_mod, name)
        monkeypatch.setattr(data_mod, name, lambda x, g, _n=name, _f=real: called.append(_n) or _f(x, g))

    def epoch(seed):
        return torch.cat([x for x, _ in BatchLoader(split, 8, layout, shuffle=True, augment=True, seed=seed)])
    a = epoch(0)
    assert called == [crop, crop] and torch.equal(a, epoch(0)) and not torch.equal(a, epoch(1))


def test_normalize():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    mean, std = data_mod.MEAN_STD["cifar"]
    expect = (1 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(normalize(x)[0, :, 0, 0], expect)


# ---------------------------------------------------------------------------------------------- errors

def test_missing_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"data not found: {missing}"):
        load_dataset(DataConfig(source="folder", root=str(missing)))


def test_folder_errors(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no train/ and test/"):
        load_dataset(DataConfig(source="folder", root=str(tmp_path / "flat")))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a .tar.gz"):
        load_dataset(DataConfig(source="folder", root=str(tmp_path / "notes.txt")))
    with pytest.raises(DataError, match="unknown data source 'lmdb'"):
        load_dataset(DataConfig(source="lmdb"))
