"""Pruning benchmark on the reference checkpoint (issue 3). Stages, each writing into runs/prune_bench/<stage>/:

    unstructured   global sweep (2,000 images) + 70% global L1 + fine-tune within a time budget
    structured     50% of expansion channels removed + latency before/after + fine-tune within a budget
    layers         per-layer sensitivity sweep on a small subset (53 layers x 5 ratios)
    latency        re-time dense vs structured in torch, in alternation
    litert         dense vs structured as shipped: FP32 and W8A8 .tflite files (exported and validated),
                   timed by the LiteRT interpreter (bench.host, 1 thread, XNNPACK) in alternating rounds
    report         append the "## Pruning (issue 3)" section to benchmarks/RESULTS.md from the stages' JSON

    nohup .venv/bin/python benchmarks/prune_bench.py --stages unstructured,structured,layers,report \
        > runs/prune_bench.log 2>&1 &

Accuracies before/after are fp32 on every 5th test image (the 2,000-image reference subset, 82.55% for the
reference model) unless --eval-images says otherwise.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mobilenet.checkpoint import load_model  # noqa: E402
from common.files import atomic_write_text
from mobilenet.data import DataConfig, load_dataset  # noqa: E402
from prune.config import PruneConfig  # noqa: E402
from prune.pipeline import run_prune_pipeline, write_json  # noqa: E402
from prune.plots import plot_prune_layers  # noqa: E402
from prune.sweep import read_sweep_rows  # noqa: E402
from common.plots import footer_text  # noqa: E402
from prune.structured import compare_latency  # noqa: E402
from prune.sweep import per_layer_sweep  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "models" / "cifar10_mobilenetv2_w1.0.pt"
STAGES = ("unstructured", "structured", "layers", "latency", "litert", "report")


@dataclass
class BenchConfig:
    stages: str = "unstructured,structured,layers,report"   # comma-separated, in this order
    checkpoint: str = str(REFERENCE)
    out: str = str(ROOT / "runs" / "prune_bench")
    ratio: float = 0.7                  # global unstructured sparsity
    structured: float = 0.5             # fraction of expansion channels removed
    eval_images: int = 2000             # fp32 before/after accuracies: every 5th test image
    lr: float = 0.01                    # fine-tuning SGD lr per batch of 128 (cosine to 0)
    epochs: int = 3                     # fine-tuning epochs (each capped below)
    images_per_epoch: int = 20000       # training images per fine-tuning epoch
    budget_unstructured: float = 20.0   # minutes of fine-tuning, 70% global run
    budget_structured: float = 10.0     # minutes of fine-tuning, structured run
    layer_images: int = 200             # per-layer sweep subset (bf16)
    global_sweep: int = 1               # 1: run the global sweep in the unstructured stage; 0: keep its old CSV
    threads: int = 2
    results: str = str(ROOT / "benchmarks" / "RESULTS.md")   # the report stage appends/replaces its section here


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, torch {torch.__version__}, " \
           f"Python {platform.python_version()}".replace("  ", " ")


def _prune_cfg(b: BenchConfig, **kw) -> PruneConfig:
    base = dict(eval_images=b.eval_images, lr=b.lr, epochs=b.epochs, images_per_epoch=b.images_per_epoch,
                sweep_per_layer=False, bf16=True, channels_last=True, latency_repeats=30)
    base.update(kw)
    return PruneConfig(**base)


def stage_unstructured(b, model, ds):
    cfg = _prune_cfg(b, ratio=b.ratio, sweep=bool(b.global_sweep), budget_minutes=b.budget_unstructured)
    return run_prune_pipeline(model, ds, b, Path(b.out) / "unstructured", cfg=cfg, source=b.checkpoint)


def stage_structured(b, model, ds):
    cfg = _prune_cfg(b, structured=b.structured, sweep=False, budget_minutes=b.budget_structured)
    return run_prune_pipeline(model, ds, b, Path(b.out) / "structured", cfg=cfg, source=b.checkpoint)


def stage_layers(b, model, ds):
    cfg = PruneConfig(sweep_bf16=True, channels_last=True)
    out = Path(b.out) / "layers"
    out.mkdir(parents=True, exist_ok=True)
    write_json({"bench": asdict(b), "prune_config": cfg.to_dict()}, out / "prune_config.json")
    work = model.to(memory_format=torch.channels_last)
    rows = per_layer_sweep(work, ds.test.stratified(b.layer_images), cfg, csv_path=out / "sweep_layers.csv")
    plot_prune_layers(rows, out / "sweep_layers.png", footer_text(None, source="benchmarks/prune_bench.py layers"))
    return rows


def stage_latency(b, model, ds):
    """Re-time dense vs the structured stage's pruned.pt, in alternation, with more repeats (a busy machine)."""
    small, _ = load_model(Path(b.out) / "structured" / "pruned.pt")
    res = {f"b{n}": compare_latency({"dense": model, "small": small}, n, 32, reps) for n, reps in ((1, 60), (64, 12))}
    res["machine"] = _machine()
    res["loadavg_1min"] = os.getloadavg()[0]   # the machine is shared: say how busy it was
    write_json(res, Path(b.out) / "structured" / "latency.json")
    for k in ("b1", "b64"):
        print(f"latency {k}: dense {res[k]['dense']['median_ms']:.2f} ms, small {res[k]['small']['median_ms']:.2f} ms "
              f"-> {res[k]['small']['median_ms'] / res[k]['dense']['median_ms']:.3f}x")
    return res


