"""`python -m prune`: the pruning pipeline from an existing checkpoint (no training), or the sweep alone.

    python -m prune --checkpoint ../shared/models/cifar10_mobilenetv2_w1.0.pt --ratio 0.7 --out runs/prune70
    python -m prune --checkpoint CKPT --sweep-only --sweep-images 500 --out runs/sweep
    python -m prune --checkpoint CKPT --prune-structured 0.5 --no-sweep --out runs/struct50

Every PruneConfig field is an option (`--help` lists them); the settings are saved as out/prune_config.json.
"""
from __future__ import annotations

import sys
from pathlib import Path
from dataclasses import asdict, dataclass, field

import torch

from common.cli import (DATA_HELP, DATA_MODE_HELP, DATA_SOURCE_HELP, DEVICE_HELP, MEMORY_BUDGET_HELP, RESOLUTION_HELP,
                        Parser, add_config, config_from,
                        opt, run_command, torch_device)
from mobilenet.checkpoint import load_model
from mobilenet.model import with_resolution
from mobilenet.data import DEFAULT_CACHE, DEFAULT_DATA, DataConfig, load_dataset
from common.provenance import collect_meta, command_line, write_meta
from mobilenet.runs import find_input, record, runs_dir

from .config import PruneConfig
from .masks import match_layers, prunable_layers, select_layers
from .pipeline import run_prune_pipeline, run_sweeps, write_json

__all__ = ["CliConfig", "build_parser", "main"]

PROG = "python -m prune"


@dataclass
class CliConfig:
    checkpoint: str = field(default="", metadata={"help": "model to prune: our checkpoint or a torchvision "
                                                          "mobilenet_v2 state_dict (default: the latest baseline "
                                                          "recorded in runs/latest.json)"})
    out: str = field(default="", metadata={"help": "output directory (default: runs/prune, under $MNV2_RUNS)"})
    sweep_only: bool = field(default=False, metadata={"help": "run the sensitivity sweep and stop"})
    data: str = opt(DEFAULT_DATA, DATA_HELP)
    data_source: str = opt("folder", DATA_SOURCE_HELP)
    cache_dir: str = field(default=DEFAULT_CACHE, metadata={"help": "where the archive is unpacked and decoded"})
    data_mode: str = opt("auto", DATA_MODE_HELP)
    memory_budget: float = opt(0.25, MEMORY_BUDGET_HELP)
    train_images: int = field(default=0, metadata={"help": "use only the first N (strided) training images; 0 = all"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default"})
    device: str = opt("auto", DEVICE_HELP)
    resolution: int | None = opt(None, RESOLUTION_HELP)


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_config(p, CliConfig, title="input and output")
    add_config(p, PruneConfig, title="pruning")
    return p


def _split_args(ns) -> tuple[CliConfig, PruneConfig]:
    cli, cfg = config_from(ns, CliConfig), config_from(ns, PruneConfig)
    if not cli.checkpoint:
        cli.checkpoint = str(find_input(("baseline",), "--checkpoint"))
    cli.out = cli.out or str(runs_dir() / "prune")
    if cli.train_images < 0:
        raise ValueError(f"--train-images should be >= 0, not {cli.train_images}")
    if cli.threads < 0:
        raise ValueError(f"--threads should be >= 0, not {cli.threads}")
    if not cli.sweep_only and cfg.ratio is None and cfg.structured is None:
        raise ValueError("nothing to do: give --ratio/--prune RATIO|auto, --prune-structured RATIO or --sweep-only")
    return cli, cfg


def main(argv=None) -> int:
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:      # --help (0) or a malformed flag (2, message already printed)
        return int(e.code or 0)
    return run_command(PROG, lambda: _run(*_split_args(ns)))


def _run(cli: CliConfig, cfg: PruneConfig) -> int:
    if cli.threads:
        torch.set_num_threads(cli.threads)
    device = str(torch_device(cli.device))
    model, ckpt = load_model(cli.checkpoint, layout=cfg.layout)
    with_resolution(model, cli.resolution)
    select_layers(model, cfg)   # check the layer filters before the (slow) data load
    if cfg.sweep_layers:
        match_layers(cfg.sweep_layers, list(prunable_layers(model)), "--sweep-layers")
    ds = load_dataset(DataConfig(source=cli.data_source, root=cli.data, layout=cfg.layout,
                                 resolution=model.cfg.input_size, cache_dir=cli.cache_dir, seed=cfg.seed,
                                 mode=cli.data_mode, memory_budget=cli.memory_budget))
    ds.check_classes(model.cfg.num_classes, cli.checkpoint)
    if cli.train_images:
        ds.train = ds.train.subset(torch.arange(0, len(ds.train), max(1, len(ds.train) // cli.train_images))
                                   [:cli.train_images])
    if cli.sweep_only:
        Path(cli.out).mkdir(parents=True, exist_ok=True)
        write_json({"cli": asdict(cli), "prune_config": cfg.to_dict()}, Path(cli.out) / "prune_config.json")
        write_meta(Path(cli.out) / "prune_meta.json", collect_meta(command_line(), cli.checkpoint, seed=cfg.seed))
        run_sweeps(model, ds, cfg, cli.out, device)
    else:
        run_prune_pipeline(model, ds, cli, cli.out, device, cfg=cfg, source=cli.checkpoint)
        record("pruned", Path(cli.out) / "pruned.pt")
    return 0


if __name__ == "__main__":
    from common.files import exit_cleanly_on_sigterm
    exit_cleanly_on_sigterm()
    sys.exit(main())
