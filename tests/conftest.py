"""Fixtures shared by every test file: the real CIFAR-10 JPEGs from ../shared/data, tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CIFAR_TGZ = SHARED / "data" / "cifar10-jpeg.tar.gz"
REFERENCE_CKPT = SHARED / "models" / "cifar10_mobilenetv2_w1.0.pt"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _own_runs_dir(tmp_path, monkeypatch):
    """Each test records its models in a runs/latest.json of its own, never in the checkout's runs/."""
    monkeypatch.setenv("MNV2_RUNS", str(tmp_path / "runs"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One unpack/decoding cache for the whole session (set MNV2_CACHE to reuse one across sessions)."""
    env = os.environ.get("MNV2_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def cifar(cache_dir):
    """The real CIFAR-10 JPEG data set (50,000 train, 10,000 test), decoded once per session (~20 s)."""
    from mobilenet.data import DataConfig, load_dataset
    if not CIFAR_TGZ.exists():
        pytest.fail(f"{CIFAR_TGZ} is missing: the tests need ../shared beside the checkout")
    return load_dataset(DataConfig(source="folder", root=str(CIFAR_TGZ), cache_dir=str(cache_dir)))


@pytest.fixture(scope="session")
def cifar_small(cifar):
    """A few hundred real images: 512 train (stratified by the archive order), 256 test, 128 calibration."""
    from mobilenet.data import Dataset
    tr = cifar.train.subset(torch.arange(0, len(cifar.train), len(cifar.train) // 512)[:512])
    te = cifar.test.subset(torch.arange(0, len(cifar.test), len(cifar.test) // 256)[:256])
    return Dataset(tr, te, cifar.calib.subset(torch.arange(128)), cifar.classes, cifar.layout, cifar.source,
                   cifar.root)


def tiny_config(**kw):
    """A MobileNetV2 of the full table at width 0.25 with 10 classes: ~0.1 M parameters, fast on a CPU."""
    from mobilenet import ModelConfig
    base = dict(layout="cifar", width_mult=0.25, num_classes=10, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_model():
    from mobilenet import build_model
    torch.manual_seed(0)
    return build_model(tiny_config()).eval()


def real_stats_tiny_model(data):
    """(tiny model in eval mode whose BN statistics come from real training images, so its activations look like a
    trained net's; the calibration batches of 64). `data`: a Dataset such as the cifar_small fixture."""
    from mobilenet import build_model
    from mobilenet.data import BatchLoader
    torch.manual_seed(0)
    m = build_model(tiny_config()).train()
    with torch.no_grad():
        for x, _ in BatchLoader(data.train, 128):
            m(x)
    return m.eval(), [x for x, _ in BatchLoader(data.calib, 64)]


@pytest.fixture(scope="session")
def tiny_w8a8(tmp_path_factory, cifar_small) -> dict:
    """One tiny W8A8 per-channel model with real BN statistics, its FP32 and quantized checkpoints, and the file
    `python -m export` makes of it (validated on 48 real test images). The export tests and the integer-simulation
    tests both read this one file: a litert-torch conversion costs 10-15 s on 2 cores.
    Keys: model, calib (batches), fp32, W8A8 (checkpoint paths), qm, tflite (path), report (its JSON)."""
    import json
    from common.files import sha256_file
    from export.__main__ import main as export_main
    from mobilenet import atomic_save
    from quantize import calibrate, freeze, prepare, recipe
    from quantize.io import save_quantized
    d = tmp_path_factory.mktemp("tiny_w8a8")
    m, xs = real_stats_tiny_model(cifar_small)
    out = {"model": m, "calib": xs, "fp32": d / "fp32.pt", "W8A8": d / "W8A8.pt", "tflite": d / "w8a8.tflite"}
    atomic_save({"format": "mnv2-compress", "kind": "fp32", "model_config": m.cfg.to_dict(),
                 "model": m.state_dict()}, out["fp32"])
    qm = prepare(m, recipe("W8A8"))
    calibrate(qm, xs)
    freeze(qm)
    save_quantized(out["W8A8"], qm, {"source_checkpoint": str(out["fp32"])})
    before = sha256_file(out["W8A8"])
    assert export_main(["--checkpoint", str(out["W8A8"]), "--out", str(out["tflite"]), "--val-images", "48",
                        "--data", str(CIFAR_TGZ)]) == 0
    assert sha256_file(out["W8A8"]) == before              # export never modifies its checkpoint
    out["qm"], out["report"] = qm, json.loads((d / "w8a8.tflite.json").read_text())
    return out


def make_image_tree(root: Path, per_class: tuple[int, int] = (32, 8), size: tuple[int, int] = (40, 48),
                    seed: int = 0) -> Path:
    """An ImageFolder tree unlike CIFAR-10: three classes of generated patterns (horizontal stripes, vertical
    stripes, checkerboard) at a random phase and period, `size` (H, W) pixels, every third image grayscale,
    PNG and JPEG mixed. `per_class`: (train, test) images per class. Returns `root`."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    patterns = {"checker": lambda p, o: ((yy + o) // p + (xx + o) // p) % 2,
                "hstripes": lambda p, o: ((yy + o) // p) % 2,
                "vstripes": lambda p, o: ((xx + o) // p) % 2}
    k = 0
    for split, n in zip(("train", "test"), per_class):
        for name, pattern in patterns.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                period, offset = int(rng.integers(3, 7)), int(rng.integers(0, 8))
                lo, hi = rng.uniform(0, 90), rng.uniform(160, 255)
                img = np.where(pattern(period, offset), hi, lo) + rng.normal(0, 12, (h, w))
                img = np.clip(img, 0, 255).astype(np.uint8)
                if k % 3:   # colour: the pattern in one channel over a tinted background
                    tint = rng.uniform(0.4, 1.0, 3)
                    im = Image.fromarray((img[..., None] * tint).astype(np.uint8), "RGB")
                else:
                    im = Image.fromarray(img, "L")
                im.save(d / f"{i:04d}.{'png' if k % 2 else 'jpg'}")
                k += 1
    return root
