"""Streaming data larger than the memory budget (issue 14, point 3): peak memory of the whole process tree while
train.py streams a generated 12,000-photo tree at 224x224, and the throughput of streaming against the in-memory
path on a subset small enough for both, in one run.

    python benchmarks/stream_bench.py                          # generate into a temp dir, measure, delete it
    python benchmarks/stream_bench.py --work /tmp/stream-bench # keep the tree there and reuse it next time

1. Generate (or reuse) `--images` training and `--test-images` test JPEGs of `--size` pixels in `--classes`
   classes: smooth colour gradients, a few blurred blobs and sensor-like noise, so they decode like photos
   (a noise-free gradient would compress to almost nothing).
2. Big run: `train.py --data-mode auto --memory-budget F` with F chosen so that the tree's decoded size
   (images x 3 x 224 x 224 bytes) is over the budget: auto must pick the streaming path (checked in metrics.json).
   The process tree (train.py and its DataLoader workers) is sampled every 0.2 s from /proc/<pid>/smaps_rollup:
   the peaks of the main process's RSS, of the summed PSS (shared pages divided among their processes; library
   pages shared with other programs on the machine count only in part, so a busy machine lowers it), of the
   summed anonymous PSS (the tree's own heap, counted once however the workers share it) and of the summed RSS
   (forked workers' pages shared with the parent counted once per process: an over-count). Both the tree's PSS
   and the main process's RSS must stay under `--limit-gb`. `--extra-batch` repeats the big run at that batch
   size, for the record.
3. Rounds on the first `--subset` training images (symlinks): each round runs `--data-mode memory` and
   `--data-mode stream` (alternating which goes first), the same model, seed and steps; the throughput is
   train.py's own images/s over the training epoch (decoding the in-memory cache happens before it and is not
   counted). Per path min/median/max over `--repeats` rounds, and per round the ratio stream / memory (the
   reference), so load from other programs falls on both paths alike. The 1-minute load average is read
   before every run.
Every figure is printed with the CPU and the load; the ratios come from this one run.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.cli import Parser, add_config, opt  # noqa: E402
from common.machine import cpu_summary  # noqa: E402

__all__ = ["StreamBenchConfig", "main"]


@dataclass
class StreamBenchConfig:
    work: str = opt("", "directory for the generated tree and the runs, reused when present (default: a temp "
                        "directory, deleted at the end)")
    images: int = opt(12000, "training images to generate")
    test_images: int = opt(500, "test images to generate")
    classes: int = opt(10, "classes (folders)")
    size: int = opt(256, "generated image height; widths vary from it to 1.25x it")
    resolution: int = opt(224, "training input size")
    width: float = opt(0.35, "width multiplier of the model")
    # the FP32 training step of this model at 224 keeps ~37 MB of activations per image, on top of ~0.93 GB that
    # importing torch and torchvision maps: at 16 images the main process alone peaks near 1.6 GB, whatever the data
    batch_size: int = opt(8, "images per step")
    extra_batch: int = opt(16, "also run the big streamed run at this batch size, for the record (0: no)")
    steps: int = opt(40, "training steps of the big streamed run")
    subset: int = opt(640, "training images of the memory-vs-stream comparison")
    subset_steps: int = opt(15, "training steps of each comparison run")
    repeats: int = opt(3, "comparison rounds, each one run per mode (the first alternating)")
    workers: int = opt(2, "DataLoader workers of the streamed runs")
    limit_gb: float = opt(1.5, "peak PSS of the streamed run's tree and its main RSS must stay under this, GB")


# ---------------------------------------------------------------------------------------------- the images

def _photo(rng: np.random.Generator, h: int, w: int, noise: np.ndarray):
    """A PIL RGB image (w x h): a colour gradient and three blobs drawn at 1/8 scale and upsampled (smooth, as
    photos are), plus a random window of `noise` (sensor-like grain). ~200 images/s on one core, JPEG included."""
    from PIL import Image
    sh, sw = h // 8 + 1, w // 8 + 1
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / (sh + sw) + 0.5
    small = c0 + (c1 - c0) * t[..., None]
    for _ in range(3):
        cy, cx, r = rng.uniform(0, sh), rng.uniform(0, sw), rng.uniform(sh / 10, sh / 3)
        small += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-90, 90, 3)
    big = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    oy, ox = int(rng.integers(0, noise.shape[0] - h + 1)), int(rng.integers(0, noise.shape[1] - w + 1))
    img = np.asarray(big, dtype=np.int16) + noise[oy:oy + h, ox:ox + w]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def generate(tree: Path, cfg: StreamBenchConfig) -> Path:
    """The ImageFolder tree, written once: a `.complete` marker says it is whole (an interrupted run resumes)."""
    from tqdm import tqdm
    if (tree / ".complete").exists():
        return tree
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 8, (2 * cfg.size, 3 * cfg.size, 3)).astype(np.int16)
    jobs = [(s, i) for s, n in (("train", cfg.images), ("test", cfg.test_images)) for i in range(n)]
    for split, i in tqdm(jobs, desc="generate", unit="img", mininterval=1.0):
        path = tree / split / f"c{i % cfg.classes:02d}" / f"{i:06d}.jpg"
        w = int(rng.integers(cfg.size, cfg.size * 5 // 4 + 1))
        img = _photo(rng, cfg.size, w, noise)   # drawn even when the file exists, so a resumed tree is the same
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path.with_suffix(".tmp.jpg"), quality=90)
            os.replace(path.with_suffix(".tmp.jpg"), path)
    (tree / ".complete").touch()
    return tree


def subset_tree(tree: Path, dst: Path, n: int) -> Path:
    """The first n training images by name (every class in turn) and every test image of `tree`, as symlinks."""
    if (dst / ".complete").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for split in ("train", "test"):
        files = sorted((tree / split).glob("*/*.jpg"), key=lambda f: f.name)
        for f in files[:n] if split == "train" else files:
            (dst / split / f.parent.name).mkdir(parents=True, exist_ok=True)
            (dst / split / f.parent.name / f.name).symlink_to(f)
    (dst / ".complete").touch()
    return dst


# ---------------------------------------------------------------------------------------------- memory

def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


_FIELDS = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "anon"}


def _memory(pid: int) -> dict[str, int]:
    """{"rss", "pss", "anon" (anonymous PSS)} of one process in bytes, from /proc/<pid>/smaps_rollup; zeros once
    it is gone."""
    out = dict.fromkeys(_FIELDS.values(), 0)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(maxsplit=1)[0]
                if key in _FIELDS:
                    out[_FIELDS[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (as `uptime` prints them)."""
    with open("/proc/loadavg") as f:
        return tuple(float(x) for x in f.read().split()[:3])