def stage_litert(b, model, ds):
    """The structured model as a user ships it: FP32 and W8A8 LiteRT files of the dense and the pruned model,
    each validated on export, timed by the LiteRT interpreter (batch 1, 1 thread, XNNPACK) in `rounds`
    alternating rounds; the ratio is the median over rounds of small / dense."""
    import statistics
    from bench.host import HostConfig, run_host
    from export import ExportConfig, run_export
    from quantize import recipe
    from quantize.io import save_quantized
    from quantize.ptq import run_ptq
    d = Path(b.out) / "litert"
    d.mkdir(parents=True, exist_ok=True)
    small_ckpt = Path(b.out) / "structured" / "pruned.pt"
    small, _ = load_model(small_ckpt)
    files, exports = {}, {}
    for name, m, ckpt in (("dense", model, b.checkpoint), ("small", small, str(small_ckpt))):
        for kind in ("fp32", "w8a8"):
            out = d / f"{name}_{kind}.tflite"
            if not out.is_file():
                src = ckpt
                if kind == "w8a8":
                    src = str(d / f"{name}_w8a8.pt")
                    save_quantized(src, run_ptq(m, ds, recipe("W8A8"), progress=False))
                exports[f"{name}_{kind}"] = run_export(ExportConfig(checkpoint=src, out=str(out), val_images=500,
                                                                    skip_builtin=True, reported_images=50))["validation"]["passed"]
            files[f"{name}_{kind}"] = str(out)
    rounds, per_round = 5, []
    for _ in range(rounds):
        rows = run_host(HostConfig(models=list(files.values()), threads=[1], runs=200, warmup=20))
        per_round.append({k: r["median_ms"] for k, r in zip(files, rows)})
    res = {"files": files, "sizes": {k: os.path.getsize(v) for k, v in files.items()}, "rounds": per_round,
           "median_ms": {k: statistics.median(r[k] for r in per_round) for k in files},
           "ratio_fp32": statistics.median(r["small_fp32"] / r["dense_fp32"] for r in per_round),
           "ratio_w8a8": statistics.median(r["small_w8a8"] / r["dense_w8a8"] for r in per_round),
           "machine": _machine(), "loadavg_1min": os.getloadavg()[0], "commit": _git_commit(),
           "setup": "LiteRT interpreter (ai_edge_litert), batch 1, 1 thread, XNNPACK, 200 timed runs after 20 "
                    f"warm-up per file per round, {rounds} alternating rounds"}
    write_json(res, d / "litert_latency.json")
    print(f"LiteRT b1 latency small/dense: FP32 {res['ratio_fp32']:.3f}x, W8A8 {res['ratio_w8a8']:.3f}x "
          f"({res['median_ms']})")
    return res


def _stage_commits(out: Path) -> str:
    """The commit each stage ran at, where its directory records it (prune_meta.json; latency JSONs)."""
    got = []
    for st in ("unstructured", "structured", "layers", "litert"):
        for f in (out / st / "prune_meta.json", out / st / "litert_latency.json"):
            if f.is_file():
                meta = json.loads(f.read_text())
                c = (meta.get("commit") or "?")[:7] + (" (dirty)" if meta.get("commit_dirty") else "")
                got.append(f"{st} `{c}`")
                break
        else:
            if (out / st).is_dir():
                got.append(f"{st} not recorded")
    return ", ".join(got) or "not recorded"


def _pct(x):
    return f"{100 * x:.2f}%"


