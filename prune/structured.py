"""Structured pruning of expansion channels: a genuinely smaller dense MobileNetV2.

In an inverted residual with t != 1, hidden channel c lives in four places:

    expand conv output row c  ->  its BN entry c  ->  depthwise filter c (+ BN entry c)  ->  project conv input column c

Removing all four removes the channel exactly. The result is an ordinary model built from
`ModelConfig(hidden_channels=[...])`, so every later step (fold, quantize, export) takes it unchanged.
Blocks with t = 1 (no expand conv) are left as they are.

Channel score: L1 norm of the expand filter after BN scaling, |gamma / sqrt(var + eps)| * sum|w| (the filter's
effective size; the raw conv norm alone says little because the BN that follows rescales every channel).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from mobilenet.model import InvertedResidual, MobileNetV2, build_model

__all__ = ["channel_scores", "structured_prune", "zero_removed_channels", "count_params", "count_macs",
           "measure_latency", "compare_latency", "expand_blocks"]


def expand_blocks(model: MobileNetV2) -> list[tuple[int, InvertedResidual]]:
    """(block index among the 17, block) for every inverted residual that has an expand conv."""
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    return [(i, b) for i, b in enumerate(blocks) if len(b.conv) == 3]


@torch.no_grad()
def channel_scores(block: InvertedResidual) -> torch.Tensor:
    """(hidden,) importance of each hidden channel: BN-scaled L1 norm of its expand filter."""
    conv, bn = block.conv[0][0], block.conv[0][1]
    l1 = conv.weight.detach().abs().flatten(1).sum(1)
    return l1 * (bn.weight.detach().abs() * torch.rsqrt(bn.running_var + bn.eps))


def _kept(hidden: int, ratio: float, round_to: int) -> int:
    keep = hidden * (1 - ratio)
    keep = int(round(keep / round_to)) * round_to if hidden >= round_to else int(round(keep))
    return max(min(round_to, hidden), min(hidden, keep))


def _select(mod: nn.Module, idx: torch.Tensor, dim: int):
    """Copy the entries `idx` along `dim` of every parameter and buffer of `mod` that has that axis."""
    out = {}
    for k, v in mod.state_dict().items():
        out[k] = v.index_select(dim, idx.to(v.device)) if v.dim() > dim else v.clone()
    return out


@torch.no_grad()
def structured_prune(model: MobileNetV2, ratio: float, round_to: int = 8) -> tuple[MobileNetV2, dict]:
    """A new, smaller model without the lowest-scoring `ratio` of hidden channels in each t != 1 block.

    Returns (model in eval mode, {block index: kept channel indices (sorted)}). The input model is unchanged.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"structured ratio should be in [0, 1), not {ratio!r}")
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    hidden = [b.conv[-1][0].in_channels for b in blocks]
    kept: dict[int, torch.Tensor] = {}
    for i, b in expand_blocks(model):
        n = _kept(hidden[i], ratio, round_to)
        kept[i] = torch.sort(torch.topk(channel_scores(b), n, sorted=False).indices.cpu()).values
        hidden[i] = n
    cfg = copy.deepcopy(model.cfg)
    cfg.hidden_channels = hidden
    small = build_model(cfg)
    sd = model.state_dict()
    new_blocks = [m for m in small.features if isinstance(m, InvertedResidual)]
    feat_index = {id(m): k for k, m in enumerate(model.features)}
    for i, b in enumerate(blocks):
        if i not in kept:
            continue
        idx, prefix = kept[i], f"features.{feat_index[id(b)]}.conv"
        sub = {}
        for j, part, dim in ((0, b.conv[0], 0), (1, b.conv[1], 0)):   # expand and dw: output channels (+ BN)
            sub.update({f"{prefix}.{j}.{k}": v for k, v in _select(part, idx, dim).items()})
        proj_w = b.conv[2][0].weight.index_select(1, idx.to(b.conv[2][0].weight.device))   # pw-linear: input
        sub[f"{prefix}.2.0.weight"] = proj_w
        sd.update(sub)
        assert new_blocks[i].conv[0][0].out_channels == len(idx)
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    small.load_state_dict(sd)
    return small.eval(), kept


@torch.no_grad()
def zero_removed_channels(model: MobileNetV2, kept: dict[int, torch.Tensor]) -> MobileNetV2:
    """A copy of the dense model whose removed hidden channels contribute nothing: the project conv's input
    columns are zeroed (enough on its own, since the channel reaches the output only through them), and the
    expand rows and dw filters too, so the dense model has zeros exactly where the small one has nothing."""
    dense = copy.deepcopy(model).eval()
    blocks = [m for m in dense.features if isinstance(m, InvertedResidual)]
    for i, idx in kept.items():
        b = blocks[i]
        drop = torch.ones(b.conv[2][0].in_channels, dtype=torch.bool)
        drop[idx] = False
        b.conv[0][0].weight[drop] = 0
        b.conv[1][0].weight[drop] = 0
        b.conv[2][0].weight[:, drop] = 0
    return dense


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int = 32) -> int:
    """Multiply-accumulates of one image through every conv and linear layer (BN, ReLU6, adds not counted)."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
            total[0] += out.numel() * k
        else:
            total[0] += m.in_features * m.out_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return total[0]


@torch.inference_mode()
def compare_latency(models: dict[str, nn.Module], batch: int, input_size: int = 32, repeats: int = 20,
                    warmup: int = 3, channels_last: bool = True) -> dict[str, dict]:
    """Latency of several models measured in alternation (a, b, a, b, ...), so a busy machine slows them alike
    and the ratio between them stays meaningful. {name: measure_latency-style dict}."""
    prepared = {}
    x = torch.randn(batch, 3, input_size, input_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for k, m in models.items():
        m = copy.deepcopy(m).eval()
        prepared[k] = m.to(memory_format=torch.channels_last) if channels_last else m
        for _ in range(warmup):
            prepared[k](x)
    times = {k: [] for k in prepared}
    for _ in range(repeats):
        for k, m in prepared.items():
            t = time.perf_counter()
            m(x)
            times[k].append(1000 * (time.perf_counter() - t))
    return {k: _summary(v, batch, channels_last) for k, v in times.items()}


def _summary(times: list[float], batch: int, channels_last: bool) -> dict:
    q = statistics.quantiles(times, n=20) if len(times) > 1 else times * 19
    return {"batch": batch, "median_ms": statistics.median(times), "p5_ms": q[0], "p95_ms": q[-1],
            "min_ms": min(times), "repeats": len(times), "threads": torch.get_num_threads(),
            "channels_last": channels_last}


@torch.inference_mode()
def measure_latency(model: nn.Module, batch: int, input_size: int = 32, repeats: int = 20, warmup: int = 3,
                    channels_last: bool = True) -> dict:
    """Host CPU latency of an fp32 eval-mode forward in torch: median and spread over `repeats` timed runs (ms).
    Uses the current torch thread count (reported)."""
    m = copy.deepcopy(model).eval()
    x = torch.randn(batch, 3, input_size, input_size)
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        m(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        m(x)
        times.append(1000 * (time.perf_counter() - t))
    return _summary(times, batch, channels_last)
