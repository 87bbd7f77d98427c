"""The lead's quantization core: hand-computed golden vectors (exact), identities with PyTorch's own fake-quant
ops (exact where the conventions coincide), STE gradients, qparams, observers on known distributions, zeros that
stay zero, and clear errors for bad inputs.

Every golden vector uses scales that are powers of two, so x / scale is exact in float32 and each expected code
follows from the comment beside it with no float rounding in between.
"""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from mobilenet import CheckpointError, atomic_save, build_model, load_model
from quantize import recipe
from quantize.config import QuantConfig
from quantize.core import bias_codes, choose_qparams, dequantize, fake_quantize, quantize, quantize_bias
from quantize.fakequant import FakeQuant
from quantize.observers import MinMaxObserver, MSEObserver, PercentileObserver, make_observer
from quantize.qmodel import calibrate, freeze, prepare, qlayers, weight_bytes
from quantize.spec import QSpec, activation_spec, bias_spec, check_bits, target, tflite_weight_axis, weight_spec


# ------------------------------------------------------------------------------------------- golden vectors

def test_golden_8bit_per_tensor_asymmetric():
    # scale 0.25, zero-point -3, range [-128, 127]; q = clamp(round_half_even(x / 0.25) - 3, -128, 127)
    x = torch.tensor([-1.0, -0.375, 0.0, 0.625, 0.875, 2.5, 33.0, 50.0, -40.0])
    # x / s = -4, -1.5, 0, 2.5, 3.5, 10, 132, 200, -160
    # round  = -4, -2 (tie -> even), 0, 2 (tie -> even), 4 (tie -> even), 10, 132, 200, -160
    # + zp   = -7, -5, -3, -1, 1, 7, 129 -> 127, 197 -> 127, -163 -> -128
    q = quantize(x, 0.25, -3, -128, 127)
    assert q.dtype == torch.int32
    assert q.tolist() == [-7, -5, -3, -1, 1, 7, 127, 127, -128]
    # (q - zp) * s = -4, -2, 0, 2, 4, 10, 130, 130, -125 quarter steps
    assert dequantize(q, 0.25, -3).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0, 2.5, 32.5, 32.5, -31.25]
    assert torch.equal(fake_quantize(x, 0.25, -3, -128, 127), dequantize(q, 0.25, -3))


def test_golden_4bit_per_channel_symmetric_narrow():
    # 4-bit narrow symmetric: [-7, 7], zero-point 0; one scale per output channel (axis 0): 0.5 and 2.0
    w = torch.tensor([[0.75, -0.75, 3.25, -5.0],
                      [1.0, 3.0, -15.0, 0.0]])
    # row 0 / 0.5 = 1.5, -1.5, 6.5, -10  -> round: 2, -2, 6 (ties to even), -10 -> clamp -7
    # row 1 / 2.0 = 0.5, 1.5, -7.5, 0    -> round: 0, 2, -8 -> clamp -7, 0
    assert (weight_spec(4).qmin, weight_spec(4).qmax) == (-7, 7)
    q = quantize(w, torch.tensor([0.5, 2.0]), torch.tensor([0, 0]), -7, 7, axis=0)
    assert q.tolist() == [[2, -2, 6, -7], [0, 2, -7, 0]]
    assert dequantize(q, torch.tensor([0.5, 2.0]), torch.tensor([0, 0]), axis=0).tolist() == \
        [[1.0, -1.0, 3.0, -3.5], [0.0, 4.0, -14.0, 0.0]]


def test_golden_8bit_per_channel_axis1_asymmetric():
    # per channel along axis 1 of (1, 2, 3): channel 0 scale 1.0 zp 10, channel 1 scale 0.5 zp -20
    x = torch.tensor([[[0.0, 2.5, -200.0], [1.25, -1.0, 100.0]]])
    # ch 0: round(0, 2.5 -> 2, -200) + 10 = 10, 12, -190 -> -128
    # ch 1: round(2.5 -> 2, -2, 200) - 20 = -18, -22, 180 -> 127
    q = quantize(x, torch.tensor([1.0, 0.5]), torch.tensor([10, -20]), -128, 127, axis=1)
    assert q.tolist() == [[[10, 12, -128], [-18, -22, 127]]]


