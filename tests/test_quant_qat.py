"""Quantization-aware training: the QAT forward with frozen BN and observers equals the PTQ simulation bit for
bit, the fused fake-quant kernel equals core's reference, gradients reach weights and biases, masks hold, and
short runs train without diverging. Tiny models (width 0.25) on a few hundred real CIFAR-10 images."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mobilenet import build_model
from mobilenet.data import BatchLoader
from quantize import prepare, recipe, to_ptq
from quantize.core import fake_quantize
from quantize.fakequant import fused_fake_quantize
from quantize.qat import QATConfig, qat_mask_names, run_qat
from quantize.qmodel import calibrate, freeze, freeze_bn, qlayers, quant_points

from conftest import tiny_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are bound by per-op overhead: one thread avoids OpenMP spin contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batches(split, n, bs=64, augment=False, seed=0):
    loader = BatchLoader(split, bs, "cifar", shuffle=augment, augment=augment, seed=seed)
    return [b for _, b in zip(range(n), loader)]


@torch.no_grad()
def _bn_stats(model, batches):
    """Running BN statistics from real images (cumulative average), so a freshly built model behaves in eval
    mode as a trained one does: eval-mode activations, hence calibrated ranges, match the training ones."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for x, _ in batches:
        model(x)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


def _start(qm, batches):
    calibrate(qm, [x for x, _ in batches])
    for fq in quant_points(qm).values():
        fq.observe, fq.fake_quant = True, True
        fq.compute_qparams()
    return qm


# ------------------------------------------------------------------------------------------ fused fake quant

@pytest.mark.parametrize("qmin,qmax,axis", [(-128, 127, None), (-127, 127, 0), (-7, 7, 0), (-8, 7, None),
                                            (-128, 127, 0), (-32767, 32767, None)])
def test_fused_fake_quantize_equals_core_bit_for_bit(qmin, qmax, axis):
    # exact: both round x * (1 / scale) half to even in float32; ties and clipped codes included on purpose
    g = torch.Generator().manual_seed(0)
    c = 24
    scale = torch.rand(c, generator=g) * 0.05 + 1e-3 if axis == 0 else torch.tensor(0.0173)
    zp = torch.randint(-3, 4, (c,), generator=g) if axis == 0 else torch.tensor(max(qmin, min(qmax, -3)))
    s = scale.reshape(-1, 1, 1, 1) if axis == 0 else scale
    k = torch.randint(-2 * qmax, 2 * qmax, (c, 8, 3, 3), generator=g).float()
    x = torch.cat([torch.randn(c, 8, 3, 3, generator=g) * s * qmax / 2, (k + 0.5) * s, k * s], 1)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = fake_quantize(x, scale, zp, qmin, qmax, axis)
    out = fused_fake_quantize(x, scale, zp, qmin, qmax, axis)
    assert torch.equal(out, ref)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    (g_out,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g_out, g_ref)  # the clipped straight-through mask


@pytest.mark.parametrize("relu6", [True, False])
@pytest.mark.parametrize("observer", ["minmax", "ema", "percentile"])
@pytest.mark.parametrize("phase", ["calibrate", "observe+fq", "frozen"])
def test_inplace_relu6_fake_quant_equals_unfused(relu6, observer, phase):
    """FakeQuant.forward_inplace (ReLU6 + fake quant in one pass, in the caller's tensor) against the unfused
    hardtanh -> forward: outputs, gradients and observer ranges all bit-identical. The input has exact ties,
    values below 0, above 6 and beyond the range, channels_last."""
    from quantize.fakequant import FakeQuant
    from quantize.spec import activation_spec
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 8, 5, 5, generator=g) * 4 + 1
    base[0, 0, 0, :4] = torch.tensor([0.0, 6.0, -0.0, 3 * 0.5 / 255 * 6])
    base = base.contiguous(memory_format=torch.channels_last)
    fqs = [FakeQuant(activation_spec(8), observer) for _ in range(2)]
    for fq in fqs:
        fq.observer(torch.nn.functional.hardtanh(base, 0.0, 6.0) * 0.7 if relu6 else base * 0.7)  # a prior range
        if phase != "calibrate":
            fq.fake_quant = True
            fq.compute_qparams()
        if phase == "frozen":
            fq.freeze()
    outs, grads = [], []
    for i, fq in enumerate(fqs):
        x = base.clone().requires_grad_()
        y = x * 1.0                                   # a fresh intermediate, as a conv output is
        out = fq.forward_inplace(y, relu6) if i else fq(torch.nn.functional.hardtanh(y, 0.0, 6.0) if relu6 else y)
        (gx,) = torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape)).sum(), x)
        outs.append(out.detach())
        grads.append(gx)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert torch.equal(fqs[0].observer.min_val, fqs[1].observer.min_val)
    assert torch.equal(fqs[0].observer.max_val, fqs[1].observer.max_val)
    if phase != "calibrate":
        assert torch.equal(fqs[0].scale, fqs[1].scale) and torch.equal(fqs[0].zero_point, fqs[1].zero_point)


