"""`python -m prune`: the pruning pipeline from an existing checkpoint (no training), or the sweep alone.

    python -m prune --checkpoint ../shared/models/cifar10_mobilenetv2_w1.0.pt --ratio 0.7 --out runs/prune70
    python -m prune --checkpoint CKPT --sweep-only --sweep-images 500 --out runs/sweep
    python -m prune --checkpoint CKPT --prune-structured 0.5 --no-sweep --out runs/struct50

Every PruneConfig field is an option (`--help` lists them); the settings are saved as out/prune_config.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch

from mobilenet.checkpoint import CheckpointError, load_model
from mobilenet.data import DEFAULT_CACHE, DEFAULT_DATA, DataConfig, DataError, load_dataset
from mobilenet.provenance import collect_meta, command_line, write_meta
from mobilenet.runs import find_input, record, runs_dir

from .config import PruneConfig
from .masks import match_layers, prunable_layers, select_layers
from .pipeline import run_prune_pipeline, run_sweeps, write_json

__all__ = ["CliConfig", "build_parser", "main"]


@dataclass
class CliConfig:
    checkpoint: str = field(default="", metadata={"help": "model to prune: our checkpoint or a torchvision "
                                                          "mobilenet_v2 state_dict (default: the latest baseline "
                                                          "recorded in runs/latest.json)"})
    out: str = field(default="", metadata={"help": "output directory (default: runs/prune, under $MNV2_RUNS)"})
    sweep_only: bool = field(default=False, metadata={"help": "run the sensitivity sweep and stop"})
    data: str = field(default=DEFAULT_DATA, metadata={"help": "CIFAR-10 JPEG archive or ImageFolder tree"})
    data_source: str = field(default="folder", metadata={"help": "folder | cifar-batches | random"})
    cache_dir: str = field(default=DEFAULT_CACHE, metadata={"help": "where the archive is unpacked and decoded"})
    train_images: int = field(default=0, metadata={"help": "use only the first N (strided) training images; 0 = all"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default"})
    device: str = field(default="cpu", metadata={"help": "torch device"})


ALIASES = {"ratio": ["--prune"], "structured": ["--prune-structured"]}


def _add_fields(parser: argparse.ArgumentParser, cls, title: str):
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)   # resolves the string annotations of `from __future__ import annotations`
    for f in fields(cls):
        flags = [f"--{f.name.replace('_', '-')}"] + ALIASES.get(f.name, [])
        default = f.default if f.default is not MISSING else f.default_factory()
        hint = hints[f.name]
        kw = {"dest": f.name, "default": default, "help": f"{f.metadata.get('help', '')} (default: {default})"}
        if hint in (bool, bool | None):
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif hint in (int, float, str):
            group.add_argument(*flags, type=hint, metavar=f.name.upper(), **kw)
        else:  # optional ratios and comma lists: parsed and checked by PruneConfig, which names a bad value
            group.add_argument(*flags, type=str, metavar=f.name.upper(), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_fields(p, CliConfig, "input and output")
    _add_fields(p, PruneConfig, "pruning")
    return p


def _split_args(ns: argparse.Namespace) -> tuple[CliConfig, PruneConfig]:
    d = vars(ns)
    cli = CliConfig(**{f.name: d[f.name] for f in fields(CliConfig)})
    cfg = PruneConfig(**{f.name: d[f.name] for f in fields(PruneConfig)})
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cli, cfg = _split_args(args)
        if cli.threads:
            torch.set_num_threads(cli.threads)
        model, ckpt = load_model(cli.checkpoint, layout=cfg.layout)
        select_layers(model, cfg)   # check the layer filters before the (slow) data load
        if cfg.sweep_layers:
            match_layers(cfg.sweep_layers, list(prunable_layers(model)), "--sweep-layers")
        ds = load_dataset(DataConfig(source=cli.data_source, root=cli.data, layout=cfg.layout,
                                     cache_dir=cli.cache_dir, seed=cfg.seed))
        ds.check_classes(model.cfg.num_classes, cli.checkpoint)
        if cli.train_images:
            ds.train = ds.train.subset(torch.arange(0, len(ds.train), max(1, len(ds.train) // cli.train_images))
                                       [:cli.train_images])
        if cli.sweep_only:
            Path(cli.out).mkdir(parents=True, exist_ok=True)
            write_json({"cli": asdict(cli), "prune_config": cfg.to_dict()}, Path(cli.out) / "prune_config.json")
            write_meta(Path(cli.out) / "prune_meta.json", collect_meta(command_line(), cli.checkpoint, seed=cfg.seed))
            run_sweeps(model, ds, cfg, cli.out, cli.device)
        else:
            run_prune_pipeline(model, ds, cli, cli.out, cli.device, cfg=cfg, source=cli.checkpoint)
            record("pruned", Path(cli.out) / "pruned.pt")
    except (ValueError, CheckpointError, DataError) as e:   # user errors: one clear line, non-zero exit
        print(f"python -m prune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from mobilenet.checkpoint import exit_cleanly_on_sigterm
    exit_cleanly_on_sigterm()
    sys.exit(main())