def test_golden_16bit_per_tensor_symmetric():
    # activation_spec(16): [-32767, 32767], zero-point 0; scale 2^-10
    spec = activation_spec(16)
    assert (spec.qmin, spec.qmax, spec.symmetric) == (-32767, 32767, True)
    s = 2.0 ** -10
    x = torch.tensor([1.0, -1.0, 32767 * s, 40.0, -40.0, 0.5 * s, 1.5 * s, -2.5 * s])
    # x / s = 1024, -1024, 32767, 40960 -> 32767, -40960 -> -32767, 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    assert quantize(x, s, 0, spec.qmin, spec.qmax).tolist() == [1024, -1024, 32767, 32767, -32767, 0, 2, -2]


def test_specs_state_the_litert_target():
    """The table of quantize/spec.py, value by value: the LiteRT int8 / int16 quantization spec."""
    assert (weight_spec(8).qmin, weight_spec(8).qmax, weight_spec(8).symmetric) == (-127, 127, True)
    assert (weight_spec(4).qmin, weight_spec(4).qmax) == (-7, 7)
    assert (activation_spec(8).qmin, activation_spec(8).qmax, activation_spec(8).symmetric) == (-128, 127, False)
    assert (activation_spec(16).qmin, activation_spec(16).qmax, activation_spec(16).symmetric) == (-32767, 32767, True)
    assert [s.storage_dtype for s in (weight_spec(4), weight_spec(8), activation_spec(16))] == \
        [torch.int8, torch.int8, torch.int16]
    assert (bias_spec(8).qmin, bias_spec(8).qmax) == (-(2 ** 31), 2 ** 31 - 1)
    assert (bias_spec(8).storage_bits, bias_spec(16).storage_bits) == (32, 64)
    assert (tflite_weight_axis(False), tflite_weight_axis(True), weight_spec(8).axis) == (0, 3, 0)
    # a configuration's target: integer biases only with quantized weights and static activations
    assert recipe("W8A8").target.bias == bias_spec(8)
    assert recipe("W8A8", granularity="per-tensor").target.weight == weight_spec(8, per_channel=False)
    assert recipe("W8A16").target.bias is None                       # dynamic ranges: no fixed input scale
    assert recipe("W8A32").target.bias is None and recipe("W8A32").target.activation is None
    assert target(8, 16, static=True).bias == bias_spec(16)          # what the static int16 export uses


def test_depthwise_width():
    """Depthwise convs keep 8-bit weights below 8 bits unless dw_bits says otherwise; the label names a width
    other than that default; dw_bits needs integer weights; export refuses what LiteRT cannot run."""
    from export.convert import ExportError, export_kind
    w4 = recipe("W4A8").target
    assert (w4.weight_of(False), w4.weight_of(True)) == (weight_spec(4), weight_spec(8))
    assert recipe("W4A32", granularity="per-tensor").target.weight_of(True) == weight_spec(8, per_channel=False)
    all4 = recipe("W4A8", dw_bits=4)
    assert all4.target.weight_of(True) == weight_spec(4) and all4.label == "W4A8 dw4"
    assert recipe("W8A8").target.weight_of(True) == weight_spec(8) and recipe("W8A8").target.depthwise_weight is None
    assert [recipe(n).label for n in ("W4A8", "W4A32", "W8A16")] == ["W4A8", "W4A32", "W8A16 static"]
    assert recipe("W8A16", dw_bits=4).label == "W8A16 static dw4" and recipe("W8A8", dw_bits=8).label == "W8A8"
    assert recipe("W8A32").depthwise_bits == 8 and recipe("FP32").depthwise_bits is None
    assert recipe("W16A32").depthwise_bits is None
    for bad, match in ((dict(dw_bits=1), "dw_bits should be an integer in \\[2, 16\\] instead of 1"),
                       (dict(w_bits=None, a_bits=None, act_mode="none", dw_bits=8), "needs integer weights")):
        with pytest.raises(ValueError, match=match):
            recipe("W4A8", **bad)
    with pytest.raises(ValueError, match="not fp16 ones"):
        recipe("W16A32", dw_bits=8)
    assert [export_kind(recipe(n, dw_bits=4)) for n in ("W4A8", "W4A32", "W8A8")] == ["int8", "weight-only", "int8"]
    for name in ("W8A8-dynamic", "W8A16"):
        with pytest.raises(ExportError, match="4-bit depthwise weights run only"):
            export_kind(recipe(name, dw_bits=4))
    with pytest.raises(ExportError, match="6-bit depthwise weights"):
        export_kind(recipe("W8A8", dw_bits=6))


