"""Any input resolution (issue 14, point 1): the model config carries it, the data follows torchvision's
convention, and a 96x96 ImageNet-layout model goes through quantize, a bit-exact export and bench."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import train
from bench.__main__ import main as bench_main
from mobilenet import atomic_save, build_model, load_checkpoint
from mobilenet.checkpoint import FORMAT
from mobilenet.data import DataConfig, fit_image, load_dataset
from mobilenet.model import ModelConfig
from quantize.__main__ import main as quantize_main
from quantize.io import load_quantized


def _tree(root, classes: int, per_class=(2, 1), size=(40, 56)):
    """`classes` class folders of generated RGB images, `size` (H, W), none of them square."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c in range(classes):
            d = root / split / f"c{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB").save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("layout,res", [("imagenet", 96), ("imagenet", 160), ("cifar", 48)])
def test_config_and_data_follow_the_resolution(tmp_path, layout, res):
    cfg = ModelConfig(layout, 0.35, 5, resolution=res)
    assert cfg.input_size == res and ModelConfig(**cfg.to_dict()) == cfg
    ds = load_dataset(DataConfig(root=str(_tree(tmp_path / "t", 5)), layout=layout, resolution=res,
                                 cache_dir=str(tmp_path / "cache")))
    assert ds.train.images.shape[-2:] == (res, res) and ds.describe()["resolution"] == res
    out = build_model(cfg).eval()(torch.zeros(2, 3, res, res))
    assert out.shape == (2, 5)


def test_imagenet_transform_is_torchvisions_convention():
    """Resize the short side to res / 0.875 (256 for 224), center-crop res: torchvision's own transforms."""
    from torchvision.transforms import v2
    img = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for res in (96, 224):
        ref = v2.Compose([v2.Resize(round(res / 0.875), antialias=True), v2.CenterCrop(res)])(img)
        assert torch.equal(fit_image(img, "imagenet", res), ref)
    assert round(224 / 0.875) == 256


@pytest.mark.parametrize("layout,res", [("imagenet", 100), ("imagenet", 56), ("cifar", 24)])
def test_bad_resolution_is_refused(layout, res, capsys):
    with pytest.raises(ValueError, match=f"not {res}"):
        ModelConfig(layout, resolution=res)
    assert train.main(["--layout", layout, "--resolution", str(res), "--data-source", "random"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: --resolution should be a multiple of 8") and str(res) in err


def test_training_saves_the_resolution(tmp_path):
    out = tmp_path / "run"
    assert train.main(["--data-source", "random", "--layout", "imagenet", "--resolution", "64", "--width", "0.25",
                       "--epochs", "0", "--eval-images", "8", "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["model_config"]["resolution"] == 64


def test_96px_imagenet_model_quantizes_exports_exactly_and_benches(tmp_path):
    """The issue's case: ImageNet layout, width 0.35, 100 classes, 96x96 through quantize (which ends with the
    validated export) and bench."""
    tree = _tree(tmp_path / "photos", 100)
    torch.manual_seed(0)
    model = build_model(ModelConfig("imagenet", 0.35, 100, dropout=0.0, resolution=96))
    ckpt = tmp_path / "mine.pt"
    atomic_save({"format": FORMAT, "kind": "fp32", "model_config": model.cfg.to_dict(),
                 "model": model.state_dict()}, ckpt)
    out = tmp_path / "q"
    assert quantize_main(["--checkpoint", str(ckpt), "--data", str(tree), "--cache-dir", str(tmp_path / "cache"),
                          "--config", "W8A8", "--calib-size", "32", "--eval-images", "0", "--val-images", "10",
                          "--out", str(out), "--no-progress"]) == 0
    assert load_quantized(out / "quantized.pt")[0].model_cfg.resolution == 96
    rep = json.loads((out / "model_w8a8.tflite.json").read_text())
    assert rep["validation"]["passed"] and rep["validation"]["runs"]["xnnpack"]["max_lsb"] == 0
    from ai_edge_litert.interpreter import Interpreter
    (inp,) = Interpreter(model_path=str(out / "model_w8a8.tflite")).get_input_details()
    assert list(inp["shape"]) == [1, 3, 96, 96]
    csv_path = tmp_path / "host.csv"
    assert bench_main(["host", str(out / "model_w8a8.tflite"), "--runs", "3", "--csv", str(csv_path)]) == 0
    assert csv_path.read_text().count("model_w8a8.tflite") == 1
