"""Checkpoints: atomic writes, clear errors, and loading both our own format and torchvision state_dicts.

Our format is a dict saved with `torch.save`:

    {"format": "mnv2-compress", "kind": "fp32" | "pruned" | "quantized",
     "model_config": ModelConfig as a dict, "model": state_dict, ...anything else the writer adds}

A plain torchvision `mobilenet_v2` state_dict (the reference checkpoint in ../shared/models) loads too.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn

from .model import ConvBNAct, InvertedResidual, MobileNetV2, ModelConfig, build_model

__all__ = ["CheckpointError", "atomic_save", "atomic_write_bytes", "atomic_write_text", "load_checkpoint",
           "temp_prefix", "remove_stale_temporaries", "exit_cleanly_on_sigterm",
           "load_model", "from_torchvision_state_dict", "to_torchvision_state_dict", "FORMAT"]

FORMAT = "mnv2-compress"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model asked for."""


def temp_prefix(path: str | os.PathLike) -> str:
    """Prefix of the temporary file an atomic write of `path` uses: `.NAME.PID.` (+ random + `.tmp`), so that
    one left behind by a killed process can be told from one a live process is still writing."""
    return f".{Path(path).name}.{os.getpid()}."


_TEMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files in `directory` whose writer is dead (SIGKILL, power loss: nothing can clean
    up after those); files of live processes are left alone. Returns what was removed."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for f in d.iterdir():
        m = _TEMP.match(f.name)
        if not m or not f.is_file():
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue            # alive (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        f.unlink(missing_ok=True)
        removed.append(f)
    return removed


def exit_cleanly_on_sigterm():
    """Make SIGTERM (`kill`, a CI or batch-system timeout) raise SystemExit(143), as Ctrl-C raises
    KeyboardInterrupt, so that the `except BaseException` clean-up of every atomic write runs and no temporary
    file is left behind. Called by each command-line entry point."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    return _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    return _atomic(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write_bytes(text.encode(), path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a zip, not a pickle...
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    if obj.get("format") != FORMAT and not _is_torchvision_state_dict(obj):
        raise CheckpointError(f"checkpoint {path} is neither an mnv2-compress checkpoint nor a torchvision "
                              f"mobilenet_v2 state_dict (first keys: {list(obj)[:4]})")
    return obj


def _is_torchvision_state_dict(sd: dict) -> bool:
    return "features.0.0.weight" in sd and "classifier.1.weight" in sd and "features.1.conv.1.weight" in sd


def _key_map(model: MobileNetV2) -> dict[str, str]:
    """our key -> torchvision key. Only the pw-linear conv/BN of each block are named differently:
    ours `features.i.conv.j.0.*` / `.j.1.*` is torchvision's `features.i.conv.j.*` / `.(j+1).*`."""
    mapping = {}
    for name in model.state_dict():
        mapping[name] = name
    for i, blk in enumerate(model.features):
        if not isinstance(blk, InvertedResidual):
            continue
        j = len(blk.conv) - 1
        for sub, sub_mod in (("0", blk.conv[j][0]), ("1", blk.conv[j][1])):
            for p in sub_mod.state_dict():
                ours = f"features.{i}.conv.{j}.{sub}.{p}"
                mapping[ours] = f"features.{i}.conv.{j + int(sub)}.{p}"
    return mapping


def from_torchvision_state_dict(sd: dict, model: MobileNetV2) -> dict:
    mapping = _key_map(model)
    missing = [tv for tv in mapping.values() if tv not in sd]
    if missing:
        raise CheckpointError(f"torchvision state_dict lacks {len(missing)} keys, e.g. {missing[:3]}")
    return {ours: sd[tv] for ours, tv in mapping.items()}


def to_torchvision_state_dict(model: MobileNetV2) -> dict:
    sd = model.state_dict()
    return {tv: sd[ours] for ours, tv in _key_map(model).items()}


def _infer_config(sd: dict, tv: bool, base: dict) -> ModelConfig:
    """Fill width, classes and per-block hidden widths from a state_dict's shapes where the caller gave none."""
    cfg = dict(base)
    cfg.setdefault("num_classes", int(sd["classifier.1.weight"].shape[0]))
    cfg.setdefault("width_mult", float(sd["features.0.0.weight"].shape[0]) / 32)
    return ModelConfig(**cfg)


def _check_shapes(sd: dict, model: nn.Module, where: str):
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            raise CheckpointError(f"{where}: missing key {k!r}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: {k!r} has shape {tuple(sd[k].shape)} but the model "
                                  f"({model.cfg.to_dict()}) expects {tuple(v.shape)}; "
                                  f"is it a checkpoint of another width, class count or layout?")
    extra = [k for k in sd if k not in own]
    if extra:
        raise CheckpointError(f"{where}: unexpected keys, e.g. {extra[:3]}")


def load_model(path_or_obj, *, layout: str | None = None, width_mult: float | None = None,
               num_classes: int | None = None) -> tuple[MobileNetV2, dict]:
    """Build our model from a checkpoint file (or an already loaded dict). Returns (model in eval mode, checkpoint).

    Arguments given here must agree with the checkpoint's own model config; for a torchvision state_dict, which
    carries none, they fill it (layout defaults to "cifar", width and classes are read from the shapes).
    """
    ckpt = load_checkpoint(path_or_obj) if not isinstance(path_or_obj, dict) else path_or_obj
    where = str(path_or_obj) if not isinstance(path_or_obj, dict) else "checkpoint"
    asked = {k: v for k, v in (("layout", layout), ("width_mult", width_mult), ("num_classes", num_classes))
             if v is not None}
    if ckpt.get("format") == FORMAT:
        cfg = ModelConfig(**ckpt["model_config"])
        for k, v in asked.items():
            if getattr(cfg, k) != v:
                raise CheckpointError(f"{where} holds a model with {k}={getattr(cfg, k)!r}, not {v!r}")
        model = build_model(cfg)
        sd = ckpt["model"]
    else:
        asked.setdefault("layout", "cifar")
        cfg = _infer_config(ckpt, True, asked)
        model = build_model(cfg)
        try:
            sd = from_torchvision_state_dict(ckpt, model)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from e
        ckpt = {"format": FORMAT, "kind": "fp32", "model_config": cfg.to_dict(), "model": sd,
                "source": "torchvision state_dict"}
    _check_shapes(sd, model, where)
    model.load_state_dict(sd)
    return model.eval(), ckpt