# ---------------------------------------------------------------------------------------- choose_qparams

def test_choose_qparams_symmetric_asymmetric():
    # symmetric, narrow 8-bit: amax = max(31.75, 10) = 31.75 = 127 * 0.25 -> scale 0.25, zp 0
    s, z = choose_qparams(torch.tensor(-31.75), torch.tensor(10.0), -127, 127, symmetric=True)
    assert (float(s), int(z)) == (0.25, 0)
    # asymmetric 8-bit: (62.75 - (-1)) / 255 = 0.25; zp = -128 - round(-1 / 0.25) = -124
    s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(62.75), -128, 127, symmetric=False)
    assert (float(s), int(z)) == (0.25, -124)
    # a range that excludes 0 is widened to hold it: [2, 63.75] -> [0, 63.75], zp = qmin
    s, z = choose_qparams(torch.tensor(2.0), torch.tensor(63.75), -128, 127, symmetric=False)
    assert (float(s), int(z)) == (0.25, -128)
    # per channel: elementwise
    s, z = choose_qparams(torch.tensor([-1.75, 0.0]), torch.tensor([0.5, 3.5]), -7, 7, symmetric=True)
    assert s.tolist() == [0.25, 0.5] and z.tolist() == [0, 0]
    # a pruned-away channel among others takes the layer's largest scale, so its bias codes stay in int32:
    # b = 3.0 at s_in = 0.05 is 3.0 / (0.05 * 0.5) = 120, where the floor scale would give 5e8 (past 2^31 / 4)
    s, z = choose_qparams(torch.tensor([-1.75, 0.0, 0.0]), torch.tensor([0.5, 3.5, 0.0]), -7, 7, symmetric=True)
    assert s.tolist() == [0.25, 0.5, 0.5] and z.tolist() == [0, 0, 0]
    assert bias_codes(torch.tensor([0.0, 0.0, 3.0]), 0.05, s).tolist() == [0, 0, 120]
    # all-zero range: a tiny positive scale, and 0 still maps to an exact code
    s, z = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), -128, 127, symmetric=False)
    assert float(s) > 0 and float(fake_quantize(torch.zeros(3), s, z, -128, 127).abs().max()) == 0.0
    with pytest.raises(ValueError, match="must not exceed"):
        choose_qparams(torch.tensor(1.0), torch.tensor(0.0), -128, 127, symmetric=False)


def test_narrow_range_never_uses_minus_128():
    w = torch.linspace(-3, 3, 101)
    spec = weight_spec(8)
    s, z = choose_qparams(w.min(), w.max(), spec.qmin, spec.qmax, symmetric=True)
    q = quantize(w, s, z, -127, 127)
    assert int(q.min()) == -127 and int(q.max()) == 127


# ------------------------------------------------------------------------- identities with PyTorch's ops

def _far_from_ties(x, scale, axis=None):
    """Where x / scale is not within 1e-3 of a .5: there torch's round(x/s + zp) equals our round(x/s) + zp.
    (At an exact tie the two differ for odd zero-points, since round-half-even does not commute with +odd.)"""
    s = scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(x.dim())])
    frac = (x / s) - torch.floor(x / s)
    return (frac - 0.5).abs() > 1e-3


def test_equals_torch_fake_quantize_per_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, generator=g) * 3
    for zp in (0, 7, -128):
        ours = fake_quantize(x, 0.05, zp, -128, 127)
        ref = torch.fake_quantize_per_tensor_affine(x, 0.05, zp, -128, 127)
        keep = _far_from_ties(x, torch.tensor(0.05))
        assert torch.equal(ours[keep], ref[keep])   # exact: same arithmetic away from ties
        if zp == 0:
            assert torch.equal(ours, ref)           # zp 0: identical conventions everywhere


def test_equals_torch_fake_quantize_per_channel_and_gradients():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 5, 3, 3, generator=g) * 2).requires_grad_(True)
    scale = torch.rand(6, generator=g) * 0.05 + 0.01
    zp = torch.zeros(6, dtype=torch.int32)
    ours = fake_quantize(x, scale, zp, -7, 7, axis=0)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, -7, 7)
    assert torch.equal(ours, ref)
    g1, = torch.autograd.grad(ours.sum(), x)
    g2, = torch.autograd.grad(ref.sum(), x)
    assert torch.equal(g1, g2)                      # the same clipped straight-through estimator


