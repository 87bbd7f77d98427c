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

from .core import choose_qparams, fake_quantize
from .observers import EMAObserver, MinMaxObserver, make_observer
from .spec import QSpec

__all__ = ["FakeQuant", "DynamicFakeQuant", "fused_fake_quantize"]


def fused_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                        axis: int | None = None) -> torch.Tensor:
    """`core.fake_quantize` through PyTorch's fused kernels (one pass forward, one backward, instead of ~12).

    Same arithmetic (round(x * (1 / scale)) half to even, then + zero_point, clamp, the clipped STE mask), and
    bit-identical on float32 (tests/test_quant_qat.py checks it against core, ties included); any other dtype
    takes the reference path, which is what makes it exact there too.
    """
    if x.dtype != torch.float32 or qmax - qmin >= 1 << 16:
        return fake_quantize(x, scale, zero_point, qmin, qmax, axis)
    zp = zero_point.to(torch.int32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)


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
        flat = x.detach().reshape(x.shape[0], -1)
        s, z = choose_qparams(flat.amin(1), flat.amax(1), self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        return fake_quantize(x, s, z, self.spec.qmin, self.spec.qmax, axis=0)

    def extra_repr(self):
        return f"bits={self.spec.bits}, dynamic per sample"
