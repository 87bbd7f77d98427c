"""Sensitivity sweep: accuracy against sparsity without fine-tuning, globally and one layer at a time.

The per-layer sweep is many evaluations (53 layers x 5 ratios in MobileNetV2), so it evaluates on a small stratified
subset, optionally in bf16, and writes its CSV after every trial: a run stopped half-way resumes where it stopped
(rows are reused only if the model fingerprint, subset size and precision match).
"""
from __future__ import annotations

import copy
import csv
import io
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from common.files import atomic_write_text, tensor_digest
from mobilenet.data import Split
from mobilenet.engine import autocast_ctx, predict

from .masks import match_layers, apply_masks, global_l1_masks, layer_kind, layer_l1_mask, prunable_layers, select_layers

__all__ = ["accuracy", "global_sweep", "per_layer_sweep", "choose_auto_ratio", "model_fingerprint", "read_sweep_rows",
           "write_csv", "read_csv", "GLOBAL_COLUMNS", "LAYER_COLUMNS"]

GLOBAL_COLUMNS = ["ratio", "reached_sparsity", "acc", "drop_points", "images", "bf16"]
LAYER_COLUMNS = ["layer", "kind", "numel", "ratio", "reached_sparsity", "acc", "drop_points", "images", "bf16",
                 "fingerprint"]


def accuracy(model: nn.Module, split: Split, layout: str = "cifar", bf16: bool = False, channels_last: bool = False,
             batch_size: int = 250, device="cpu", desc: str = "eval") -> float:
    """Top-1 in [0, 1] in eval mode (bf16 autocast optional)."""
    with autocast_ctx(device, bf16):
        logits = predict(model, split, layout, batch_size=batch_size, device=device, channels_last=channels_last,
                         desc=desc, disable_bar=True)
    return (logits.argmax(1) == split.labels).float().mean().item()


def model_fingerprint(model: nn.Module) -> str:
    """Short digest of the weights: a resumed per-layer sweep continues only on the same model."""
    return tensor_digest(model)[:12]


