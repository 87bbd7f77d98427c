"""The network against torchvision's mobilenet_v2: shapes, parameter counts, residuals, BN folding, weight import."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2

from conftest import tiny_config
from mobilenet import (ConvBNAct, InvertedResidual, ModelConfig, build_model, fold_bn, fold_model, is_folded,
                       load_model, to_torchvision_state_dict)
from mobilenet.model import INVERTED_RESIDUAL_SETTING


def _randomize_bn(model: nn.Module, seed: int = 0):
    """BN statistics and affine terms far from their init, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)


def _torchvision(layout: str, **kw) -> nn.Module:
    """torchvision's model; for CIFAR with the two strides the shared/models README names set to 1."""
    tv = mobilenet_v2(**kw)
    if layout == "cifar":
        tv.features[0][0].stride = (1, 1)
        tv.features[2].conv[1][0].stride = (1, 1)
    return tv


@pytest.mark.parametrize("layout,size", [("cifar", 32), ("imagenet", 224)])
def test_output_shape(layout, size):
    model = build_model(tiny_config(layout=layout, num_classes=7)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)
    assert model.cfg.input_size == size


@pytest.mark.parametrize("layout,size,spatial", [("cifar", 32, 4), ("imagenet", 224, 7)])
def test_feature_map_size(layout, size, spatial):
    # CIFAR keeps 32 -> 32 through the stem and stage 2, then three stride-2 stages: 32/8 = 4; ImageNet 224/32 = 7
    model = build_model(tiny_config(layout=layout)).eval()
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, size, size)).shape[-1] == spatial


@pytest.mark.parametrize("width", [0.5, 1.0])
@pytest.mark.parametrize("classes", [10, 1000])
def test_parameter_count_equals_torchvision(width, classes):
    ours = sum(p.numel() for p in build_model(ModelConfig(width_mult=width, num_classes=classes)).parameters())
    tv = sum(p.numel() for p in mobilenet_v2(width_mult=width, num_classes=classes).parameters())
    assert ours == tv
    if (width, classes) == (1.0, 10):
        assert ours == 2_236_682  # the reference checkpoint's count (shared/models/README.md)


def test_layouts_share_parameters():
    a = build_model(ModelConfig(layout="cifar", width_mult=0.5)).state_dict()
    b = build_model(ModelConfig(layout="imagenet", width_mult=0.5)).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.parametrize("layout", ["cifar", "imagenet"])
def test_residual_only_where_stride_1_and_same_channels(layout):
    model = build_model(ModelConfig(layout=layout))
    tv = _torchvision(layout)
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    assert len(blocks) == sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING) == 17
    for i, blk in enumerate(blocks):
        dw = blk.conv[-2].conv
        inp = blk.conv[0].conv.in_channels
        oup = blk.conv[-1].conv.out_channels
        assert blk.use_res_connect == (dw.stride == (1, 1) and inp == oup), f"block {i}"
        assert blk.use_res_connect == tv.features[i + 1].use_res_connect, f"block {i}"
    # 10 residual blocks: the n-1 repeats of each stage with n > 1 (1 + 2 + 3 + 2 + 2)
    assert sum(b.use_res_connect for b in blocks) == 10


