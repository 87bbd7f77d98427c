"""Fake-quantization modules: state (observer, scale, zero-point, flags) around the pure functions of core.

    flag               calibration   QAT (early)   QAT (observers frozen) / PTQ frozen
    observe            on            on            off
    fake_quant         off           on            on

While observing with fake_quant on, the qparams are recomputed from the observer at every forward (as
torch.ao's FakeQuantize does); once frozen they are fixed buffers and the forward is a pure function of them.
"""
from __future__ import annotations

import torch
from torch import nn

from .core import dynamic_qparams, fake_quantize
from .observers import EMAObserver, MinMaxObserver, make_observer
from .spec import QSpec

__all__ = ["FakeQuant", "DynamicFakeQuant", "fused_fake_quantize"]


class _FakeQuantSTE(torch.autograd.Function):
    """dequantize(quantize(x)) with the clipped straight-through estimator, in five vectorized passes forward and
    one backward. lo / hi are the code bounds less the zero-point (numbers, or tensors per channel)."""

    @staticmethod
    def forward(ctx, x, inv_scale, scale, lo, hi):
        r = torch.mul(x, inv_scale).round_()        # round half to even, as nearbyint
        inside = r >= lo
        inside &= r <= hi
        ctx.save_for_backward(inside)
        return r.clamp_(lo, hi).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class _ReLU6FakeQuantInplace(torch.autograd.Function):
    """[ReLU6 clamp, then] per-tensor fake quantization, computed in place in the caller's fresh tensor: no
    activation-sized float allocation (on this CPU, allocations above glibc's 32 MB mmap threshold cost page
    faults on every step) and as few passes as the exact arithmetic allows.

    Unfused, ReLU6 + fake quant is  r = round(clamp(x, 0, 6) * inv); out = clamp(r, lo, hi) * s  with the
    gradient mask (0 < x < 6) & (lo <= r <= hi). Because x -> round(x * inv) is monotone (inv > 0), with
    R6 = round(6 * inv) and r = round(x * inv) of the unclamped x:
        out  = clamp(r, max(lo, 0), min(hi, R6)) * s                            (one clamp instead of two)
        mask = (x > 0 if lo <= 0 else r >= lo) & (r <= hi if hi < R6 else x < 6)
    since x > 0 implies r >= 0 >= lo, r >= lo > 0 implies x > 0, r <= hi < R6 implies x < 6, and x < 6
    implies r <= R6 <= hi. Values and gradients are bit-identical to the unfused path (tested)."""

    @staticmethod
    def forward(ctx, x, inv_scale, scale, lo, hi, relu6):
        grad = ctx.needs_input_grad[0]
        if relu6:
            r6 = float(torch.round(torch.mul(inv_scale, 6.0)))
            low_x, high_x = grad and lo <= 0, grad and hi >= r6
            a = (x > 0) if low_x else None      # conditions that need x itself come before x is overwritten
            b = (x < 6) if high_x else None
            lo, hi = max(lo, 0.0), min(hi, r6)
        x.mul_(inv_scale).round_()              # round half to even, as nearbyint
        if grad:
            if not relu6:
                a, b = (x >= lo), (x <= hi)
            else:
                a = a if low_x else (x >= lo)
                b = b if high_x else (x <= hi)
            ctx.save_for_backward(a.logical_and_(b))
        ctx.mark_dirty(x)
        return x.clamp_(lo, hi).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None


def _qparams_args(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None, dim: int):
    """(1 / scale, scale, qmin - zp, qmax - zp), shaped to broadcast against a tensor of `dim` dimensions."""
    if axis is None:
        s = scale.reshape(())
        zp = float(zero_point)
        return 1.0 / s, s, qmin - zp, qmax - zp
    shape = [1] * dim
    shape[axis] = -1
    s = scale.reshape(shape).to(torch.float32)
    zp = zero_point.reshape(shape).to(torch.float32)
    return 1.0 / s, s, qmin - zp, qmax - zp


def fused_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                        axis: int | None = None) -> torch.Tensor:
    """`core.fake_quantize`, fast: one autograd node of in-place vectorized passes instead of ~12 separate ones.

    Same arithmetic: r = round(x * (1 / scale)) half to even; out = (clamp(r + zp, qmin, qmax) - zp) * scale,
    computed as clamp(r, qmin - zp, qmax - zp) * scale (the same integers, exact in float32); gradient 1 where
    qmin <= r + zp <= qmax, else 0. Bit-identical to core on float32 (tests/test_quant_qat.py checks values
    and gradients, ties and clipped codes included); any other dtype takes the reference path.

    Why not torch.fake_quantize_per_tensor_affine: on this CPU build its kernel is scalar (~7 ns per element,
    44 ms for one (64, 96, 32, 32) activation, where these passes take ~17 ms): it made a QAT step 1.7x an
    FP32 step on its own (benchmarks/qat_step.py --profile).
    """
    if x.dtype != torch.float32 or qmax - qmin >= 1 << 16:
        return fake_quantize(x, scale, zero_point, qmin, qmax, axis)
    return _FakeQuantSTE.apply(x, *_qparams_args(scale, zero_point, qmin, qmax, axis, x.dim()))