def write_csv(rows: list[dict], columns: list[str], path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(buf.getvalue(), path)


def read_csv(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


_PRUNE_FLOATS = ("ratio", "reached_sparsity", "acc", "drop_points")
_PRUNE_INTS = ("images", "numel")


def read_sweep_rows(path) -> list[dict]:
    """A sweep CSV (global or per-layer) with its numeric columns as numbers; [] if the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        t = dict(r)
        for c in _PRUNE_FLOATS + _PRUNE_INTS:
            if t.get(c) not in (None, ""):
                try:
                    t[c] = int(float(t[c])) if c in _PRUNE_INTS else float(t[c])
                except ValueError:
                    raise ValueError(f"{path}: column {c!r} should be a number, not {t[c]!r}") from None
        out.append(t)
    return out


def _eval_copy(model: nn.Module, channels_last: bool, device) -> nn.Module:
    m = copy.deepcopy(model).to(device).eval()
    return m.to(memory_format=torch.channels_last) if channels_last else m


def global_sweep(model: nn.Module, split: Split, cfg, device="cpu", log=print) -> list[dict]:
    """For each ratio: prune a copy globally (cfg's exclusions and min density), evaluate without fine-tuning.
    The first row is ratio 0 (the unpruned baseline under the same subset and precision)."""
    rows = []
    ratios = [0.0] + [r for r in cfg.sweep_ratios if r > 0]
    for r in tqdm(ratios, desc="global sweep", unit="ratio", mininterval=1.0):
        m = _eval_copy(model, cfg.channels_last, device)
        layers = select_layers(m, cfg)
        masks = global_l1_masks(layers, r, cfg.min_density)
        apply_masks(m, masks)
        zeros = sum(int((~mk).sum()) for mk in masks.values())
        acc = accuracy(m, split, cfg.layout, cfg.sweep_bf16, cfg.channels_last, cfg.eval_batch_size, device)
        rows.append({"ratio": r, "reached_sparsity": zeros / sum(mk.numel() for mk in masks.values()), "acc": acc,
                     "images": len(split), "bf16": cfg.sweep_bf16})
    for row in rows:
        row["drop_points"] = 100 * (rows[0]["acc"] - row["acc"])
        log(f"global sweep: ratio {row['ratio']:.2f} reached {row['reached_sparsity']:.4f} "
            f"acc {100 * row['acc']:.2f}% drop {row['drop_points']:+.2f} points")
    return rows


@torch.no_grad()
def per_layer_sweep(model: nn.Module, split: Split, cfg, device="cpu", csv_path=None, after_trial=None,
                    log=print) -> list[dict]:
    """Prune each conv/linear layer alone (L1, exactly round(ratio * numel) weights) at each ratio, evaluate, and
    restore the layer's weights bit for bit. Works on `model` itself (no copy): `after_trial(model, row)` lets a
    caller verify it is unchanged. With `csv_path`, rows are written after every trial and reused on resume.
    (Long because resume, trial, exact restore and the time budget share the loop's state.)"""
    model.eval()
    layers = prunable_layers(model)
    names = sorted(match_layers(cfg.sweep_layers, list(layers), "--sweep-layers"), key=list(layers).index) \
        if cfg.sweep_layers else list(layers)
    fp = model_fingerprint(model)
    key = lambda layer, r: (layer, f"{float(r):.6g}")  # noqa: E731
    done = {}
    for row in read_csv(csv_path) if csv_path else []:
        if row.get("fingerprint") == fp and int(row["images"]) == len(split) and \
                row["bf16"] == str(cfg.sweep_bf16):
            done[key(row["layer"], row["ratio"])] = row
    if done:
        log(f"per-layer sweep: resuming, {len(done)} trials already in {csv_path}")

    def run(layer_name, r):
        if key(layer_name, r) in done:
            row = done[key(layer_name, r)]
            return {k: (float(v) if k in ("ratio", "reached_sparsity", "acc", "drop_points") else v)
                    for k, v in row.items()}
        base = {"layer": layer_name, "kind": "-", "numel": 0, "ratio": float(r), "images": len(split),
                "bf16": cfg.sweep_bf16, "fingerprint": fp}
        if layer_name == "(none)":
            acc, reached = accuracy(model, split, cfg.layout, cfg.sweep_bf16, cfg.channels_last,
                                    cfg.eval_batch_size, device), 0.0
        else:
            w = layers[layer_name].weight
            backup = w.detach().clone()
            w.mul_(layer_l1_mask(w.detach().abs(), int(round(r * w.numel()))).to(w.device, w.dtype))
            reached = 1 - int(torch.count_nonzero(w)) / w.numel()    # ties with exact zeros can raise it
            acc = accuracy(model, split, cfg.layout, cfg.sweep_bf16, cfg.channels_last, cfg.eval_batch_size, device)
            w.copy_(backup)
            base.update(kind=layer_kind(layer_name, layers[layer_name]), numel=w.numel())
        base.update(reached_sparsity=reached, acc=acc)
        return base

    rows = []
    # ratio by ratio, every layer at each: a sweep cut short by its budget still ranks all layers
    trials = [("(none)", 0.0)] + [(n, r) for r in cfg.sweep_ratios if r > 0 for n in names]
    deadline = time.monotonic() + 60 * cfg.sweep_minutes if cfg.sweep_minutes else None
    bar = tqdm(trials, desc="per-layer sweep", unit="trial", mininterval=1.0)
    for i, (layer_name, r) in enumerate(bar):
        if deadline is not None and rows and time.monotonic() > deadline and key(layer_name, r) not in done:
            skipped = trials[i:]
            left = sorted({float(t[1]) for t in skipped})
            log(f"per-layer sweep: the {cfg.sweep_minutes:g} min budget (--sweep-minutes) ran out after "
                f"{len(rows) - 1} of {len(trials) - 1} trials; skipped {len(skipped)} trials (ratios "
                f"{', '.join(f'{x:g}' for x in left)}; the first skipped: {layer_name} at {r:g})")
            bar.close()
            break
        row = run(layer_name, r)
        row["planned_trials"] = len(trials)
        row["drop_points"] = 100 * (rows[0]["acc"] - row["acc"]) if rows else 0.0
        if layer_name != "(none)" and abs(row["reached_sparsity"] - r) > 0.5 / 100 + 1 / max(int(row["numel"]), 1):
            log(f"per-layer sweep: {layer_name} at {r} reached {row['reached_sparsity']:.4f} (exact zeros in the "
                f"layer already)")
        rows.append(row)
        if after_trial is not None:
            after_trial(model, row)
        if csv_path is not None:
            write_csv(rows, LAYER_COLUMNS, csv_path)
    return rows


def choose_auto_ratio(global_rows: list[dict], threshold_points: float) -> float:
    """The largest swept ratio whose accuracy drop (points, against the ratio-0 row) is below the threshold."""
    ok = [r["ratio"] for r in global_rows if r["ratio"] > 0 and r["drop_points"] < threshold_points]
    if not ok:
        tried = ", ".join(f"{r['ratio']:g}: {r['drop_points']:.2f}" for r in global_rows if r["ratio"] > 0)
        raise ValueError(f"--prune auto: no swept ratio keeps the accuracy drop under {threshold_points} points "
                         f"(ratio: drop = {tried}); add smaller --sweep-ratios or raise --auto-threshold")
    return max(ok)
