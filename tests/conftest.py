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
    return Dataset(tr, te, cifar.calib.subset(torch.arange(128)), cifar.classes, cifar.layout, cifar.source)


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