def test_residual_adds_input(tiny_model):
    """With the last BN of a block set to output 0 (weight and bias 0, so the branch is exactly zero), a residual
    block passes its input through unchanged and a block without a residual outputs zeros."""
    res = next(m for m in tiny_model.features if isinstance(m, InvertedResidual) and m.use_res_connect)
    plain = next(m for m in tiny_model.features if isinstance(m, InvertedResidual) and not m.use_res_connect)
    for blk in (res, plain):
        with torch.no_grad():
            blk.conv[-1][1].weight.zero_()
            blk.conv[-1][1].bias.zero_()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, res.conv[0].conv.in_channels, 8, 8, generator=g)
    xp = torch.randn(2, plain.conv[0].conv.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        assert torch.equal(res(x), x)
        assert torch.count_nonzero(plain(xp)) == 0


def test_cifar_strides_marked():
    model = build_model(ModelConfig(layout="cifar"))
    assert model.features[0].conv.stride == (1, 1)
    assert model.features[2].conv[1].conv.stride == (1, 1)  # stage 2, first block, dw
    imagenet = build_model(ModelConfig(layout="imagenet"))
    assert imagenet.features[0].conv.stride == (2, 2)
    assert imagenet.features[2].conv[1].conv.stride == (2, 2)


@pytest.mark.parametrize("layout,size", [("cifar", 32), ("imagenet", 224)])
def test_fold_model_matches_eval_model(layout, size):
    torch.manual_seed(0)
    model = build_model(tiny_config(layout=layout))
    _randomize_bn(model)
    model.eval()
    folded = fold_model(model)
    assert is_folded(folded) and not is_folded(model)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    # 1e-5: FP32 rounding of the reordered multiply-adds, summed over ~50 layers; logits are O(1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_fold_model_leaves_input_untouched(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    fold_model(tiny_model)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny_model.modules())


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_bn_equals_pytorch_fusion(with_bias):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, 3, 3, generator=g)
    b = torch.randn(16, generator=g) if with_bias else None
    mean, var = torch.randn(16, generator=g), torch.rand(16, generator=g) + 0.05
    gamma, beta = torch.randn(16, generator=g), torch.randn(16, generator=g)
    ours_w, ours_b = fold_bn(w, b, mean, var, 1e-5, gamma, beta)
    ref_w, ref_b = torch.nn.utils.fusion.fuse_conv_bn_weights(w, b, mean, var, 1e-5, gamma, beta)
    assert torch.equal(ours_w, ref_w.detach())  # the same products in the same order: bit-identical
    # bias: PyTorch computes (b - mean) * rsqrt * gamma, we (b - mean) * (gamma * rsqrt): 1-2 ulp apart
    torch.testing.assert_close(ours_b, ref_b.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout,size", [("cifar", 32), ("imagenet", 224)])
def test_torchvision_import_gives_identical_outputs(layout, size):
    torch.manual_seed(0)
    tv = _torchvision(layout, width_mult=0.5, num_classes=10)
    _randomize_bn(tv)
    tv.eval()
    model, ckpt = load_model(tv.state_dict(), layout=layout)
    assert model.cfg.width_mult == 0.5 and model.cfg.num_classes == 10 and model.cfg.layout == layout
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        # the same kernels on the same tensors in the same order: exactly equal
        assert torch.equal(model(x), tv(x))
    back = to_torchvision_state_dict(model)
    assert set(back) == set(tv.state_dict())
    assert all(torch.equal(back[k], v) for k, v in tv.state_dict().items())


def test_hidden_channels_build_structured_model():
    base = build_model(tiny_config())
    blocks = [m for m in base.features if isinstance(m, InvertedResidual)]
    full = [b.conv[-2].conv.out_channels for b in blocks]
    # keep block 0 (expand ratio 1: its hidden width is the stem's) and halve the others
    hidden = [full[0]] + [max(1, h // 2) for h in full[1:]]
    model = build_model(tiny_config(hidden_channels=hidden)).eval()
    got = [m.conv[-2].conv.out_channels for m in model.features if isinstance(m, InvertedResidual)]
    assert got == hidden
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in base.parameters())


def test_hidden_channels_validated():
    with pytest.raises(ValueError, match="hidden_channels has 3 entries"):
        build_model(tiny_config(hidden_channels=[8, 8, 8]))
    blocks = [m for m in build_model(tiny_config()).features if isinstance(m, InvertedResidual)]
    hidden = [b.conv[-2].conv.out_channels for b in blocks]
    hidden[0] += 8  # block 0 has no expansion layer to widen
    with pytest.raises(ValueError, match="expand_ratio 1"):
        build_model(tiny_config(hidden_channels=hidden))


@pytest.mark.parametrize("bad,match", [(dict(layout="mobile"), "unknown layout 'mobile'"),
                                       (dict(width_mult=0), "width_mult"), (dict(num_classes=0), "num_classes"),
                                       (dict(dropout=1.0), "dropout")])
def test_config_errors_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)


def test_conv_bn_act_rejects_stride_3():
    with pytest.raises(ValueError, match="stride should be 1 or 2 instead of 3"):
        ConvBNAct(3, 8, stride=3)