@pytest.mark.parametrize("scale,zp", [(8.0 / 255, -160), (6.0 / 255, -128), (2.5 / 255, -140), (4.0 / 255, -250),
                                      (7.0 / 255, 100), (0.05, -128)])
def test_inplace_relu6_fake_quant_any_range(scale, zp):
    """Installed ranges the observer would not produce: covering 6 (hi >= round(6 / s)), starting above 0
    (lo > 0), the whole code range above 6, and a zero-point at the top: still bit-identical to hardtanh ->
    fake quant, values and gradients."""
    from quantize.fakequant import FakeQuant
    from quantize.spec import activation_spec
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(2, 8, 6, 6, generator=g) * 4 + 2).contiguous(memory_format=torch.channels_last)
    base[0, 0, 0, :5] = torch.tensor([0.0, 6.0, scale * 0.5, 6.0 - scale * 0.5, scale * 1.5])
    res = []
    for inplace in (False, True):
        fq = FakeQuant(activation_spec(8), "minmax")
        fq.set_qparams(scale, zp)
        x = base.clone().requires_grad_()
        y = x * 1.0
        out = fq.forward_inplace(y, True) if inplace else fq(torch.nn.functional.hardtanh(y, 0.0, 6.0))
        (gx,) = torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape)).sum(), x)
        res.append((out.detach(), gx))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


# ------------------------------------------------------------------------------------------ the QAT identity

def test_frozen_qat_forward_equals_ptq_bit_for_bit(tiny_model, cifar_small):
    batches = _batches(cifar_small.train, 4, augment=True)
    qm = _start(prepare(tiny_model, recipe("W8A8"), qat=True), batches[:1])
    opt = torch.optim.SGD(qm.parameters(), lr=0.01, momentum=0.9)
    qm.train()
    for i, (x, y) in enumerate(batches):       # move weights, BN running statistics and ranges away from start
        if i == 2:
            freeze_bn(qm)
        F.cross_entropy(qm(x), y).backward()
        opt.step()
        opt.zero_grad()
    freeze(qm)
    ptq = to_ptq(qm)
    x = _batches(cifar_small.test, 1)[0][0]
    with torch.no_grad():
        a, b = qm.eval()(x), ptq(x)
    assert torch.equal(a, b)  # exact: the same fold_bn call, frozen buffers, the same fake-quant kernel
    assert all(layer.bn is None for layer in qlayers(ptq).values())


# ------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("bn_frozen", [False, True])
def test_ste_gradients_reach_weights_and_biases(tiny_model, cifar_small, bn_frozen):
    batches = _batches(cifar_small.train, 1)
    qm = _start(prepare(tiny_model, recipe("W8A8"), qat=True), batches)
    if bn_frozen:
        freeze_bn(qm)
        freeze(qm)
    qm.train()
    x, y = batches[0]
    F.cross_entropy(qm(x), y).backward()
    for name, layer in qlayers(qm).items():
        assert layer.op.weight.grad is not None and layer.op.weight.grad.abs().sum() > 0, name
        if layer.bn is not None:
            assert layer.bn.bias.grad.abs().sum() > 0, name     # after the freeze: through the int32 bias STE
    assert qm.classifier.op.bias.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ training

