"""PTQ and its advanced methods, metrics and quantized checkpoints.

Fast: width-0.25 models with non-trivial BN statistics, seeded random images; one floor on the reference
checkpoint (skipped without it) with a few hundred real images.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import REFERENCE_CKPT, tiny_config
from mobilenet import CheckpointError, atomic_save, build_model, fold_model, load_model
from mobilenet.engine import predict
from quantize import recipe
from quantize.adaround import adaround_layer
from quantize.bias_correction import bias_correct
from quantize.core import dequantize, quantize
from quantize.cle import cle_pairs, equalize
from quantize.fakequant import FakeQuant
from quantize.io import load_quantized, save_quantized
from quantize.metrics import compare_logits, snr_db, weight_size_bytes
from quantize.ptq import run_ptq
from quantize.qmodel import calibrate, freeze, freeze_bn, prepare, qlayers, set_observe
from quantize.walk import float_forward, walk


def _randomize_bn(model, spread: float = 1.0):
    """BN statistics far from the identity, so folding, equalization and corrections have something to do."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(spread * (1 + 0.5 * torch.randn(c, generator=g)).abs())
            m.bias.data.copy_(spread * (0.5 + 0.5 * torch.randn(c, generator=g)))
    return model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return _randomize_bn(build_model(tiny_config())).eval()


@pytest.fixture
def images():
    return torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------------------------------------ metrics

def test_compare_logits_hand_computed():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    q = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    # top-1: ref (0, 1), q (0, 0), labels (0, 0) -> acc_ref 1/2, acc_q 1, agreement 1/2
    # errors 0, 0, -2, 1 -> MSE 5/4; signal 1 + 4 = 5, noise 4 + 1 = 5 -> SNR 0 dB
    m = compare_logits(ref, q, torch.tensor([0, 0]))
    assert m == {"acc_ref": 0.5, "acc_q": 1.0, "agreement": 0.5, "mse": 1.25, "snr_db": 0.0, "n": 2}
    # q = 1.5 ref (exact in float32): noise = 0.25 signal -> 10 log10(4) = 6.0206 dB (float64 log10 rounding only)
    assert compare_logits(ref, ref * 1.5, torch.tensor([0, 1]))["snr_db"] == pytest.approx(10 * math.log10(4),
                                                                                          abs=1e-12)
    assert snr_db(ref, ref) == math.inf
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        compare_logits(ref, q[:1], torch.tensor([0, 0]))


def test_weight_size_bytes_hand_computed():
    lin = nn.Sequential(nn.Linear(4, 2))
    # 8 weights * 32 bits + 2 biases * 32 bits = 40 bytes; at 8 bits: 8 + 8 = 16 bytes
    assert weight_size_bytes(lin) == 40 and weight_size_bytes(lin, 8) == 16
    m = build_model(tiny_config())
    mods = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    n_w = sum(mod.weight.numel() for mod in mods)
    n_dw = sum(mod.weight.numel() for mod in mods if isinstance(mod, nn.Conv2d) and mod.groups > 1)
    n_b = sum(mod.weight.shape[0] for mod in mods)
    assert n_dw > 0
    assert weight_size_bytes(prepare(m, recipe("W4A8", dw_bits=4))) == (n_w * 4 + n_b * 32) // 8
    # the recipe's default: depthwise weights at 8 bits
    assert weight_size_bytes(prepare(m, recipe("W4A8"))) == ((n_w - n_dw) * 4 + n_dw * 8 + n_b * 32) // 8


# ------------------------------------------------------------------------------------ layer walk and CLE

def test_walk_quant_stream_is_the_model(model, images):
    """walk() mirrors QMobileNet.forward: with activation points off, its quant stream equals qm(x) exactly."""
    qm = prepare(model, recipe("W4A8"))
    set_observe(qm, False, False)
    assert torch.equal(walk(qm, images, lambda *a: None), qm(images))


