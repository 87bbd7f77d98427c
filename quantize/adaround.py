"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up, so that the layer's output on
calibration data stays close to the float layer's.

For one layer with scale s (per channel or per tensor, from the weight's min-max range, as round-to-nearest):
  1. w_floor = floor(w / s); V is initialised so that h(V) = w / s - w_floor (the soft weight starts at w).
  2. h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1), the rectified sigmoid (zeta = 1.1, gamma = -0.1).
  3. Minimise  || f(s * clamp(w_floor + h(V), qmin, qmax), x_q) - f(w, x_f) ||^2  +  lam * sum(1 - |2 h(V) - 1|^beta)
     over mini-batches of the cached calibration inputs; f is the layer up to and including its ReLU6, x_q its
     input in the quantized model, x_f in the float model. beta anneals from 20 to 2 after a warm-up (20% of
     the iterations, regulariser off), pushing every h(V) to 0 or 1.
  4. Hard rounding q = w_floor + [h(V) >= 0.5], clamped; a weight that is exactly 0 (pruned) stays 0.
  5. Keep whichever of AdaRound and round-to-nearest reconstructs the layer output better on all cached images
     (so AdaRound never ends worse than rounding to nearest), then snap: op.weight = s * q and the weight
     quantizer is frozen at s, so freezing and export see exactly these integers.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from .core import quantize
from .qmodel import QLayer, QMobileNet, qlayers
from .walk import float_forward, reference_weights, walk

__all__ = ["AdaRoundParams", "adaround_layer", "adaround", "rectified_sigmoid"]

ZETA, GAMMA = 1.1, -0.1


class AdaRoundParams:
    """Optimisation settings (the paper's, except lr and batch, sized for a few hundred iterations on a CPU)."""
    batch_size = 32          # images per step
    lr = 1e-2                # Adam, on V
    reg_weight = 0.01        # lam, per weight (the reconstruction is summed per image, averaged over the batch)
    beta_start, beta_end = 20.0, 2.0
    warmup = 0.2             # fraction of iterations without the regulariser
    eval_batch = 64          # images per chunk when measuring reconstruction error


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _init_v(rest: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) = rest, for rest in [0, 1)."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def _bshape(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return t.reshape([-1] + [1] * (w.dim() - 1)) if t.dim() == 1 else t


@torch.no_grad()
def _recon_error(layer, xq, target, w, b, p: AdaRoundParams) -> float:
    """Mean over images of the summed squared error of the layer output (after ReLU6)."""
    err = 0.0
    for i in range(0, len(xq), p.eval_batch):
        out = float_forward(layer, xq[i:i + p.eval_batch], w, b)
        err += float(((out - target[i:i + p.eval_batch]) ** 2).sum())
    return err / len(xq)


def adaround_layer(layer: QLayer, xq: torch.Tensor, target: torch.Tensor, iters: int, *,
                   params: AdaRoundParams | None = None, seed: int = 0, bar: tqdm | None = None) -> dict:
    """Learn the rounding of `layer`'s weight on inputs `xq` (N, ...) against float outputs `target`, snap the
    weight to the grid and freeze the weight quantizer. Returns errors of both roundings and which was kept."""
    p = params or AdaRoundParams()
    fq = layer.w_fq
    if fq is None or fq.frozen:
        raise ValueError("AdaRound needs an unfrozen weight quantizer")
    if layer.bn is not None:
        raise ValueError("AdaRound needs a PTQ model with BN folded (a QAT model: call to_ptq first)")
    qmin, qmax, axis = fq.spec.qmin, fq.spec.qmax, fq.axis
    with torch.no_grad():
        w, b = (t.detach().clone() for t in layer.folded_weight_bias())
        layer.quant_weight(w)                         # round-to-nearest scale from the weight's range
        scale = fq.scale.detach().clone()
        s = _bshape(scale, w)
        zero = w == 0
        q_rtn = quantize(w, scale, 0, qmin, qmax, axis).float()
        w_floor = torch.floor(w / s)
        v = _init_v(w / s - w_floor).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=p.lr)
    g = torch.Generator().manual_seed(seed)
    warm = int(p.warmup * iters)
    for it in range(iters):
        idx = torch.randint(0, len(xq), (min(p.batch_size, len(xq)),), generator=g)
        h = rectified_sigmoid(v)
        w_soft = s * torch.clamp(w_floor + h, qmin, qmax)
        out = float_forward(layer, xq[idx], w_soft, b)
        rec = ((out - target[idx]) ** 2).flatten(1).sum(1).mean()
        if it < warm:
            loss = rec
        else:
            beta = p.beta_end + (p.beta_start - p.beta_end) * (1 - (it - warm) / max(1, iters - warm))
            loss = rec + p.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    with torch.no_grad():
        q_ada = torch.clamp(w_floor + (rectified_sigmoid(v) >= 0.5).float(), qmin, qmax)
        q_ada = torch.where(zero, torch.zeros_like(q_ada), q_ada)
        err_rtn = _recon_error(layer, xq, target, s * q_rtn, b, p)
        err_ada = _recon_error(layer, xq, target, s * q_ada, b, p)
        kept = "adaround" if err_ada <= err_rtn else "nearest"
        q = q_ada if kept == "adaround" else q_rtn
        layer.op.weight.copy_(s * q)
        fq.set_qparams(scale, torch.zeros_like(fq.zero_point))
        flipped = float((q_ada != q_rtn).float().mean())
    return {"err_nearest": err_rtn, "err_adaround": err_ada, "kept": kept, "flipped": flipped}


def adaround(qm: QMobileNet, x: torch.Tensor, iters: int, *, seed: int = 0, params: AdaRoundParams | None = None,
             ref: dict | None = None, progress: bool = True) -> dict[str, dict]:
    """AdaRound every quantized layer of a PTQ model, in forward order, on calibration images `x` (N, 3, H, W)."""
    if iters < 0:
        raise ValueError(f"adaround_iters should be >= 0 instead of {iters}")
    ref = reference_weights(qm) if ref is None else ref
    todo = [n for n, layer in qlayers(qm).items() if layer.w_fq is not None]
    report: dict[str, dict] = {}
    bar = tqdm(total=len(todo) * iters, desc="adaround", unit="it", disable=not progress, mininterval=2.0)

    def visit(name, layer, xf, xq):
        if layer.w_fq is None:
            return
        with torch.no_grad():
            target = float_forward(layer, xf, *ref[name])
        bar.set_postfix_str(name)
        report[name] = adaround_layer(layer, xq.detach(), target, iters, params=params,
                                      seed=seed + len(report), bar=bar)

    try:
        walk(qm, x, visit, ref)
    finally:
        bar.close()
    return report