def stage_report(b: BenchConfig, cmd: str):
    """RESULTS.md's pruning section from every stage's files. (Long because it is one Markdown document written
    line by line in reading order; splitting it would scatter one table over several functions.)"""
    out = Path(b.out)
    cmds = [f"`{(out / st / 'command.txt').read_text().strip()}`" for st in ("unstructured", "structured", "layers",
                                                                         "latency", "litert") if (out / st / "command.txt").is_file()]
    lines = ["", "## Pruning (issue 3)", "",
             "Commands (background, `nohup ... > runs/<log>`): " + "; ".join(cmds + [f"`{cmd}`"]) + "  ",
             f"Commits: {_stage_commits(out)}; this section generated at `{_git_commit()}`  ",
             f"Machine: {_machine()}  ",
             f"Model: {b.checkpoint} (reference FP32). Accuracy: fp32, eval mode, on {b.eval_images or 10000} "
             f"test images (every 5th of the 10,000; reference 82.55%), one run each, measured in the same run.", ""]
    u = out / "unstructured" / "prune_report.json"
    if u.is_file():
        r = json.loads(u.read_text())
        pc = json.loads((out / "unstructured" / "prune_config.json").read_text())["prune_config"]
        lines += ["### Global L1 sweep (no fine-tuning; bf16 eval on 2,000 images, drop vs the bf16 baseline)", "",
                  "| ratio | sparsity reached | top-1 | drop (points) |", "|---|---|---|---|"]
        sweep = list(csv.DictReader(open(out / "unstructured" / "sweep_global.csv")))
        lines += [f"| {float(s['ratio']):.2f} | {_pct(float(s['reached_sparsity']))} | {_pct(float(s['acc']))} | "
                  f"{float(s['drop_points']):+.2f} |" for s in sweep]
        ft = r.get("finetune", {})
        lines += ["", f"### {int(100 * b.ratio)}% global unstructured + fine-tuning", "",
                  f"- baseline {_pct(r['acc_baseline'])}, pruned {_pct(r.get('acc_pruned', float('nan')))}, "
                  f"after BN re-estimation {_pct(r.get('acc_bn_recalibrated', float('nan')))}, fine-tuned {_pct(r['acc_final'])}: **drop {r['drop_points']:+.2f} points** (goal <= 1)",
                  f"- fine-tuning: SGD lr {pc['lr']} cosine (by steps or time, whichever ends first), bf16 + "
                  f"channels_last, {ft.get('steps')} steps of {pc['batch_size']} ({ft.get('images')} images) in "
                  f"{ft.get('seconds')} s (budget {pc['budget_minutes']} min; {ft.get('planned_steps')} steps planned)",
                  f"- global sparsity {_pct(r['global_sparsity'])} over pruned layers (stem conv kept dense), "
                  f"{_pct(r['total_sparsity'])} over all conv/linear weights; {r['nonzero']:,} of {r['numel']:,} "
                  f"non-zero",
                  f"- weights: dense {r['size_baseline']['dense_bytes']:,} B; gzip of the state_dict "
                  f"{r['size_baseline']['gzip_bytes']:,} B -> {r['size_pruned']['gzip_bytes']:,} B",
                  f"- files: {out}/unstructured/ (pruned.pt, prune_report.json, prune_layers.csv, "
                  f"sweep_global.png)"]
    s = out / "structured" / "prune_report.json"
    if s.is_file():
        r = json.loads(s.read_text())
        pc = json.loads((out / "structured" / "prune_config.json").read_text())["prune_config"]
        bb, aa = r["structured_before"], r["structured_after"]
        lat = r["structured_latency_ratio"]
        lj = out / "structured" / "latency.json"
        if lj.is_file():   # the re-timing in alternation with more repeats replaces the pipeline's own figures
            L = json.loads(lj.read_text())
            for n in ("b1", "b64"):
                bb[f"latency_{n}"], aa[f"latency_{n}"] = L[n]["dense"], L[n]["small"]
                lat[f"latency_{n}"] = L[n]["small"]["median_ms"] / L[n]["dense"]["median_ms"]
            load_note = f"; 1-min load average {L.get('loadavg_1min', float('nan')):.1f} on 2 cores while timing"
        else:
            load_note = ""
        lines += ["", f"### {int(100 * b.structured)}% structured (expansion channels)", "",
                  "| | params | MACs/image | torch CPU latency b1 (median) | b64 (median) |", "|---|---|---|---|---|",
                  f"| dense | {bb['params']:,} | {bb['macs']:,} | {bb['latency_b1']['median_ms']:.2f} ms | "
                  f"{bb['latency_b64']['median_ms']:.1f} ms |",
                  f"| pruned | {aa['params']:,} | {aa['macs']:,} | {aa['latency_b1']['median_ms']:.2f} ms | "
                  f"{aa['latency_b64']['median_ms']:.1f} ms |",
                  f"| ratio | {aa['params'] / bb['params']:.3f} | {aa['macs'] / bb['macs']:.3f} | "
                  f"**{lat['latency_b1']:.3f}x** | **{lat['latency_b64']:.3f}x** |", "",
                  f"- latency: torch fp32 eval, channels_last, dense and pruned timed in alternation, {bb['latency_b1']['threads']} thread(s), median of "
                  f"{bb['latency_b1']['repeats']} (b1) / {bb['latency_b64']['repeats']} (b64) runs (goal <= 0.6x)"
                  f"{load_note}",
                  f"- accuracy: baseline {_pct(r['acc_baseline'])}, after removal {_pct(r['acc_structured'])}, "
                  f"after BN re-estimation {_pct(r.get('acc_bn_recalibrated', float('nan')))}, "
                  f"fine-tuned {_pct(r['acc_final'])}: drop {r['drop_points']:+.2f} points "
                  f"({r.get('finetune', {}).get('steps')} steps of {pc['batch_size']}, SGD lr {pc['lr']}, budget "
                  f"{pc['budget_minutes']} min)",
                  f"- files: {out}/structured/"]
        lt = out / "litert" / "litert_latency.json"
        if lt.is_file():
            L = json.loads(lt.read_text())
            med, sz = L["median_ms"], L["sizes"]
            lines += ["", "As shipped (LiteRT files; " + L["setup"] + f"; 1-min load average "
                      f"{L['loadavg_1min']:.1f}; commit {L['commit']}):", "",
                      "| file | dense | pruned | pruned / dense |", "|---|---|---|---|",
                      f"| FP32 latency b1 (median) | {med['dense_fp32']:.3f} ms | {med['small_fp32']:.3f} ms | "
                      f"**{L['ratio_fp32']:.3f}x** |",
                      f"| W8A8 latency b1 (median) | {med['dense_w8a8']:.3f} ms | {med['small_w8a8']:.3f} ms | "
                      f"**{L['ratio_w8a8']:.3f}x** |",
                      f"| FP32 file size | {sz['dense_fp32']:,} B | {sz['small_fp32']:,} B | "
                      f"{sz['small_fp32'] / sz['dense_fp32']:.3f}x |",
                      f"| W8A8 file size | {sz['dense_w8a8']:,} B | {sz['small_w8a8']:,} B | "
                      f"{sz['small_w8a8'] / sz['dense_w8a8']:.3f}x |"]
    lay = out / "layers" / "sweep_layers.csv"
    if lay.is_file():
        rows = [r for r in csv.DictReader(open(lay)) if r["layer"] != "(none)"]
        worst = sorted(rows, key=lambda r: -float(r["drop_points"]))[:5]
        n_img = rows[0]["images"] if rows else "?"
        plot_prune_layers(read_sweep_rows(lay), lay.with_suffix(".png"),   # redrawn from the CSV, also for a partial sweep
                          footer_text(None, source=f"benchmarks/prune_bench.py, {lay}"))
        lines += ["", f"### Per-layer sweep ({len(rows)} of {53 * 5} trials, bf16 on {n_img} evenly spaced test "
                      f"images, drop vs the unpruned model on the same images)", "",
                  "Most sensitive trials: " + "; ".join(f"{r['layer']} ({r['kind']}) at {r['ratio']}: "
                                                      f"{float(r['drop_points']):+.1f}" for r in worst),
                  f"Heat map: {lay.with_suffix('.png')}, table: {lay}"]
    notes = out / "notes.md"   # hand-written remarks kept beside the results, included on every re-run
    if notes.is_file():
        lines += ["", "### Notes", "", notes.read_text().strip()]
    results = Path(b.results)
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    if "## Pruning (issue 3)" in old:   # replace our own section only, leave the others
        head, _, rest = old.partition("\n## Pruning (issue 3)")
        nxt = rest.find("\n## ")
        old = head + (rest[nxt:] if nxt >= 0 else "")
    atomic_write_text(old.rstrip("\n") + "\n" + "\n".join(lines) + "\n", results)
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in asdict(BenchConfig()).items():
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=type(v), default=v)
    b = BenchConfig(**vars(p.parse_args(argv)))
    stages = [s.strip() for s in b.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        print(f"unknown stage(s) {bad}; expected some of {STAGES}", file=sys.stderr)
        return 2
    torch.set_num_threads(b.threads)
    cmd = "python benchmarks/prune_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ds = None
    for st in stages:
        t = time.monotonic()
        print(f"== stage {st} ==", flush=True)
        if st != "report":
            atomic_write_text(cmd + "\n", Path(b.out) / st / "command.txt")
        if st == "report":
            stage_report(b, cmd)
            continue
        if ds is None and st != "latency":
            ds = load_dataset(DataConfig())
        model, _ = load_model(b.checkpoint)
        {"unstructured": stage_unstructured, "structured": stage_structured, "layers": stage_layers,
         "latency": stage_latency, "litert": stage_litert}[st](b, model, ds)
        print(f"== stage {st} done in {time.monotonic() - t:.0f} s ==", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
