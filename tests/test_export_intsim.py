"""The integer simulation (export/intsim.py, export/kernels.py) against the real ai_edge_litert interpreter, bit
for bit.

One tiny W8A8 model (width 0.25, 32x32, BN statistics from real images) is exported twice: with per-channel
weights by `python -m export` (the file the export tests check too) and with per-tensor weights here; 256 real
CIFAR-10 test images go through the file and through `int_outputs`, with XNNPACK (the default CPU path) and with
the builtin kernels (BUILTIN_WITHOUT_DEFAULT_DELEGATES: TFLite's own int8 kernels, ruy and gemmlowp rounding):
every output code equal.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config


# ------------------------------------------------------------------------------------ golden vectors

def test_requant_golden_round_half_even():
    """fp32 requantization of XNNPACK's qs8 kernels: clamp(round_half_even((float) acc * scale), min - zp,
    max - zp) + zp. scale 0.25 (exact in float32), zp -3, no activation (bounds -128, 127):

        acc      acc * 0.25   rounded (half even)   + zp    note
        10       2.5          2                     -1      tie -> even (down)
        14       3.5          4                      1      tie -> even (up)
        -6      -1.5         -2                     -5      tie -> even (away)
        -10     -2.5         -2                     -5      tie -> even (toward zero)
        3        0.75         1                     -2
        7        1.75         2                     -1
        1000     250          clamp 130             127     127 - zp = 130
        -1000   -250          clamp -125           -128     -128 - zp = -125
    """
    from export.kernels import requant_fp32
    acc = torch.tensor([10, 14, -6, -10, 3, 7, 1000, -1000])
    got = requant_fp32(acc, np.float32(0.25), -3)
    assert got.tolist() == [-1, 1, -5, -5, -2, -1, 127, -128]
    # fused ReLU6 bounds [zp, 127] with zp -128: -40 * 0.25 = -10 is cut at 0 (-> -128); 6 * 0.25 = 1.5 -> 2 -> -126
    assert requant_fp32(torch.tensor([-40, 6]), np.float32(0.25), -128, -128, 127).tolist() == [-128, -126]


def test_requant_golden_per_channel_scale():
    """Per-channel: scale_c = (float) ((float) (s_in * s_w[c]) / s_out) (convolution-nhwc.c), channel dim 1.

        s_in 0.5, s_w (0.25, 0.125), s_out 0.5  ->  scales (0.25, 0.125), all exact in float32
        channel 0: acc 6 -> 1.5 -> 2;  acc -2 -> -0.5 -> -0 (half even);  + zp 1 -> 3, 1
        channel 1: acc 12 -> 1.5 -> 2;  acc 20 -> 2.5 -> 2;              + zp 1 -> 3, 3
    """
    from export.kernels import conv_scale_xnnpack, requant_fp32
    s = conv_scale_xnnpack(0.5, [0.25, 0.125], 0.5)
    assert s.dtype == np.float32 and s.tolist() == [0.25, 0.125]
    acc = torch.tensor([[[6, -2]], [[12, 20]]]).permute(1, 0, 2)  # (N=1, C=2, 2)
    assert requant_fp32(acc, s, 1).tolist() == [[[3, 1], [3, 3]]]


def test_scale_is_float32_product_then_quotient():
    """input_scale * kernel_scale / output_scale in float32, left to right (not in double)."""
    from export.kernels import conv_scale_xnnpack
    s_in, s_w, s_out = np.float32(0.0173), np.float32(0.00291), np.float32(0.0457)
    want = np.float32(np.float32(s_in * s_w) / s_out)
    assert conv_scale_xnnpack(s_in, [s_w], s_out)[0] == want


def test_relu6_bounds_and_add_golden():
    """xnn_qs8_quantize(v, s, zp) = lrintf(clamp(v / s + (float) zp, -128, 127)); ADD: the 21-bit multipliers.

        ReLU6, s_out 0.0235294, zp -128: 6 / s = 255.0001 -> +zp 127.0001 -> 127; 0 -> -128
        ADD s_a 0.1 zp_a 5, s_b 0.2 zp_b -7, s_out 0.25 zp 2:
            a/out 0.4, b/out 0.8 -> exponent of 0.8 is -1 -> shift 21
            a_mul = lrint(0.4 * 2^21) = 838861, b_mul = lrint(0.8 * 2^21) = 1677722
            bias  = 2^20 - 838861 * 5 - 1677722 * (-7) = 8598325
            a 10, b 0: (8598325 + 8388610) >> 21 = 8 -> +2 = 10      ((10-5)*0.4 + 7*0.8 = 7.6)
            a 0,  b 3: (8598325 + 5033166) >> 21 = 6 -> +2 = 8       (-2 + 8 = 6)
    """
    from export.kernels import add_params_xnnpack, add_xnnpack, qs8_quantize
    assert qs8_quantize(6.0, 0.0235294, -128) == 127 and qs8_quantize(0.0, 0.0235294, -128) == -128
    assert add_params_xnnpack(0.1, 5, 0.2, -7, 0.25) == {"a_mul": 838861, "b_mul": 1677722, "shift": 21,
                                                        "bias": 8598325}
    out = add_xnnpack(torch.tensor([10, 0, -128, 127]), 5, 0.1, torch.tensor([0, 3, -128, 127]), -7, 0.2, 0.25, 2)
    assert out.tolist() == [10, 8, -128, 127]


# ------------------------------------------------------------------------------------ against the file

@pytest.fixture(scope="module")
def exported(cifar_small, tiny_w8a8):
    """{granularity: (QMobileNet, tflite bytes)} for one tiny W8A8 model: per-channel weights as `python -m export`
    wrote them (the session's `tiny_w8a8`), per-tensor converted here from the same model and calibration."""
    from export.convert import convert
    from quantize import calibrate, freeze, prepare, recipe
    qm = prepare(tiny_w8a8["model"], recipe("W8A8", granularity="per-tensor"))
    calibrate(qm, tiny_w8a8["calib"])
    freeze(qm)
    return {"per-channel": (tiny_w8a8["qm"], tiny_w8a8["tflite"].read_bytes()),
            "per-tensor": (qm, convert(qm, "int8")[0])}


@pytest.fixture(scope="module")
def test_images(cifar_small):
    from mobilenet.data import BatchLoader
    return next(iter(BatchLoader(cifar_small.test, len(cifar_small.test))))


@pytest.mark.parametrize("gran", ["per-channel", "per-tensor"])
@pytest.mark.parametrize("kernels", ["xnnpack", "builtin"])
def test_int_sim_equals_interpreter_exactly(exported, test_images, gran, kernels):
    from export.intsim import int_outputs
    from export.validate import RESOLVERS, run_file, sim_outputs
    from ai_edge_litert.interpreter import OpResolverType
    qm, data = exported[gran]
    x, _ = test_images
    if kernels == "builtin":  # TFLite's own kernels, no delegate: the arithmetic export/kernels.py calls builtin
        assert RESOLVERS["builtin"] == OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    got = run_file(data, qm, x, kernels=kernels)
    ours = int_outputs(qm, x, kernels)
    assert got.shape == ours.shape == (len(x), 10)
    assert torch.equal(ours, got), f"{int((ours != got).sum())} outputs differ, max {(ours - got).abs().max()}"
    # the float fake-quant simulation is what drifts (reported beside, never the reference)
    assert (sim_outputs(qm, x, True) - got).abs().max() <= 2


def test_builtin_and_xnnpack_arithmetic_differ(exported, test_images):
    """The two kernel sets round differently (fp32 requantization against Q31 fixed point), so matching each
    file run bit for bit says something about each: on these images the two simulations part somewhere."""
    from export.intsim import int_outputs
    qm, _ = exported["per-tensor"]
    x, _ = test_images
    assert not torch.equal(int_outputs(qm, x, "xnnpack"), int_outputs(qm, x, "builtin"))


def test_validation_reports_both_references(exported, test_images):
    """_validate gates on the integer simulation and reports the float simulation beside it."""
    from export.pipeline import ExportConfig, _validate
    qm, data = exported["per-channel"]
    x, y = test_images
    v = _validate(data, qm, "int8", ExportConfig(), x[:24], y[:24])
    assert v["passed"] and v["gate"]["reference"] == "integer simulation"
    xr = v["runs"]["xnnpack"]
    assert xr["max_lsb"] == 0 and xr["exact_outputs"] == 1.0
    assert "vs_float_sim" in xr and xr["vs_float_sim"]["n"] == 24
    assert "builtin" in v["runs"] and "vs_float_sim" in v["runs"]["builtin"]


def test_reported_only_checks_use_the_first_images(exported, test_images):
    """The gate runs every image; builtin kernels and the float simulation only the first `reported_images`."""
    from export.pipeline import ExportConfig, _validate
    qm, data = exported["per-channel"]
    x, y = test_images
    v = _validate(data, qm, "int8", ExportConfig(reported_images=10), x[:24], y[:24])
    assert v["passed"]
    assert v["runs"]["xnnpack"]["n"] == 24 and v["runs"]["xnnpack"]["vs_float_sim"]["n"] == 10
    assert v["runs"]["builtin"]["n"] == 10


@pytest.mark.parametrize("cin", [16, 960])
def test_int_matmul_fast_path_is_exact(cin):
    """The float32 accumulation of int_matmul equals int64 arithmetic exactly, including layers whose worst case
    exceeds 2^24 (cin 960 at |x| 255, |w| 127: 31.1e6 > 16.8e6) and are split into chunks along cin."""
    from torch import nn
    from export.intsim import int_matmul
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-255, 256, (2, cin, 5, 5), generator=g)
    x[0, :, 0, 0] = 255                     # the worst case: every input at its extreme, weights of one sign
    w = torch.randint(-127, 128, (24, cin, 1, 1), generator=g)
    w[0] = 127
    ref = torch.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])                       # int64, exact
    got = int_matmul(x, w, nn.Conv2d(cin, 24, 1, bias=False))
    assert torch.equal(got.to(torch.int64), ref) and int(ref.abs().max()) == 255 * 127 * cin
    lin = int_matmul(x[:, :, 0, 0], w[:, :, 0, 0], nn.Linear(cin, 24, bias=False))
    assert torch.equal(lin.to(torch.int64), x[:, :, 0, 0] @ w[:, :, 0, 0].T)
    dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
    wd = torch.randint(-127, 128, (cin, 1, 3, 3), generator=g)
    assert torch.equal(int_matmul(x, wd, dw), int_matmul(x, wd, dw, exact64=True))


def test_refuses_what_it_does_not_model(exported):
    from export.intsim import int_outputs
    from mobilenet import build_model
    from quantize import prepare, recipe
    qm = prepare(build_model(tiny_config()).eval(), recipe("W8A16"))
    with pytest.raises(ValueError):
        int_outputs(qm, torch.zeros(1, 3, 32, 32))