def run_measured(cmd: list[str]) -> dict:
    """Run cmd; the peaks of the summed RSS, PSS and anonymous PSS of its process tree, of its main process's RSS
    (0.2 s samples) and of its number of processes, and the load averages before it started."""
    peak = {"rss": 0, "pss": 0, "anon": 0, "main_rss": 0, "processes": 0, "load": load_average()}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def sample():
        while proc.poll() is None:
            pids = _tree_pids(proc.pid)
            each = [_memory(p) for p in pids]
            for k in _FIELDS.values():
                peak[k] = max(peak[k], sum(m[k] for m in each))
            peak.update(main_rss=max(peak["main_rss"], each[0]["rss"]), processes=max(peak["processes"], len(pids)))
            time.sleep(0.2)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.communicate()[0]
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"stream_bench: {' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return peak


def train(cfg: StreamBenchConfig, data: Path, out: Path, steps: int, *mode: str, batch: int = 0) -> dict:
    cmd = [sys.executable, "train.py", "--data", str(data), "--out", str(out), "--layout", "imagenet",
           "--resolution", str(cfg.resolution), "--width", str(cfg.width), "--batch-size", str(batch or cfg.batch_size),
           "--epochs", "1", "--max-steps-per-epoch", str(steps), "--budget-minutes", "0", "--eval-images", "100",
           "--calib-size", "100", "--data-workers", str(cfg.workers), "--device", "cpu", *mode]
    peak = run_measured(cmd)
    doc = json.loads((out / "metrics.json").read_text())
    return {**peak, "mode": doc["data"]["mode"], "images_per_s": doc["history"][0]["images_per_s"],
            "train_images": doc["history"][0]["train_images"], "command": " ".join(cmd[1:])}