def test_one_graph_walk_orders_every_evaluator(model, images):
    """quantize/graph.py is the one order: a recording evaluator sees every layer once, in module order, each
    residual add right after its block's last layer; walk() visits the same layers in the same order; and
    link_inputs feeds each layer from the point the walk had just produced (the ADD's after a residual block)."""
    from quantize import graph
    qm = prepare(model, recipe("W8A8"))
    seen, feeds = [], {}
    names = {id(m): n for n, m in qm.named_modules()}

    class Record(graph.Ops):
        def input(self, net, x):
            return net.quant_in

        def layer(self, layer, src):
            seen.append(names[id(layer)])
            feeds[names[id(layer)]] = src
            return layer.out_fq

        def add(self, block, skip, y):
            seen.append(names[id(block)] + ".add")
            return block.add_fq

        def pool(self, net, x):
            return net.pool_fq

    graph.network(qm, None, Record())
    layers = list(qlayers(qm))
    assert [n for n in seen if not n.endswith(".add")] == layers
    n_res = sum(1 for m in qm.features if graph.is_block(m) and m.use_res_connect)
    assert len(layers) == 53 and n_res > 0 and len(seen) == len(layers) + n_res
    for i, n in enumerate(seen):
        if n.endswith(".add"):
            assert seen[i - 1].startswith(n[:-len(".add")] + ".conv.")
    assert all(qm.get_submodule(n).input_fq is feeds[n] for n in layers)
    assert feeds["features.0"] is qm.quant_in and feeds["classifier"] is qm.pool_fq
    assert feeds["features.4.conv.0"] is qm.features[3].add_fq        # after the first residual block
    visited = []
    set_observe(qm, False, False)
    walk(qm, images[:2], lambda name, *a: visited.append(name))
    assert visited == layers


def _blockwise_rel_err(before, after, images) -> float:
    """Largest relative error of each equalized unit (stem + first block, then every block) fed the original
    model's input to it: the exactness of CLE without the error amplification of a deep random network."""
    inputs = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: inputs.__setitem__(k, i[0]))
             for k, blk in enumerate(before.features)]
    before(images)
    for h in hooks:
        h.remove()
    worst = 0.0
    units = [(0, 2)] + [(k, k + 1) for k in range(2, len(before.features))]
    for a, b in units:
        with torch.no_grad():
            ref = before.features[a:b](inputs[a])
            got = after.features[a:b](inputs[a])
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    return worst


def test_cle_keeps_the_function_and_equalizes(model, images):
    import copy
    folded = fold_model(model)
    before = copy.deepcopy(folded)
    report = equalize(folded, [images])
    # float32 rescaling of products: a few ulps of each unit's output (relative 1e-5)
    assert _blockwise_rel_err(before, folded, images) < 1e-5
    # 16 blocks with t=6 give 2 pairs, block 1 (t=1) dw -> pw; no stem -> dw: at width 0.25 block 1 has a residual
    assert report["pairs"] == len(cle_pairs(folded)) == 33
    assert len(cle_pairs(build_model())) == 34      # width 1.0: 32 -> 16 channels, no residual, stem -> dw too
    assert report["range_ratio_after"] < 0.5 * report["range_ratio_before"]


def test_cle_respects_relu6_saturation(images):
    """With BN scaled up, many channels saturate at 6: those are left unscaled, and each unit still computes the
    same on the calibration images."""
    import copy
    torch.manual_seed(0)
    folded = fold_model(_randomize_bn(build_model(tiny_config()), spread=6.0).eval())
    before = copy.deepcopy(folded)
    report = equalize(folded, [images])
    assert report["fixed"] > 0
    assert _blockwise_rel_err(before, folded, images) < 1e-5
    with pytest.raises(ValueError, match="BN-folded"):
        equalize(build_model(tiny_config()), [images])


# --------------------------------------------------------------------------------------- bias correction

def test_bias_correction_removes_mean_shift_of_first_layer(model, images):
    qm = prepare(model, recipe("W4A32"))
    layer = qlayers(qm)["features.0"]
    w_ref, b_ref = (t.clone() for t in layer.folded_weight_bias())
    bias_correct(qm, images)
    # the first layer sees the same input in both streams: E[W_q x + b'] = E[W x + b] per channel
    with torch.no_grad():
        w_q = layer.quant_weight(layer.folded_weight_bias()[0])
        mean_q = layer._op(images, w_q, layer.op.bias).mean((0, 2, 3))
        mean_f = layer._op(images, w_ref, b_ref).mean((0, 2, 3))
    assert torch.allclose(mean_q, mean_f, atol=1e-5)  # float32 means of ~50k values each
    assert not torch.equal(layer.op.bias, b_ref)


# ---------------------------------------------------------------------------------------------- AdaRound

def _toy_layer(bits=4):
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
    torch.manual_seed(3)
    nn.init.normal_(conv.weight, 0, 0.3)
    with torch.no_grad():
        conv.weight[:, :2] = 0.0            # pruned weights
    from quantize.qmodel import QLayer
    return QLayer(conv, None, True, recipe(f"W{bits}A32"))


