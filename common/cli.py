"""One command-line layer for every command: the parser is built from the command's config dataclass.

Every command (train.py, python -m prune | quantize | export | bench) describes its options as dataclass
fields made with `opt(default, help)`; `add_config` turns each field into one flag, `config_from` reads them
back, and `run_command` is the one place that turns a user error into `<prog>: error: <message>` on stderr
and exit code 2. The shared vocabulary:

    --data PATH, --data-source KIND   the images (ImageFolder tree or archive | cifar-batches | random)
    --device NAME                     the torch device (auto | cpu | cuda | cuda:N); `bench phone` times on a phone
    --eval-images N                   test images for every reported accuracy, class-stratified; 0 = all
    --val-images N                    test images the exported file and its simulation are compared on
    --data-mode auto|memory|stream    hold a folder's decoded images in memory, or read them from the files on
    --memory-budget FRACTION          demand in DataLoader workers; auto streams above FRACTION of the RAM
    --resolution N                    input height = width (train.py: of the new model; the others: run the
                                      checkpoint's model at N instead of its own)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

__all__ = ["USER_ERROR", "DATA_HELP", "DATA_SOURCE_HELP", "DATA_MODE_HELP", "MEMORY_BUDGET_HELP",
           "DEVICE_HELP", "EVAL_IMAGES_HELP", "VAL_IMAGES_HELP",
           "RESOLUTION_HELP", "CheckFailed", "opt", "Parser", "add_config", "config_from", "user_error",
           "run_command", "torch_device", "int_list", "on_off_list"]

USER_ERROR = 2   # argparse's own code for a malformed flag; every user error exits with it
DATA_HELP = "images: an ImageFolder tree (class folders) or a .tar.gz of one, e.g. the CIFAR-10 JPEG archive"
DATA_SOURCE_HELP = "folder (--data is a tree or archive) | cifar-batches (CIFAR-10 python batches) | random"
DATA_MODE_HELP = ("folder data: memory (decode every image once, keep them in RAM, cache them beside the tree) | "
                  "stream (decode each batch's files in DataLoader workers, nothing cached) | auto (stream when the "
                  "decoded images exceed --memory-budget)")
MEMORY_BUDGET_HELP = ("--data-mode auto: the fraction of this machine's RAM the decoded images may take (counted once "
                      "per process under torchrun)")
DEVICE_HELP = "torch device: auto (cuda when available) | cpu | cuda | cuda:N"
EVAL_IMAGES_HELP = ("test images behind every reported accuracy: evenly spaced over the class-sorted test set, so "
                    "class-stratified (2000 of CIFAR-10's 10,000 = every 5th); 0 = all")
VAL_IMAGES_HELP = "test images run through the exported file and compared with the simulation"
RESOLUTION_HELP = ("input height = width to run the model at, a multiple of 8 (e.g. 96, 128, 160, 192, 224); "
                   "default: the checkpoint's")


def opt(default, help: str, *, flags: tuple[str, ...] = (), positional: bool = False, metavar: str | None = None):
    """A config field that is also a command-line option (`flags`: extra names, e.g. an older spelling)."""
    meta = {"help": help, "flags": tuple(flags), "positional": positional, "metavar": metavar}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error convention: one line `<prog>: error: <message>`, exit 2, no usage."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kw)

    def error(self, message):
        self.exit(USER_ERROR, f"{self.prog}: error: {message}\n")


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def on_off_list(text: str) -> list[bool]:
    table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    out = []
    for v in text.split(","):
        if v.strip().lower() not in table:
            raise argparse.ArgumentTypeError(f"expected on/off values such as on,off; got {v!r}")
        out.append(table[v.strip().lower()])
    return out


def _kind(hint) -> tuple[typing.Callable | None, bool]:
    """(argparse type, is a switch) for a field annotation; `X | None` is read as X."""
    args = typing.get_args(hint)
    if type(None) in args:
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) > 1:      # e.g. float | str | None ("0.7" or "auto"): the config parses it
            return str, False
        hint = kinds[0]
    if hint is bool:
        return None, True
    if hint in (int, float, str):
        return hint, False
    if hint == list[int]:
        return int_list, False
    if hint == list[bool]:
        return on_off_list, False
    return str, False   # ratios, comma lists, "auto": parsed and checked by the config, which names a bad value


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(("on" if v else "off") if isinstance(v, bool) else str(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def add_config(parser: argparse.ArgumentParser, cls, *, title: str | None = None, suppress: bool = False,
               skip: typing.Iterable[str] = (), positional: typing.Iterable[str] = ()):
    """One option per field of the dataclass `cls` (in a group called `title`); the fields named in
    `positional` are positional lists instead (files). suppress=True leaves flags the user did not give out of
    the namespace, so a caller can tell given from default (train.py's --resume)."""
    positional = set(positional)
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        meta = f.metadata
        typ, switch = _kind(hints[f.name])
        kw = {"default": argparse.SUPPRESS if suppress else default,
              "help": f"{meta.get('help', '')} (default: {_shown(default)})"}
        if meta.get("positional") or f.name in positional:   # files: a list, or one optional path
            many = typing.get_origin(hints[f.name]) is list
            group.add_argument(f.name, nargs="*" if many else "?", default=default, help=meta.get("help", ""),
                               metavar=meta.get("metavar") or f.name.upper())
            continue
        flags = ["--" + f.name.replace("_", "-"), *meta.get("flags", ())]
        if switch:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(*flags, dest=f.name, type=typ, metavar=meta.get("metavar") or f.name.upper(), **kw)
    return group


def config_from(ns: argparse.Namespace | dict, cls, **override):
    """An instance of `cls` from the parsed options (fields absent from `ns` keep their defaults)."""
    given = ns if isinstance(ns, dict) else vars(ns)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in given.items() if k in names}, **override)


class CheckFailed(RuntimeError):
    """The command ran as asked, but what it made failed its own check (e.g. an export's validation): exit 1
    with the reason, nothing kept. Not the user's error, so not exit 2."""


def user_error(prog: str, message) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return USER_ERROR


def run_command(prog: str, body: typing.Callable[[], int | None],
                errors: tuple[type[BaseException], ...] = (ValueError, OSError),
                failures: tuple[type[BaseException], ...] = (CheckFailed,)) -> int:
    """Run a command's body; a user error (a ValueError: CheckpointError, DataError, ... or an OSError such as a
    missing file) becomes one line on stderr and exit code 2, a CheckFailed exit code 1. Anything else is a bug
    and keeps its traceback. `failures`: what else exits 1 with its message (a step of a longer run failing)."""
    try:
        return int(body() or 0)
    except failures as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except errors as e:
        return user_error(prog, e)


def torch_device(name: str):
    """The torch device `--device NAME` means; a name this machine cannot run raises ValueError naming it."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device should be auto, cpu, cuda or cuda:N instead of {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch can use "
                         f"(torch {torch.__version__}, cuda available: False); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device should be auto, cpu, cuda or cuda:N instead of {name!r}")
    return dev
