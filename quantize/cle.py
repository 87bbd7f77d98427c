"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", sec. 4.1) on a BN-folded MobileNetV2.

For two consecutive convs y = f(W2 g(W1 x + b1)) with g positively homogeneous, scaling output channel i of
the first by 1/s_i and input channel i of the second by s_i leaves the output unchanged. With
r1_i = max |W1[i, ...]| and r2_i = max |W2[:, i, ...]| (depthwise: |W2[i, ...]|),

    s_i = sqrt(r1_i * r2_i) / r2_i         makes both ranges sqrt(r1_i * r2_i)

which helps per-tensor weight quantization most. Pairs: stem -> first dw (unless a residual ADD reads the stem),
and in every block expand -> dw and dw -> project. A project conv never scales into the next block: a residual ADD or nothing sits between.

ReLU6 is not positively homogeneous: clamp(x / c, 0, 6) = clamp(x, 0, 6) / c only when x <= 6 min(1, c). So we
measure, on calibration images, the largest pre-activation m of every ReLU6 channel of the float model, and
(with c the total factor the channel has been divided by so far):
    m > 6      the upper clamp acts: the channel is never scaled (c stays 1);
    m <= 6     c is kept >= m / 6 (the scale is clamped), so the clamp stays inactive on the data seen.
Equalization is then exact on every calibration image (checked by the tests) and exact on new inputs whose
pre-activations stay within the calibration maxima; beyond them it changes where ReLU6 saturates.
The pass over all pairs is repeated `iters` times (each pair changes the ranges of its neighbours).
"""
from __future__ import annotations

import torch
from torch import nn

from mobilenet.model import ConvBNAct, InvertedResidual, MobileNetV2

__all__ = ["cle_pairs", "relu6_preact_max", "equalize"]


def _is_relu6(m: ConvBNAct) -> bool:
    return isinstance(m[2], nn.ReLU6)


def cle_pairs(model: MobileNetV2) -> list[tuple[str, str]]:
    """(first, second) module paths of every equalizable pair of ConvBNAct blocks, in forward order."""
    named = {m: n for n, m in model.named_modules()}
    pairs = []
    feats = list(model.features)
    first = feats[1]
    if isinstance(first, InvertedResidual) and len(first.conv) == 2 and not first.use_res_connect:  # stem -> dw
        # (t = 1; with a residual ADD, as at width 0.25 where 16 * 0.25 rounds up to the stem's 8, the stem's
        # output also feeds the ADD, so it cannot be rescaled)
        pairs.append((named[feats[0]], named[feats[1].conv[0]]))
    for blk in feats:
        if not isinstance(blk, InvertedResidual):
            continue
        layers = list(blk.conv)
        for a, b in zip(layers[:-1], layers[1:]):
            pairs.append((named[a], named[b]))
    return pairs


@torch.no_grad()
def relu6_preact_max(model: MobileNetV2, batches) -> dict[str, torch.Tensor]:
    """Per-channel max (C,) of the pre-activation of every ReLU6 block over `batches` of float images."""
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, ConvBNAct) and _is_relu6(m):
            def hook(mod, inp, y, name=name):
                cur = y.detach().amax(dim=(0, 2, 3))
                out[name] = cur if name not in out else torch.maximum(out[name], cur)
            hooks.append(m[1].register_forward_hook(hook))  # after BN (Identity once folded), before ReLU6
    was = model.training
    model.eval()
    try:
        for x in batches:
            model(x[0] if isinstance(x, (tuple, list)) else x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return out


@torch.no_grad()
def equalize(model: MobileNetV2, batches, iters: int = 4, eps: float = 1e-8) -> dict:
    """Equalize `model` in place (must be BN-folded). `batches`: calibration images for the ReLU6 bounds.

    Returns {"pairs": number of pairs, "fixed": ReLU6 channels left unscaled, "clamped": scales clamped at the
    last pass, "range_ratio_before"/"after": mean over pairs of mean_i max(r1,r2)/min(r1,r2)}."""
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ValueError("cross-layer equalization needs a BN-folded model (mobilenet.fold_model)")
    mods = dict(model.named_modules())
    pairs = cle_pairs(model)
    m6 = relu6_preact_max(model, batches)
    cum = {n: torch.ones_like(v) for n, v in m6.items()}
    lo = {n: torch.clamp(v / 6.0, min=0.0) for n, v in m6.items()}
    fixed = {n: v > 6.0 for n, v in m6.items()}
    before = _mean_ratio(mods, pairs, eps)
    clamped = 0
    for _ in range(max(1, iters)):
        clamped = 0
        for n1, n2 in pairs:
            c1, c2 = mods[n1][0], mods[n2][0]
            r1, r2 = _ranges(c1, c2)
            ok = (r1 > eps) & (r2 > eps)
            s = torch.where(ok, torch.sqrt(r1 * r2) / r2.clamp(min=eps), torch.ones_like(r1))
            if n1 in cum:                                               # the first block ends in ReLU6
                want = cum[n1] * s
                new = torch.maximum(want, lo[n1])
                new = torch.where(fixed[n1], torch.ones_like(new), new)
                clamped += int((new != want).sum())
                s = new / cum[n1]
                cum[n1] = new
            c1.weight.div_(s.reshape(-1, 1, 1, 1))
            if c1.bias is not None:
                c1.bias.div_(s)
            if c2.groups > 1:
                c2.weight.mul_(s.reshape(-1, 1, 1, 1))
            else:
                c2.weight.mul_(s.reshape(1, -1, 1, 1))
    return {"pairs": len(pairs), "fixed": int(sum(int(f.sum()) for f in fixed.values())), "clamped": clamped,
            "range_ratio_before": before, "range_ratio_after": _mean_ratio(mods, pairs, eps)}


def _ranges(c1: nn.Conv2d, c2: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) ranges: of each output channel of c1, of each input channel of c2 (depthwise: its own channel)."""
    r1 = c1.weight.abs().flatten(1).amax(1)
    w2 = c2.weight.abs()
    r2 = w2.flatten(1).amax(1) if c2.groups > 1 else w2.transpose(0, 1).flatten(1).amax(1)
    return r1, r2


def _mean_ratio(mods, pairs, eps) -> float:
    vals = []
    for n1, n2 in pairs:
        r1, r2 = _ranges(mods[n1][0], mods[n2][0])
        ok = (r1 > eps) & (r2 > eps)
        vals.append(float((torch.maximum(r1, r2)[ok] / torch.minimum(r1, r2)[ok]).mean()))
    return sum(vals) / max(1, len(vals))