# ---------------------------------------------------------------------------------------------- main

def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


class _Runs(dict):
    """name -> a run's figures, each printed as soon as its run ends (a long run interrupted keeps what it had)."""

    def __setitem__(self, name, r):
        super().__setitem__(name, r)
        print(f"{name:>17}: {r['mode']:>6}, {r['train_images']:5d} images, {r['images_per_s']:6.2f} img/s, peak "
              f"PSS {_gb(r['pss'])} GB (anonymous {_gb(r['anon'])}), main RSS {_gb(r['main_rss'])} GB, summed RSS "
              f"{_gb(r['rss'])} GB, {r['processes']} processes; load before {' '.join(map(str, r['load']))}",
              flush=True)


def main(argv=None) -> int:
    p = Parser(prog="benchmarks/stream_bench.py", description=__doc__.split("\n\n")[0])
    add_config(p, StreamBenchConfig)
    cfg = StreamBenchConfig(**vars(p.parse_args(argv)))
    from mobilenet.stream import memory_bytes
    work = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="stream-bench-"))
    try:
        tree = generate(work / "tree", cfg)
        decoded = (cfg.images + cfg.test_images) * 3 * cfg.resolution ** 2
        budget = float(f"{0.5 * decoded / memory_bytes():.3g}")   # half the decoded size: auto has to stream
        print(f"CPU: {cpu_summary()}; {os.cpu_count()} cores; RAM {memory_bytes() / 2 ** 30:.1f} GiB")
        print(f"tree: {cfg.images} + {cfg.test_images} JPEGs, {cfg.size} px high, decoded at {cfg.resolution}: "
              f"{decoded / 1e9:.2f} GB; --memory-budget {budget} = {budget * memory_bytes() / 1e9:.2f} GB")
        auto = ("--data-mode", "auto", "--memory-budget", str(budget))
        big = f"streamed {cfg.images // 1000}k"
        runs = _Runs()
        runs[big] = train(cfg, tree, work / "runs" / "big", cfg.steps, *auto)
        assert runs[big]["mode"] == "stream", "auto should have streamed the tree"
        if cfg.extra_batch:
            runs[f"{big} b{cfg.extra_batch}"] = train(cfg, tree, work / "runs" / f"big-b{cfg.extra_batch}",
                                                      cfg.steps, *auto, batch=cfg.extra_batch)
        small = subset_tree(tree, work / f"subset{cfg.subset}", cfg.subset)
        for r in range(cfg.repeats):
            for mode in ("memory", "stream") if r % 2 == 0 else ("stream", "memory"):
                runs[f"subset {mode} {r + 1}"] = train(cfg, small, work / "runs" / f"subset-{mode}-{r + 1}",
                                                       cfg.subset_steps, "--data-mode", mode)
    finally:
        if not cfg.work:
            shutil.rmtree(work, ignore_errors=True)
    speed = {m: [runs[f"subset {m} {r + 1}"]["images_per_s"] for r in range(cfg.repeats)] for m in ("memory", "stream")}
    for m, xs in speed.items():
        print(f"subset {m:>6} img/s: min {min(xs):.2f}, median {statistics.median(xs):.2f}, max {max(xs):.2f}")
    ratios = [s / m for s, m in zip(speed["stream"], speed["memory"])]
    print(f"stream / memory (the reference) throughput per round (subset of {cfg.subset}, {cfg.subset_steps} steps of "
          f"{cfg.batch_size}): {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}, "
          f"min {min(ratios):.2f}, max {max(ratios):.2f}")
    loads = [r["load"][0] for r in runs.values()]
    print(f"load average (1 min) before the runs: {min(loads):.2f}-{max(loads):.2f}")
    r = runs[big]
    ok = r["pss"] < cfg.limit_gb * 1e9 and r["main_rss"] < cfg.limit_gb * 1e9
    print(f"{big} (batch {cfg.batch_size}) peak PSS of the tree {_gb(r['pss'])} GB, main RSS {_gb(r['main_rss'])} "
          f"GB / limit {cfg.limit_gb} GB: {'under' if ok else 'OVER'}")
    print(f"commands: {json.dumps({k: r['command'] for k, r in runs.items()}, indent=1)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