def test_ste_gradient_inside_one_outside_zero():
    # scale 1, zp 0, range [-8, 7]: codes -9 and 8 fall outside
    x = torch.tensor([-9.0, -8.0, -0.4, 0.0, 3.6, 7.0, 8.0, 100.0], requires_grad=True)
    out = fake_quantize(x, 1.0, 0, -8, 7)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_quantize_bias_int32_at_input_times_weight_scale():
    # s_in 0.5, s_w [0.25, 0.125] -> bias scales 0.125, 0.0625; 1.0 / 0.125 = 8, 0.1 / 0.0625 = 1.6 -> 2
    b = quantize_bias(torch.tensor([1.0, 0.1]), 0.5, torch.tensor([0.25, 0.125]))
    assert b.tolist() == [1.0, 0.125]
    q = bias_codes(torch.tensor([1.0, 0.1]), 0.5, torch.tensor([0.25, 0.125]))
    assert q.dtype == torch.int64 and q.tolist() == [8, 2]
    # clamped to int32: +-1e9 / 0.0625 = +-1.6e10 -> -2^31, 2^31 - 1 (exactly: the clamp is not in float32)
    big = bias_codes(torch.tensor([-1e9, 1e9]), 0.5, torch.tensor([0.125, 0.125]))
    assert big.tolist() == [-(2 ** 31), 2 ** 31 - 1]


# ---------------------------------------------------------------------------------------------- observers

def test_minmax_observer_uniform_exact():
    x = torch.rand(4, 1000, generator=torch.Generator().manual_seed(2)) * 5 - 1
    obs = MinMaxObserver()
    for part in x:
        obs(part)
    assert float(obs.min_val) == float(x.min()) and float(obs.max_val) == float(x.max())
    pc = MinMaxObserver(axis=0)
    pc(x)
    assert torch.equal(pc.min_val, x.amin(1)) and torch.equal(pc.max_val, x.amax(1))


def test_percentile_observer_gaussian_quantile():
    # the 99.9th percentile of N(0, 1) is ndtri(0.999) = 3.0902; the standard error of a sample quantile over
    # n = 10^6 draws is sqrt(p (1 - p) / n) / pdf(q) = 0.0094, so 0.05 is more than 5 standard errors
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(3))
    obs = PercentileObserver(percentile=99.9)
    obs(x)
    q = float(torch.special.ndtri(torch.tensor(0.999)))
    assert abs(float(obs.max_val) - q) < 0.05 and abs(float(obs.min_val) + q) < 0.05


def test_mse_observer_clips_heavy_tails():
    # Student-t with 2 degrees of freedom: a few huge values; clipping them lowers the total error. At 8 bits the
    # optimum clips only a little (the tail has infinite variance), so the test asks for a strict clip, no more
    g = torch.Generator().manual_seed(4)
    t = torch.randn(20000, generator=g) / torch.sqrt(torch.distributions.Chi2(2.0).sample((20000,)) / 2)
    mse, mm = MSEObserver(), MinMaxObserver()
    mse(t)
    mm(t)
    s_mse, _ = mse.qparams(-128, 127, False)
    s_mm, _ = mm.qparams(-128, 127, False)
    assert float(s_mse) < float(s_mm)
    err = lambda s, z: float(((fake_quantize(t, s, z, -128, 127) - t) ** 2).mean())  # noqa: E731
    assert err(*mse.qparams(-128, 127, False)) < err(*mm.qparams(-128, 127, False))


def test_observer_without_data_and_unknown_name():
    with pytest.raises(RuntimeError, match="calibration"):
        MinMaxObserver().qparams(-128, 127, False)
    with pytest.raises(ValueError, match="'median'"):
        make_observer("median")


def test_per_channel_observer_state_reloads():
    """A per-channel observer's range is () before data and (C,) after; a fresh module loads the saved state."""
    fq = FakeQuant(weight_spec(8), channels=3)
    fq(torch.randn(3, 4))
    fq.freeze()
    fresh = FakeQuant(weight_spec(8), channels=3)
    fresh.load_state_dict(fq.state_dict())
    assert torch.equal(fresh.observer.max_val, fq.observer.max_val) and fresh.frozen