def _order_free_view(x: torch.Tensor) -> torch.Tensor:
    """A channels_last activation as its dense NHWC view, so a per-tensor min/max observer's reshape(-1) does
    not copy it (min and max do not depend on the order of the elements)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)
    return x


class FakeQuant(nn.Module):
    def __init__(self, spec: QSpec, observer: str = "minmax", channels: int | None = None):
        super().__init__()
        if spec.per_channel and not channels:
            raise ValueError("a per-channel FakeQuant needs the channel count")
        self.spec = spec
        self.observer = make_observer(observer, axis=spec.axis if spec.per_channel else None)
        if hasattr(self.observer, "bits"):  # the MSE observer searches with the real code range
            self.observer.bits, self.observer.symmetric = spec.bits, spec.symmetric
        shape = (channels,) if spec.per_channel else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("frozen_flag", torch.tensor(False))
        self.observe = True
        self.fake_quant = False

    @property
    def frozen(self) -> bool:
        return bool(self.frozen_flag)

    @property
    def axis(self) -> int | None:
        return self.spec.axis if self.spec.per_channel else None

    def compute_qparams(self):
        s, z = self.observer.qparams(self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        self.scale.copy_(s.reshape(self.scale.shape))
        self.zero_point.copy_(z.reshape(self.zero_point.shape))

    @torch.no_grad()
    def freeze(self):
        """Fix scale/zero-point from what the observer saw; from now on observe=False, fake_quant=True."""
        if not self.frozen:
            self.compute_qparams()
        self.frozen_flag.fill_(True)
        self.observe, self.fake_quant = False, True

    def set_qparams(self, scale, zero_point):
        """Install given parameters (AdaRound, cross-layer equalization, loading) and freeze."""
        with torch.no_grad():
            self.scale.copy_(torch.as_tensor(scale, dtype=torch.float32).reshape(self.scale.shape))
            self.zero_point.copy_(torch.as_tensor(zero_point).reshape(self.zero_point.shape))
        self.frozen_flag.fill_(True)
        self.observe, self.fake_quant = False, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe and not self.frozen:
            order_free = self.axis is None and type(self.observer) in (MinMaxObserver, EMAObserver)
            self.observer(_order_free_view(x) if order_free else x)
            if self.fake_quant:
                with torch.no_grad():
                    self.compute_qparams()
        if not self.fake_quant:
            return x
        return fused_fake_quantize(x, self.scale, self.zero_point, self.spec.qmin, self.spec.qmax, self.axis)

    def forward_inplace(self, x: torch.Tensor, relu6: bool = False) -> torch.Tensor:
        """forward(relu6 ? hardtanh(x, 0, 6) : x), computed in place in `x`, which must be a fresh intermediate
        that nothing else reads (a conv / BN / ADD output: their backward needs their inputs, not this tensor;
        autograd raises if that is ever not so). Values and gradients are bit-identical to the unfused path
        (tests/test_quant_qat.py). The observer sees clamp(aminmax(x), 0, 6) for ReLU6, which is
        aminmax(hardtanh(x)) exactly (a clamp is monotone); observers that need the whole tensor (percentile,
        MSE), per-channel activations and other dtypes take the unfused path."""
        if x.dtype != torch.float32 or self.axis is not None or (
                self.observe and not self.frozen and type(self.observer) not in (MinMaxObserver, EMAObserver)):
            return self(torch.nn.functional.hardtanh(x, 0.0, 6.0) if relu6 else x)
        if self.observe and not self.frozen:
            lo, hi = torch.aminmax(_order_free_view(x.detach()).reshape(-1))
            if relu6:
                lo, hi = lo.clamp(0.0, 6.0), hi.clamp(0.0, 6.0)
            self.observer.update(lo, hi, x)
            if self.fake_quant:
                with torch.no_grad():
                    self.compute_qparams()
        if not self.fake_quant:
            return torch.nn.functional.hardtanh(x, 0.0, 6.0, inplace=True) if relu6 else x
        inv, s, lo, hi = _qparams_args(self.scale, self.zero_point, self.spec.qmin, self.spec.qmax, None, x.dim())
        if relu6 and (lo > float(torch.round(torch.mul(inv, 6.0))) or hi < 0):  # a range outside [0, 6]
            return self(torch.nn.functional.hardtanh(x, 0.0, 6.0))
        return _ReLU6FakeQuantInplace.apply(x, inv, s, lo, hi, relu6)

    def qparams_dict(self) -> dict:
        scale = self.scale.tolist() if self.spec.per_channel else float(self.scale)
        zp = self.zero_point.tolist() if self.spec.per_channel else int(self.zero_point)
        return {"scale": scale, "zero_point": zp, "qmin": self.spec.qmin, "qmax": self.spec.qmax,
                "bits": self.spec.bits, "axis": self.axis}

    def extra_repr(self):
        return f"bits={self.spec.bits}, {self.spec.granularity}, symmetric={self.spec.symmetric}, frozen={self.frozen}"


class DynamicFakeQuant(nn.Module):
    """Activation ranges taken at run time, per sample (each image is its own batch-1 inference)."""

    def __init__(self, spec: QSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = dynamic_qparams(x, self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        return fake_quantize(x, s, z, self.spec.qmin, self.spec.qmax, axis=0)

    def extra_repr(self):
        return f"bits={self.spec.bits}, dynamic per sample"
