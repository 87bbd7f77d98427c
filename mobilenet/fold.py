"""BatchNorm folding: a pure function on tensors, and a whole-model pass over `ConvBNAct` blocks.

    w' = w * gamma / sqrt(var + eps)            (per output channel)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .model import ConvBNAct

__all__ = ["fold_bn", "fold_model", "is_folded"]


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, running_mean: torch.Tensor, running_var: torch.Tensor,
            eps: float, gamma: torch.Tensor | None, beta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (weight, bias) of the conv that equals conv followed by eval-mode BN. weight: (C_out, ...)."""
    if bias is None:
        bias = torch.zeros_like(running_mean)
    if gamma is None:
        gamma = torch.ones_like(running_mean)
    if beta is None:
        beta = torch.zeros_like(running_mean)
    scale = gamma * torch.rsqrt(running_var + eps)  # (C_out,)
    w = weight * scale.reshape([-1] + [1] * (weight.dim() - 1)).to(weight.dtype)
    b = (bias - running_mean) * scale + beta
    return w, b


@torch.no_grad()
def fold_model(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every ConvBNAct is conv-with-bias -> act (the BN becomes Identity).

    The copy is in eval mode; the input model is not modified.
    """
    folded = copy.deepcopy(model).eval()
    for m in folded.modules():
        if isinstance(m, ConvBNAct) and isinstance(m[1], nn.BatchNorm2d):
            conv, bn = m[0], m[1]
            w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            groups=conv.groups, bias=True).to(w.device)
            new.weight.copy_(w)
            new.bias.copy_(b)
            m[0] = new
            m[1] = nn.Identity()
    return folded


def is_folded(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