# ----------------------------------------------------------------------------------------- zeros stay zero

@pytest.mark.parametrize("bits,per_channel", [(8, True), (8, False), (4, True), (4, False)])
def test_zero_weight_quantizes_to_exact_zero(bits, per_channel):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 4, 3, 3, generator=g) * (torch.rand(8, 4, 3, 3, generator=g) > 0.6)
    spec = weight_spec(bits, per_channel)
    fq = FakeQuant(spec, channels=8)
    fq.fake_quant = True
    fq(w)
    fq.freeze()
    out = fq(w)
    assert torch.all(out[w == 0] == 0)
    assert torch.all(quantize(w, fq.scale, fq.zero_point, spec.qmin, spec.qmax, fq.axis)[w == 0] == 0)


def test_pruned_model_stays_pruned_after_ptq_freeze(tiny_model):
    with torch.no_grad():
        for m in tiny_model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_((torch.rand_like(m.weight) > 0.5).float())
    qm = prepare(tiny_model, recipe("W4A8"))
    calibrate(qm, [torch.randn(8, 3, 32, 32)])
    freeze(qm)
    for name, layer in qlayers(qm).items():
        w, _ = layer.folded_weight_bias()
        assert torch.all(layer.quant_weight(w)[w == 0] == 0), name


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("bits", [1, 17, 0, 8.0, True])
def test_bad_bit_widths(bits):
    with pytest.raises(ValueError, match=repr(bits).replace(".", r"\.")):
        check_bits(bits)
    with pytest.raises(ValueError, match="w_bits"):
        QuantConfig(w_bits=bits)
    with pytest.raises(ValueError):
        QSpec(bits, True, True, True)


def test_unknown_config_and_granularity():
    with pytest.raises(ValueError, match="'W3A3'.*W8A8"):
        recipe("W3A3")
    with pytest.raises(ValueError, match="'per-row'"):
        QuantConfig(granularity="per-row")
    with pytest.raises(ValueError, match="'imagenet'"):
        QuantConfig(calib="imagenet")
    assert recipe("w8a8", granularity="per-tensor").per_channel is False


def test_fp16_weights_are_the_half_rounded_folded_weights(tiny_model):
    """W16A32 (fp16): the simulation is the float model whose folded weights are rounded to IEEE half, exactly
    (a half value is exact in float32, so the file's DEQUANTIZE gives these weights back bit for bit); its
    weights cost 16 bits; fp16 is only a weight format of float-activation models."""
    from mobilenet.fold import fold_model
    q = recipe("W16A32")
    assert q.fp16_weights and q.label == "W16A32 (fp16)" and q.target.weight is None
    qm = freeze(prepare(tiny_model, q))
    ref = fold_model(tiny_model).eval()
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                mod.weight.copy_(mod.weight.half().float())
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        assert torch.equal(qm(x), ref(x))
        assert not torch.equal(qm(x), fold_model(tiny_model).eval()(x))     # the rounding is really there
    n = sum(layer.op.weight.numel() for layer in qlayers(qm).values())
    assert weight_bytes(qm) == (16 * n + 32 * sum(layer.op.weight.shape[0] for layer in qlayers(qm).values())) // 8
    with pytest.raises(ValueError, match="fp16 weights are 16 bits with float activations"):
        QuantConfig(w_bits=16, a_bits=8, w_format="fp16")
    with pytest.raises(ValueError, match="'bf16'"):
        QuantConfig(w_format="bf16")


def test_checkpoint_of_another_model(tmp_path):
    small = build_model(tiny_config())
    atomic_save({"format": "mnv2-compress", "kind": "fp32", "model_config": tiny_config().to_dict(),
                 "model": small.state_dict()}, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="width_mult"):
        load_model(tmp_path / "tiny.pt", width_mult=1.0)
    atomic_save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path / "r.pt")
    # a state_dict whose shapes belong to another width
    cfg = tiny_config().to_dict()
    atomic_save({"format": "mnv2-compress", "kind": "fp32", "model_config": {**cfg, "width_mult": 0.5},
                 "model": small.state_dict()}, tmp_path / "mislabelled.pt")
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "mislabelled.pt")
