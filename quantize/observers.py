"""Observers: they watch tensors during calibration and propose a range. State only; the arithmetic is in core.

    name         range proposed
    minmax       running min / max over every batch seen
    ema          moving average of per-batch min / max (momentum `averaging_constant`)
    percentile   mean over batches of the per-batch `percentile` / (100 - percentile) quantiles
    mse          the min/max of `minmax`, shrunk by the factor in a grid that minimizes the fake-quant MSE of
                 the last batch seen (weights: the tensor itself)

Each works per tensor (axis=None) or per channel (axis=k).
"""
from __future__ import annotations

import torch
from torch import nn

from .core import choose_qparams, fake_quantize

__all__ = ["Observer", "MinMaxObserver", "EMAObserver", "PercentileObserver", "MSEObserver", "make_observer",
           "OBSERVERS"]


def _reduce(x: torch.Tensor, axis: int | None, fn) -> torch.Tensor:
    if axis is None:
        return fn(x.reshape(-1))
    dims = [d for d in range(x.dim()) if d != axis]
    return fn(x.permute(axis, *dims).reshape(x.shape[axis], -1), dim=1)


class Observer(nn.Module):
    def __init__(self, axis: int | None = None):
        super().__init__()
        self.axis = axis
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def reset(self):
        self.min_val = torch.tensor(float("inf"), device=self.min_val.device)
        self.max_val = torch.tensor(float("-inf"), device=self.max_val.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the range is () until data is seen, (C,) for a per-channel observer afterwards: take the saved shape
        for name in ("min_val", "max_val"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def initialized(self) -> bool:
        return bool(torch.isfinite(self.min_val).all())

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        return tuple(_reduce(x, self.axis, torch.aminmax))  # one pass for both (the same values as amin, amax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.batch_range(x)
        self.update(lo, hi, x)
        return x

    def update(self, lo, hi, x):
        if not self.initialized:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def qparams(self, qmin: int, qmax: int, symmetric: bool):
        if not self.initialized:
            raise RuntimeError("observer has seen no data: run calibration before freezing")
        return choose_qparams(self.min_val, self.max_val, qmin, qmax, symmetric)


class MinMaxObserver(Observer):
    pass


class EMAObserver(Observer):
    def __init__(self, axis: int | None = None, averaging_constant: float = 0.01):
        super().__init__(axis)
        self.c = averaging_constant

    def update(self, lo, hi, x):
        if not self.initialized:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self.min_val = self.min_val + self.c * (lo - self.min_val)
            self.max_val = self.max_val + self.c * (hi - self.max_val)


class PercentileObserver(Observer):
    def __init__(self, axis: int | None = None, percentile: float = 99.99, max_samples: int = 1 << 20):
        super().__init__(axis)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile should be in (50, 100] instead of {percentile}")
        self.q = percentile / 100.0
        self.max_samples = max_samples
        self.register_buffer("n", torch.tensor(0))

    def batch_range(self, x):
        x = x.detach().float()
        if self.axis is None:
            t = x.reshape(-1)
            if t.numel() > self.max_samples:  # torch.quantile's input limit: a fixed stride keeps it deterministic
                t = t[:: -(-t.numel() // self.max_samples)]
            return torch.quantile(t, 1 - self.q), torch.quantile(t, self.q)
        dims = [d for d in range(x.dim()) if d != self.axis]
        t = x.permute(self.axis, *dims).reshape(x.shape[self.axis], -1)  # (C, M)
        return torch.quantile(t, 1 - self.q, dim=1), torch.quantile(t, self.q, dim=1)

    def update(self, lo, hi, x):
        n = int(self.n)
        if n == 0:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:  # running mean of the per-batch quantiles
            self.min_val = self.min_val + (lo - self.min_val) / (n + 1)
            self.max_val = self.max_val + (hi - self.max_val) / (n + 1)
        self.n += 1


class MSEObserver(Observer):
    """Min-max, then a search over shrink factors for the clipping range with the least fake-quant MSE."""

    def __init__(self, axis: int | None = None, grid: int = 40, bits: int = 8, symmetric: bool = False,
                 narrow_range: bool = False):
        super().__init__(axis)
        self.grid, self.bits, self.symmetric, self.narrow = grid, bits, symmetric, narrow_range
        self.last = None
        self.max_samples = 1 << 20  # elements kept from the last batch for the search (per tensor)

    def update(self, lo, hi, x):
        super().update(lo, hi, x)
        x = x.detach().float()
        if self.axis is None and x.numel() > self.max_samples:  # a fixed stride over all elements, deterministic
            x = x.reshape(-1)[:: -(-x.numel() // self.max_samples)]
        self.last = x

    def qparams(self, qmin: int, qmax: int, symmetric: bool):
        if not self.initialized:
            raise RuntimeError("observer has seen no data: run calibration before freezing")
        x = self.last
        best_err, best = None, None
        for i in range(self.grid):
            f = 1.0 - i / (self.grid * 1.25)  # shrink factors 1.0 .. 0.2
            s, z = choose_qparams(self.min_val * f, self.max_val * f, qmin, qmax, symmetric)
            err = _reduce((fake_quantize(x, s, z, qmin, qmax, self.axis) - x) ** 2, self.axis,
                          lambda t, dim=None: t.mean() if dim is None else t.mean(dim=dim))
            if best_err is None:
                best_err, best = err, (s, z)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = (torch.where(better, s, best[0]), torch.where(better, z, best[1]))
        return best


OBSERVERS = {"minmax": MinMaxObserver, "ema": EMAObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(name: str, axis: int | None = None) -> Observer:
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; expected one of {tuple(OBSERVERS)}")
    return OBSERVERS[name](axis=axis)
