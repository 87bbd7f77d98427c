"""The pruning pipeline shared by `train.py --prune` and `python -m prune`:

    1. evaluate the baseline             4. unstructured: global L1 masks over the selected layers
    2. sensitivity sweep (CSV + PNG)     4b. re-estimate BN statistics (forward passes only), evaluate
    3. structured: drop hidden channels  5. fine-tune with masks held (or ramped), evaluate
                                         6. masks permanent, check reached sparsity, save checkpoint + report

Outputs in out_dir: prune_config.json, sweep_global.csv/.png, sweep_layers.csv/.png, pruned.pt,
prune_report.json, prune_layers.csv.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from mobilenet.checkpoint import FORMAT, atomic_save
from common.files import atomic_write_text
from common.plots import footer_text
from common.provenance import collect_meta, command_line, read_meta, write_meta

from .config import PruneConfig, from_train_config
from .finetune import fine_tune, recalibrate_bn
from .masks import apply_masks, global_l1_masks, select_layers, sparsity_report, state_dict_sizes
from .plots import plot_prune_layers, plot_prune_sweep
from .structured import compare_latency, count_macs, count_params, structured_prune
from .sweep import (GLOBAL_COLUMNS, accuracy, choose_auto_ratio, global_sweep,
                    per_layer_sweep, read_sweep_rows, write_csv)

__all__ = ["run_prune_pipeline", "run_sweeps", "PruneError", "model_stats", "write_json"]

LAYER_REPORT_COLUMNS = ["layer", "kind", "numel", "nonzero", "sparsity", "pruned_by_mask"]


class PruneError(ValueError):
    """The pruning run did not reach what was asked (e.g. the global sparsity is off by more than the tolerance)."""


def write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2, default=str) + "\n", path)


def run_sweeps(model, dataset, cfg: PruneConfig, out_dir, device="cpu", log=print) -> dict:
    """Global and (optionally) per-layer sensitivity sweeps; CSV and PNG in out_dir. Returns their rows."""
    out = Path(out_dir)
    res = {"precision": cfg.resolve_precision(device)}
    footer = footer_text(read_meta(out / "prune_meta.json"), source=str(out))
    split = dataset.test.stratified(cfg.sweep_global_images)
    res["global"] = global_sweep(model, split, cfg, device, log=log)
    write_csv(res["global"], GLOBAL_COLUMNS, out / "sweep_global.csv")
    plot_prune_sweep(read_sweep_rows(out / "sweep_global.csv"), out / "sweep_global.png", footer)
    if cfg.sweep_per_layer:
        work = copy.deepcopy(model).to(device).eval()
        if cfg.channels_last:
            work = work.to(memory_format=torch.channels_last)
        # a small subset evaluated once per trial (hundreds): decoded once here when the data is streamed
        few = dataset.test.stratified(cfg.sweep_images).in_memory("decode sweep subset")
        res["layers"] = per_layer_sweep(work, few, cfg, device,
                                        csv_path=out / "sweep_layers.csv", log=log)
        planned = res["layers"][0].get("planned_trials", len(res["layers"])) - 1 if res["layers"] else 0
        res["layers_trials"] = {"run": len(res["layers"]) - 1, "planned": planned,
                                "minutes": cfg.sweep_minutes or None}
        plot_prune_layers(read_sweep_rows(out / "sweep_layers.csv"), out / "sweep_layers.png", footer)
    log(f"sweep written to {out}/sweep_global.csv/.png" + (" and sweep_layers.csv/.png" if cfg.sweep_per_layer else ""))
    return res


def model_stats(dense, small, cfg: PruneConfig) -> tuple[dict, dict]:
    """Parameters, MACs per image and host latency (torch fp32, batch 1 and 64, median over repeats, the two
    models timed in alternation) of the dense and the structurally pruned model."""
    size = dense.cfg.input_size
    out = tuple({"params": count_params(m), "macs": count_macs(m, size)} for m in (dense, small))
    for batch, reps in ((1, cfg.latency_repeats), (64, max(3, cfg.latency_repeats // 4))):
        lat = compare_latency({"dense": dense, "small": small}, batch, size, reps)
        out[0][f"latency_b{batch}"], out[1][f"latency_b{batch}"] = lat["dense"], lat["small"]
    return out


def _train_config_dict(tcfg):
    if tcfg is None:
        return None
    if dataclasses.is_dataclass(tcfg):
        return dataclasses.asdict(tcfg)
    return dict(vars(tcfg)) if hasattr(tcfg, "__dict__") else str(tcfg)


def _write_inputs(cfg: PruneConfig, tcfg, source, out: Path, device, log) -> dict:
    """prune_config.json and prune_meta.json, before any work; returns the precision of each compute path."""
    out.mkdir(parents=True, exist_ok=True)
    precision = cfg.resolve_precision(device)
    for name, p in precision.items():
        log(f"precision of {name.replace('_', '-')}: {p['dtype']} ({p['reason']})")
    write_json({"prune_config": cfg.to_dict(), "precision": precision, "caller_config": _train_config_dict(tcfg),
                "source": source}, out / "prune_config.json")
    # what produced these results (named under every plot of the report): command, checkpoint, commit, machine
    write_meta(out / "prune_meta.json", collect_meta(command_line(), source or "(in-memory model)",
                                                     eval_subset=f"{cfg.eval_images or 'all'} test images",
                                                     seed=cfg.seed))
    return precision


def _structured(dense, cfg: PruneConfig, report: dict, acc, device, log):
    """Remove expansion channels; parameters, MACs and latency before and after go into `report`."""
    model, kept = structured_prune(dense, cfg.structured, cfg.structured_round)
    model.to(device)
    report["structured_before"], report["structured_after"] = model_stats(dense, model, cfg)
    report["hidden_channels"] = model.cfg.hidden_channels
    b, a = report["structured_before"], report["structured_after"]
    report["structured_latency_ratio"] = {k: a[k]["median_ms"] / b[k]["median_ms"]
                                          for k in ("latency_b1", "latency_b64")}
    report["acc_structured"] = acc(model, f"structured {cfg.structured}, before fine-tuning")
    log(f"structured: params {b['params']} -> {a['params']}, MACs {b['macs']} -> {a['macs']}, latency b1 "
        f"{b['latency_b1']['median_ms']:.2f} -> {a['latency_b1']['median_ms']:.2f} ms, b64 "
        f"{b['latency_b64']['median_ms']:.1f} -> {a['latency_b64']['median_ms']:.1f} ms")
    return model, kept


def _save(model, masks: dict, kept, ratio, cfg: PruneConfig, tcfg, source, report: dict, out: Path, log):
    """Sparsity reached and sizes into `report`; prune_layers.csv and pruned.pt. A sparsity off the asked ratio by
    more than --tolerance writes the report for diagnosis and no checkpoint."""
    sp = sparsity_report(model, masks or None)
    report.update(global_sparsity=sp["global_sparsity"], total_sparsity=sp["total_sparsity"], nonzero=sp["nonzero"],
                  numel=sp["numel"], layers=sp["layers"], size_pruned=state_dict_sizes(model.state_dict()))
    log(f"sparsity: global {100 * sp['global_sparsity']:.2f}% over pruned layers, {100 * sp['total_sparsity']:.2f}% "
        f"over all conv/linear weights; {sp['nonzero']} of {sp['numel']} non-zero; gzip "
        f"{report['size_baseline']['gzip_bytes']} -> {report['size_pruned']['gzip_bytes']} bytes")
    write_csv(sp["layers"], LAYER_REPORT_COLUMNS, out / "prune_layers.csv")
    if ratio and abs(sp["global_sparsity"] - ratio) * 100 > cfg.tolerance:
        msg = (f"global sparsity reached {100 * sp['global_sparsity']:.2f}% but {100 * ratio:.2f}% was asked "
               f"(tolerance {cfg.tolerance} points); lower --min-density or the exclusions")
        write_json(report | {"error": msg}, out / "prune_report.json")   # for diagnosis; no checkpoint is written
        raise PruneError(msg)
    metrics = {k: report[k] for k in ("acc_baseline", "acc_final", "drop_points", "global_sparsity",
                                      "total_sparsity", "nonzero", "eval_images") if k in report}
    ckpt = {"format": FORMAT, "kind": "pruned", "model_config": model.cfg.to_dict(),
            "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            "masks": {k: v.cpu() for k, v in masks.items()}, "prune_config": cfg.to_dict(),
            "caller_config": _train_config_dict(tcfg), "metrics": metrics, "source": source,
            "structured_kept": {i: v.tolist() for i, v in kept.items()} if kept else None}
    atomic_save(ckpt, out / "pruned.pt")
    report["checkpoint"] = str(out / "pruned.pt")
    log(f"saved {out / 'pruned.pt'}, {out / 'prune_report.json'}, {out / 'prune_layers.csv'}")


def run_prune_pipeline(model, dataset, tcfg, out_dir, device="cpu", cfg: PruneConfig | None = None,
                       source: str | None = None, log=print) -> dict:
    """Sweep -> prune -> fine-tune -> save. `tcfg` is train.py's TrainConfig (read by from_train_config) or None
    when `cfg` is given. The input model is not modified. Returns the report (also in out_dir/prune_report.json).
    (Long because the steps' order is the pipeline; each step is a few lines or a helper.)"""
    cfg = cfg if cfg is not None else from_train_config(tcfg)
    if cfg.ratio is None and cfg.structured is None:
        raise ValueError("nothing to do: give --prune RATIO|auto and/or --prune-structured RATIO")
    out = Path(out_dir)
    precision = _write_inputs(cfg, tcfg, source, out, device, log)
    t_start = time.monotonic()
    model = copy.deepcopy(model).to(device).eval()
    eval_split = dataset.test.stratified(cfg.eval_images)

    def acc(m, what):
        a = accuracy(m, eval_split, cfg.layout, cfg.eval_bf16, cfg.channels_last, cfg.eval_batch_size, device)
        log(f"{what}: top-1 {100 * a:.2f}% on {len(eval_split)} test images")
        return a

    report = {"eval_images": len(eval_split), "eval_bf16": cfg.eval_bf16, "precision": precision, "source": source,
              "data": dataset.describe(),
              "acc_baseline": acc(model, "baseline")}
    report["size_baseline"] = state_dict_sizes(model.state_dict())

    # 1-2. sensitivity sweep, and the ratio `auto` picks from it
    ratio = cfg.ratio
    if cfg.sweep or ratio == "auto":
        sweeps = run_sweeps(model, dataset, cfg, out, device, log)
        report["sweep_global"] = sweeps["global"]
        report["sweep_layers_trials"] = sweeps.get("layers_trials")
        if ratio == "auto":
            ratio = choose_auto_ratio(sweeps["global"], cfg.auto_threshold)
            log(f"--prune auto: chose ratio {ratio} (largest swept drop under {cfg.auto_threshold} points)")
    report["ratio"] = ratio

    # 3. structured pruning of expansion channels
    kept = None
    if cfg.structured:
        model, kept = _structured(model, cfg, report, acc, device, log)

    # 4. unstructured global L1 masks
    masks, layers = {}, {}
    if ratio:
        layers = select_layers(model, cfg)
        masks = global_l1_masks(layers, ratio, cfg.min_density)
        if not cfg.gradual:
            apply_masks(model, masks)
            report["acc_pruned"] = acc(model, f"global L1 {ratio}, before fine-tuning")

    # 4b. re-estimate BN statistics of the pruned model (cheap: forward passes only)
    if (ratio and not cfg.gradual or cfg.structured) and cfg.bn_recalib_images:
        model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        n = recalibrate_bn(model, dataset.train, cfg, device, cfg.bn_recalib_images)
        model.to(memory_format=torch.contiguous_format).eval()
        report["acc_bn_recalibrated"] = acc(model, f"after BN re-estimation on {n} training images")

    # 5. fine-tune (masks held; or the gradual ramp builds them)
    if cfg.epochs > 0:
        ft = fine_tune(model, dataset, cfg, layers, ratio, masks if ratio else None, device, log)
        masks = ft.pop("masks") or {}
        report["finetune"] = ft
        model.eval()
        report["acc_finetuned"] = acc(model, "after fine-tuning")
    elif ratio and cfg.gradual:
        apply_masks(model, masks)
    report["acc_final"] = next(report[k] for k in ("acc_finetuned", "acc_bn_recalibrated", "acc_pruned",
                                                    "acc_structured", "acc_baseline") if k in report)
    report["drop_points"] = 100 * (report["acc_baseline"] - report["acc_final"])

    # 6. the reached sparsity, sizes, and the files
    _save(model, masks, kept, ratio, cfg, tcfg, source, report, out, log)
    report["seconds"] = round(time.monotonic() - t_start, 1)
    write_json(report, out / "prune_report.json")
    return report
