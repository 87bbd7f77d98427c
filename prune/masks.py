"""Unstructured magnitude pruning: which layers, global L1 masks, keeping masks in force, reporting sparsity.

A mask is a bool tensor shaped like a weight: True = kept, False = pruned (held at exactly zero). Masks are keyed
by parameter name (`features.3.conv.1.0.weight`), the same names as the state_dict, so a checkpoint's "masks"
entry lines up with its "model" entry.
"""
from __future__ import annotations

import fnmatch
import gzip
import io
import math

import torch
from torch import nn

__all__ = ["prunable_layers", "select_layers", "match_layers", "layer_kind", "global_l1_masks", "layer_l1_mask", "apply_masks",
           "MaskKeeper", "sparsity_report", "masks_from_zeros", "check_zeros", "state_dict_sizes"]


def layer_kind(name: str, module: nn.Module) -> str:
    """first | depthwise | pointwise | conv | linear, for exclusion rules and plots."""
    if isinstance(module, nn.Linear):
        return "linear"
    if name == "features.0.0":
        return "first"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "pointwise" if module.kernel_size == (1, 1) else "conv"


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv and linear layer, by module name, in forward order (53 in MobileNetV2)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def match_layers(patterns: list[str], names: list[str], what: str) -> set[str]:
    """Names matched by any fnmatch pattern; a pattern matching no layer is a user error naming it."""
    hit = set()
    for p in patterns:
        found = {n for n in names if fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n + ".weight", p)}
        if not found:
            raise ValueError(f"{what} pattern {p!r} matches no conv or linear layer; layer names look like "
                             f"{names[0]!r}, {names[1]!r}, ..., {names[-1]!r}")
        hit |= found
    return hit


def select_layers(model: nn.Module, cfg) -> dict[str, nn.Module]:
    """The layers that global pruning touches under cfg's exclusions (first conv, classifier, depthwise, names)."""
    layers = prunable_layers(model)
    excluded = match_layers(cfg.exclude_layers, list(layers), "--exclude-layers")
    out = {}
    for n, m in layers.items():
        kind = layer_kind(n, m)
        if n in excluded or (kind == "first" and cfg.exclude_first) or (kind == "linear" and cfg.exclude_classifier) \
                or (kind == "depthwise" and cfg.exclude_depthwise):
            continue
        out[n] = m
    if not out:
        raise ValueError("the exclusions leave no layer to prune")
    return out