def test_adaround_never_worse_and_snapped():
    layer = _toy_layer()
    w0 = layer.op.weight.detach().clone()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 8, 6, 6, generator=g)
    target = float_forward(layer, x, w0, layer.op.bias.detach())
    rep = adaround_layer(layer, x, target, iters=150)
    assert min(rep["err_adaround"], rep["err_nearest"]) <= rep["err_nearest"]
    assert rep["err_adaround"] < rep["err_nearest"]  # 150 steps on a toy layer: learned rounding does better
    fq = layer.w_fq
    assert fq.frozen and fq.fake_quant and not fq.observe
    w = layer.op.weight.detach()
    q = quantize(w, fq.scale, 0, -7, 7, axis=0)
    assert torch.equal(dequantize(q, fq.scale, 0, axis=0), w)                    # exactly s * q on the 4-bit grid
    assert torch.equal(layer.quant_weight(w), w)                                 # freezing keeps the integers
    assert torch.all(w[:, :2] == 0)                                              # pruned weights stay 0


def test_adaround_keeps_nearest_when_it_is_better():
    """A layer whose target is its own round-to-nearest output (so rounding to nearest is perfect, error 0) and
    whose weights sit on ties w / s = k + 0.5, where AdaRound without learning (h(V) starts at 0.5) and round-half-
    even cannot agree for both parities: 2.5 -> 2 and 3.5 -> 4 to nearest, but AdaRound rounds both up or both
    down. Its rounding is therefore worse, and the layer must keep round-to-nearest."""
    from quantize.qmodel import QLayer
    conv = torch.nn.Conv2d(4, 2, 1, bias=True)
    with torch.no_grad():       # per output channel, max |w| = 7 -> 4-bit scale 7 / 7 = 1: w / s is exact
        conv.weight.copy_(torch.tensor([[7.0, 2.5, 3.5, -0.5], [-7.0, 1.5, -2.5, 0.25]]).reshape(2, 4, 1, 1))
        conv.bias.copy_(torch.tensor([0.5, -0.25]))
    layer = QLayer(conv, None, True, recipe("W4A32"))
    w0, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    q_rtn = torch.tensor([[7.0, 2.0, 4.0, 0.0], [-7.0, 2.0, -2.0, 0.0]]).reshape(2, 4, 1, 1)  # half to even
    x = torch.randn(32, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    target = float_forward(layer, x, q_rtn, b)              # scale 1: the round-to-nearest layer's output
    rep = adaround_layer(layer, x, target, iters=0)
    assert torch.equal(layer.w_fq.scale, torch.ones(2))
    assert rep["err_nearest"] == 0.0 < rep["err_adaround"] and rep["kept"] == "nearest"
    assert torch.equal(layer.op.weight.detach(), q_rtn)     # the snapped weight: nearest, exactly
    assert not torch.equal(w0, q_rtn)


# ----------------------------------------------------------------------------------------------- run_ptq

@pytest.mark.parametrize("name,kw", [("W8A8", {}), ("W8A16", {}),
                                     ("W4A8", dict(granularity="per-tensor", cle=True, bias_correction=True)),
                                     ("W4A8", dict(adaround=True, adaround_iters=2))])
def test_run_ptq_frozen_and_deterministic(model, images, name, kw):
    q = recipe(name, calib="random", calib_size=32, **kw)
    a = run_ptq(model, None, q, opt_images=16, progress=False)
    b = run_ptq(model, None, q, opt_images=16, progress=False)
    assert all(fq.frozen and fq.fake_quant and not fq.observe for fq in a.modules() if isinstance(fq, FakeQuant))
    assert torch.equal(a(images), b(images))   # seeded random calibration and AdaRound: bit-identical reruns
    assert snr_db(model(images), a(images)) > 5.0  # a floor far below any working quantization (W4: ~15 dB)


def test_run_ptq_fp32_is_the_folded_model(model, images):
    qm = run_ptq(model, None, recipe("FP32", calib="random"), progress=False)
    # same convolutions on the same folded weights; only summation order may differ
    assert torch.allclose(qm(images), fold_model(model)(images), atol=1e-5)


def test_run_ptq_errors(model):
    with pytest.raises(ValueError, match="needs a dataset"):
        run_ptq(model, None, recipe("W8A8"), progress=False)
    with pytest.raises(ValueError, match="AdaRound and bias correction need quantized weights"):
        run_ptq(model, None, recipe("FP32", adaround=True, calib="random"), progress=False)


@pytest.mark.skipif(not REFERENCE_CKPT.exists(), reason="reference checkpoint not available")
def test_reference_w8a8_per_channel_snr_floor(cifar_small):
    """The lead's 500-image measurement gave 32.7 dB; 128 calibration and 256 test images are noisier, so the
    floor is the issue's 30 dB goal minus 2 dB of small-sample slack."""
    model, _ = load_model(REFERENCE_CKPT)
    qm = run_ptq(model, cifar_small, recipe("W8A8", calib_size=128), progress=False)
    ref = predict(model, cifar_small.test, disable_bar=True)
    m = compare_logits(ref, predict(qm, cifar_small.test, disable_bar=True), cifar_small.test.labels)
    assert m["snr_db"] > 28.0 and m["agreement"] > 0.95


# ----------------------------------------------------------------------------------------------------- io

def test_save_load_roundtrip(model, images, tmp_path):
    qm = run_ptq(model, None, recipe("W8A8", calib="random", calib_size=32), progress=False)
    masks = {"features.0.0.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool)}
    save_quantized(tmp_path / "q.pt", qm, {"metrics": {"snr_db": 1.0}, "source_checkpoint": "x.pt", "masks": masks})
    back, ckpt = load_quantized(tmp_path / "q.pt")
    assert torch.equal(back(images), qm(images))   # same buffers, same pure forward
    assert ckpt["kind"] == "quantized" and ckpt["qat"] is False and "masks" in ckpt
    assert ckpt["qparams"]["features.0.w_fq"]["axis"] == 0 and ckpt["qparams"]["quant_in"]["bits"] == 8
    assert all(fq.frozen and fq.fake_quant and not fq.observe for fq in back.modules() if isinstance(fq, FakeQuant))
    assert [p.name for p in tmp_path.iterdir()] == ["q.pt"]   # no temporary file left behind


def test_w4_checkpoint_from_before_depthwise_widths_loads_all_4bit(model, images, tmp_path):
    """A W4 checkpoint saved before dw_bits existed held every weight at 4 bits: it loads as such (label
    "W4A8 dw4", 4-bit depthwise quantizers), computing what it computed, not as the 8-bit depthwise default."""
    qm = run_ptq(model, None, recipe("W4A8", dw_bits=4, calib="random", calib_size=32), progress=False)
    save_quantized(tmp_path / "q.pt", qm)
    ckpt = torch.load(tmp_path / "q.pt", weights_only=True)
    del ckpt["quant_config"]["dw_bits"]
    atomic_save(ckpt, tmp_path / "old.pt")
    back, _ = load_quantized(tmp_path / "old.pt")
    assert back.qcfg.label == "W4A8 dw4" and back.qcfg.depthwise_bits == 4
    assert {layer.w_fq.spec.bits for layer in qlayers(back).values()} == {4}
    assert torch.equal(back(images), qm(images))
    fresh = run_ptq(model, None, recipe("W4A8", calib="random", calib_size=32), progress=False)
    bits = {layer.is_depthwise: layer.w_fq.spec.bits for layer in qlayers(fresh).values()}
    assert bits == {True: 8, False: 4}


def test_save_load_qat_structure(model, images, tmp_path):
    """A QAT simulation saved before to_ptq (BN kept) reloads with its BN and computes the same in eval mode."""
    qm = prepare(model.train(), recipe("W8A8"), qat=True)
    calibrate(qm, [images])
    freeze(qm)
    freeze_bn(qm)
    qm.eval()
    save_quantized(tmp_path / "qat.pt", qm, {"qat": True})
    back, ckpt = load_quantized(tmp_path / "qat.pt")
    assert ckpt["qat"] is True and back.qat
    assert torch.equal(back(images), qm(images))


def test_load_errors(model, tmp_path):
    atomic_save({"format": "mnv2-compress", "kind": "fp32", "model_config": tiny_config().to_dict(),
                 "model": model.state_dict()}, tmp_path / "fp32.pt")
    with pytest.raises(CheckpointError, match="not a quantized checkpoint.*fp32"):
        load_quantized(tmp_path / "fp32.pt")
    qm = prepare(model, recipe("W8A8"))
    with pytest.raises(ValueError, match="not frozen"):
        save_quantized(tmp_path / "q.pt", qm)
    calibrate(qm, [torch.randn(4, 3, 32, 32)])
    freeze(qm)
    save_quantized(tmp_path / "q.pt", qm)
    ckpt = torch.load(tmp_path / "q.pt", weights_only=True)
    ckpt["model_config"]["width_mult"] = 0.5          # a checkpoint whose state belongs to another model
    atomic_save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_quantized(tmp_path / "wrong.pt")