def test_early_phase_lowers_the_loss(cifar_small):
    # the classic "does it learn" check: fit two fixed batches of real images. (From a fresh model, a run over
    # the 512 augmented images at a high rate does not lower the loss in 24 steps even in FP32.)
    torch.manual_seed(0)
    model = _bn_stats(build_model(tiny_config()), _batches(cifar_small.train, 8))
    qm = _start(prepare(model, recipe("W8A8", act_observer="ema"), qat=True), _batches(cifar_small.calib, 2))
    opt = torch.optim.SGD(qm.parameters(), lr=0.02, momentum=0.9)
    fixed = _batches(cifar_small.train, 2)
    qm.train()
    losses = []
    for _ in range(10):                          # 20 steps, batch statistics and observers on throughout
        for x, y in fixed:
            loss = F.cross_entropy(qm(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.2, losses  # from ~2.30; the drop must be well beyond batch-to-batch noise (~0.05)


def test_run_qat_holds_masks_and_does_not_diverge(tiny_model, cifar_small):
    model = _bn_stats(tiny_model, _batches(cifar_small.train, 4))
    g = torch.Generator().manual_seed(1)
    names = ["features.0.0.weight", "features.3.conv.1.0.weight", "features.5.conv.2.0.weight",
             "classifier.1.weight"]
    params = dict(model.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=g) > 0.5 for n in names}
    before = {n: params[n].detach().clone() for n in names}
    # every phase in three short epochs, at a learning rate 100x the recipe's to stress it
    cfg = QATConfig(epochs=3, lr=0.01, freeze_bn_epoch=1, freeze_observer_epoch=2, batch_size=32,
                    max_images_per_epoch=128, calib_batches=1, eval_images=312, channels_last=False)
    out = run_qat(model, cifar_small, recipe("W8A8"), cfg, masks=masks, log=lambda *_: None)
    assert [h["epoch"] for h in out.qat_history] == [1, 2, 3]
    assert all(math.isfinite(h["loss"]) for h in out.qat_history)
    layers = qlayers(out)
    for n in names:
        w = layers[qat_mask_names({n: masks[n]}, out).popitem()[0][: -len(".op.weight")]].op.weight
        assert torch.all(w[~masks[n]] == 0), n                    # folded weight: zero stays exactly zero
        assert (w[masks[n]] != 0).float().mean() > 0.99, n         # and the kept weights are still there
    assert all(fq.frozen for fq in quant_points(out).values())
    assert params["features.0.0.weight"].equal(before["features.0.0.weight"])  # the input model is untouched
    x = _batches(cifar_small.test, 1)[0][0]
    assert torch.isfinite(out(x)).all()


def test_mask_names_map_onto_qlayers(tiny_model):
    qm = prepare(tiny_model, recipe("W8A8"), qat=True)
    w = dict(tiny_model.named_parameters())
    masks = {"features.0.0.weight": torch.ones_like(w["features.0.0.weight"], dtype=torch.bool),
             "features.3.conv.1.0.weight": torch.ones_like(w["features.3.conv.1.0.weight"], dtype=torch.bool),
             "classifier.1.weight": torch.ones_like(w["classifier.1.weight"], dtype=torch.bool)}
    assert set(qat_mask_names(masks, qm)) == {"features.0.op.weight", "features.3.conv.1.op.weight",
                                              "classifier.op.weight"}
    with pytest.raises(ValueError, match="features.99"):
        qat_mask_names({"features.99.0.weight": masks["features.0.0.weight"]}, qm)
    with pytest.raises(ValueError, match="shape"):
        qat_mask_names({"features.0.0.weight": masks["classifier.1.weight"]}, qm)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="epochs"):
        QATConfig(epochs=0)
    with pytest.raises(ValueError, match="batch_size=4"):
        QATConfig(batch_size=4)
    with pytest.raises(ValueError, match="max_images_per_epoch"):
        QATConfig(max_images_per_epoch=0)