@torch.no_grad()
def global_l1_masks(layers: dict[str, nn.Module], ratio: float, min_density: float = 0.0,
                    scores: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks that prune exactly round(ratio * total) of the weights with the smallest |w| across all `layers`,
    while every layer keeps at least ceil(min_density * numel) weights.

    1. Rank all scores (|w| by default) together; the k smallest are pruned (ties broken by position, so the
       count is exact).
    2. A layer that would fall below its floor is fixed at the floor (its largest weights kept) and leaves the
       pool; the budget it could not absorb goes back to the others. Repeat until no layer is below its floor.
    Returns {param name: bool mask}. If the floors make the ratio impossible, fewer weights are pruned: the
    caller checks the reached sparsity.
    """
    scores = scores or {n: m.weight.detach().abs().float() for n, m in layers.items()}
    numel = {n: s.numel() for n, s in scores.items()}
    floor = {n: min(numel[n], math.ceil(min_density * numel[n])) for n in scores}
    budget = int(round(ratio * sum(numel.values())))
    fixed: dict[str, int] = {}        # layer -> number pruned, for layers held at their floor
    while True:
        pool = [n for n in scores if n not in fixed]
        k = max(0, min(budget - sum(fixed.values()), sum(numel[n] for n in pool)))
        flat = torch.cat([scores[n].reshape(-1) for n in pool]) if pool else torch.empty(0)
        order = torch.sort(flat, stable=True).indices[:k]
        sizes = torch.tensor([numel[n] for n in pool], dtype=torch.long)
        owner = torch.repeat_interleave(torch.arange(len(pool)), sizes)
        counts = torch.bincount(owner[order], minlength=len(pool)).tolist() if pool else []
        over = [n for n, c in zip(pool, counts) if c > numel[n] - floor[n]]
        if not over:
            break
        for n in over:
            fixed[n] = numel[n] - floor[n]
    prune_n = dict(zip(pool, counts)) | fixed
    return {f"{n}.weight": layer_l1_mask(scores[n], prune_n[n]) for n in scores}


def layer_l1_mask(score: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Mask pruning exactly the `n_prune` smallest entries of one layer's score (ties by position)."""
    flat = score.reshape(-1)
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[torch.sort(flat, stable=True).indices[:n_prune].cpu()] = False
    return mask.view(score.shape)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every pruned weight in place (works for any memory format: the mask broadcasts by shape)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        p = params[name]
        p.mul_(mask.to(p.device, p.dtype))


class MaskKeeper:
    """Keeps masks in force through training: no gradient step, momentum or weight decay revives a weight.

    - a gradient hook zeroes the masked gradient entries during backward, before the optimizer sees them;
    - `after_step()` (engine.train_one_epoch's callback) re-zeroes masked weights and the masked entries of every
      optimizer state tensor shaped like the weight (SGD momentum, Adam moments).
    With both, SGD's weight decay term (wd * w) is zero at pruned entries and momentum never accumulates there.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], optimizer=None):
        self.model, self.optimizer = model, optimizer
        self.params = dict(model.named_parameters())
        self._hooks = []
        self.set_masks(masks)

    def set_masks(self, masks: dict[str, torch.Tensor]):
        """Install (or replace, for a gradual schedule) the masks and zero what they prune now."""
        for h in self._hooks:
            h.remove()
        self.masks = {n: m.to(self.params[n].device) for n, m in masks.items()}
        self._hooks = [self.params[n].register_hook(lambda g, m=m: g.masked_fill(~m, 0))
                       for n, m in self.masks.items()]
        self.after_step()

    @torch.no_grad()
    def after_step(self):
        apply_masks(self.model, self.masks)
        if self.optimizer is None:
            return
        for n, m in self.masks.items():
            for v in self.optimizer.state.get(self.params[n], {}).values():
                if torch.is_tensor(v) and v.shape == m.shape:
                    v.masked_fill_(~m, 0)

    def remove(self):
        """Masks become permanent: weights stay zero, hooks go."""
        self.after_step()
        for h in self._hooks:
            h.remove()
        self._hooks = []


@torch.no_grad()
def sparsity_report(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> dict:
    """Per-layer and global figures over every conv/linear weight, counting exact zeros in the weights.

    {"layers": [{"layer", "kind", "numel", "nonzero", "sparsity", "pruned_by_mask"}], "global_sparsity" (over
    pruned layers when masks are given, else over all), "total_sparsity" (over all conv/linear weights),
    "nonzero", "numel"}. Sparsities are fractions in [0, 1].
    """
    rows = []
    for n, m in prunable_layers(model).items():
        w = m.weight
        nz = int(torch.count_nonzero(w))
        rows.append({"layer": n, "kind": layer_kind(n, m), "numel": w.numel(), "nonzero": nz,
                     "sparsity": 1 - nz / w.numel(), "pruned_by_mask": bool(masks and f"{n}.weight" in masks)})
    numel, nonzero = sum(r["numel"] for r in rows), sum(r["nonzero"] for r in rows)
    sel = [r for r in rows if r["pruned_by_mask"]] if masks else rows
    g_numel, g_nz = sum(r["numel"] for r in sel), sum(r["nonzero"] for r in sel)
    return {"layers": rows, "global_sparsity": 1 - g_nz / max(g_numel, 1), "total_sparsity": 1 - nonzero / numel,
            "nonzero": nonzero, "numel": numel}


def masks_from_zeros(model: nn.Module, layer_names=None) -> dict[str, torch.Tensor]:
    """Masks recovered from a model's exact zeros (for a checkpoint saved without them)."""
    layers = prunable_layers(model)
    return {f"{n}.weight": layers[n].weight.detach().ne(0).cpu() for n in (layer_names or layers)}


def check_zeros(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> list[str]:
    """Names whose pruned entries are not all exactly zero in `state` (a state_dict, folded or quantized weights
    keyed by the same names). Empty list = the zeros survived. Quantize and export can call this too."""
    bad = []
    for n, m in masks.items():
        w = state[n]
        w = w.dequantize() if getattr(w, "is_quantized", False) else w
        if bool((w.detach().cpu()[~m.cpu()] != 0).any()):
            bad.append(n)
    return bad


def state_dict_sizes(state: dict[str, torch.Tensor]) -> dict:
    """Bytes of the weights: raw float tensors, torch.save file, and that file gzip-compressed (level 9).
    Zeros compress, so the gzip figure is where unstructured sparsity shows up on disk."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buf)
    raw = sum(v.numel() * v.element_size() for v in state.values() if v.is_floating_point())
    return {"dense_bytes": raw, "file_bytes": buf.tell(), "gzip_bytes": len(gzip.compress(buf.getvalue(), 9))}
