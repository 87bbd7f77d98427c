"""Checkpoints: atomic saves of plain contents, loading that never runs code, and one-line errors for every malformed file.

Our format is a dict saved with `torch.save`:

    {"format": "mnv2-compress", "kind": "fp32" | "pruned" | "quantized",
     "model_config": ModelConfig as a dict, "model": state_dict, ...anything else the writer adds}

A plain torchvision `mobilenet_v2` state_dict (the reference checkpoint in ../shared/models) loads too.

A checkpoint holds only tensors, numbers, strings and plain dicts, lists and tuples (configs as dicts, never
dataclasses), so `torch.load(weights_only=True)` reads everything we write, and a file from elsewhere that asks
the unpickler to call anything is refused before any of it runs. `check_checkpoint` is the one place that says
what a usable checkpoint is; quantize.io adds the checks of a quantized one.
"""
from __future__ import annotations

import enum
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.files import atomic_write

from .model import InvertedResidual, MobileNetV2, ModelConfig, build_model

__all__ = ["CheckpointError", "atomic_save", "load_checkpoint", "check_checkpoint", "check_tensors",
           "model_config_of", "load_model", "from_torchvision_state_dict", "to_torchvision_state_dict", "FORMAT",
           "KINDS"]

FORMAT = "mnv2-compress"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model asked for."""


_SCALARS = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _plain(obj, where: str):
    """`obj` as what `torch.load(weights_only=True)` reads back: tensors, numbers, strings, None and dicts, lists
    and tuples of them. Numpy scalars and subclasses of str / int / float (torch.__version__) become the plain
    value; anything else (an array, a dataclass, a function) is a TypeError naming where it sits."""
    if isinstance(obj, torch.Tensor) or type(obj) in _SCALARS:
        return obj
    if isinstance(obj, (np.number, np.bool_, np.str_)):
        return obj.item()
    for base in (str, int, float):
        if isinstance(obj, base) and not isinstance(obj, enum.Enum):
            return base(obj)
    if type(obj) in (dict, OrderedDict):
        items = [(_plain(k, f"{where} key"), _plain(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, obj.items())):
            return obj                      # unchanged: keep the object (a state_dict keeps its _metadata)
        return type(obj)(items)
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only "
                    f"tensors, numbers, strings and plain dicts, lists and tuples (weights_only loading)")


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a file. Only plain
    contents are written (see `_plain`), so that every file we write loads with `weights_only=True`."""
    obj = _plain(obj, "checkpoint")
    return atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------------- loading

def _one_line(e: BaseException, limit: int = 160) -> str:
    """The informative part of a loader's message: torch's unpickler and zip reader add paragraphs of advice."""
    m = re.search(r"WeightsUnpickler error: (.+)", str(e))
    text = m.group(1) if m else (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit] + " ..."


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at `path`, loaded without running code (`weights_only=True`: a pickle that names any
    Python callable is refused, never executed) and checked (`check_checkpoint`). CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch words it two ways: a global not on its allow-list, and one from a module it blocks outright (os, ...)
        m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        if m:
            raise CheckpointError(f"checkpoint {path} asks to run Python code ({m.group(1)}) when loaded; refused "
                                  f"(only tensors, numbers, strings and plain containers are loaded). If it is an "
                                  f"old file of your own, load it in a trusted session and save it again") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file ({_one_line(e)})") from None
    except Exception as e:  # truncated, not a zip, a damaged record ...
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file "
                              f"({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    if obj.get("format") != FORMAT and not _is_torchvision_state_dict(obj):
        raise CheckpointError(f"checkpoint {path} is neither an mnv2-compress checkpoint nor a torchvision "
                              f"mobilenet_v2 state_dict (first keys: {[_short(k) for k in list(obj)[:4]]})")
    check_checkpoint(obj, str(path))
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


def _infer_config(sd: dict, base: dict) -> ModelConfig:
    """Fill width and classes from a torchvision state_dict's shapes where the caller gave none."""
    cfg = dict(base)
    cfg.setdefault("num_classes", int(sd["classifier.1.weight"].shape[0]))
    cfg.setdefault("width_mult", float(sd["features.0.0.weight"].shape[0]) / 32)
    return ModelConfig(**cfg)


# ---------------------------------------------------------------------------------------------- checks

KINDS = ("fp32", "pruned", "quantized")
# what every checkpoint of our format holds; a kind's own keys (quant_config, optimizer, ...) its loader checks
_REQUIRED = {"kind": str, "model_config": dict, "model": dict}
_CONFIG_TYPES = {"layout": (str,), "width_mult": (int, float), "num_classes": (int,), "dropout": (int, float),
                 "hidden_channels": (list, tuple, type(None)), "resolution": (int, type(None))}


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:60] + "..."


def _type_error(where: str, what: str, value, want: tuple) -> CheckpointError:
    names = " or ".join("None" if t is type(None) else t.__name__ for t in want)
    return CheckpointError(f"{where}: {what} is a {type(value).__name__} ({_short(value)}), not {names}")


def model_config_of(ckpt: dict, where: str) -> ModelConfig:
    """The ModelConfig of one of our checkpoints, every field of the right type; CheckpointError otherwise."""
    raw = ckpt["model_config"]
    for k, v in raw.items():
        want = _CONFIG_TYPES.get(k)
        if want is None:
            raise CheckpointError(f"{where}: model_config has an unknown key {_short(k)}")
        if isinstance(v, bool) or not isinstance(v, want):
            raise _type_error(where, f"model_config {k!r}", v, want)
    bad = [h for h in raw.get("hidden_channels") or [] if isinstance(h, bool) or not isinstance(h, int) or h < 1]
    if bad:
        raise CheckpointError(f"{where}: model_config hidden_channels holds {_short(bad[0])}, not a count >= 1")
    try:
        return ModelConfig(**raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: model_config {_short(raw)} is not valid: {e}") from None


def check_tensors(sd: dict, where: str, what: str, finite=lambda key: True):
    """CheckpointError unless `sd` maps strings to tensors, those where finite(key) holds free of NaN and Inf."""
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: {what} has a key {_short(k)} that is not a string")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where}: {what} entry {k!r} is a {type(v).__name__}, not a tensor")
        if finite(k) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{where}: {k!r} holds {int((~torch.isfinite(v)).sum())} NaN or infinite "
                                  f"value(s) of {v.numel()}")


def _shape_model(cfg: ModelConfig, where: str) -> MobileNetV2:
    """The model `cfg` describes, on the meta device: shapes without memory, whatever size a file claims."""
    try:
        with torch.device("meta"):
            return build_model(cfg)
    except ValueError as e:
        raise CheckpointError(f"{where}: model_config {cfg.to_dict()} does not build a network: {e}") from None


def _check_hidden(sd: dict, model: MobileNetV2, where: str):
    """Each block's stated hidden width against its depthwise conv, the one layer every block has."""
    blocks = [(i, b) for i, b in enumerate(model.features) if isinstance(b, InvertedResidual)]
    for n, (i, blk) in enumerate(blocks):
        key = f"features.{i}.conv.{len(blk.conv) - 2}.0.weight"                    # dw
        if key in sd and sd[key].dim() == 4 and sd[key].shape[0] != model.cfg.hidden_channels[n]:
            raise CheckpointError(f"{where}: model_config hidden_channels[{n}] is {model.cfg.hidden_channels[n]} "
                                  f"but the weights of block {n} ({key}) have {sd[key].shape[0]} channels")


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


def check_checkpoint(ckpt: dict, where: str):
    """CheckpointError naming `where` and the fault unless `ckpt` can be used. Our format: the keys of
    _REQUIRED with their types, a model config of the right types that builds, every weight a finite tensor,
    and (fp32 / pruned) every shape and hidden width what the config makes, masks shaped like their weights.
    A torchvision state_dict: finite tensors (its shapes are checked against the config it is loaded into).
    A quantized checkpoint: the keys and types here; finite weights, shapes and scales where it is rebuilt
    (quantize.io)."""
    if ckpt.get("format") != FORMAT:
        check_tensors(ckpt, where, "state_dict")
        return
    for key, typ in _REQUIRED.items():
        if key not in ckpt:
            raise CheckpointError(f"{where}: an {FORMAT} checkpoint without {key!r} "
                                  f"(it has {sorted(map(str, ckpt))[:8]})")
        if not isinstance(ckpt[key], typ):
            raise _type_error(where, repr(key), ckpt[key], (typ,))
    if ckpt["kind"] not in KINDS:
        raise CheckpointError(f"{where}: unknown kind {_short(ckpt['kind'])}; expected one of {KINDS}")
    cfg = model_config_of(ckpt, where)
    sd = ckpt["model"]
    if ckpt["kind"] == "quantized":     # its observers may hold +-inf by design: quantize.io checks the rest
        check_tensors(sd, where, "model", finite=lambda key: False)
        return
    check_tensors(sd, where, "model")
    model = _shape_model(cfg, where)
    if cfg.hidden_channels is not None:
        _check_hidden(sd, model, where)
    _check_shapes(sd, model, where)
    masks = ckpt.get("masks")
    if masks is not None:
        if not isinstance(masks, dict):
            raise _type_error(where, "'masks'", masks, (dict,))
        check_tensors(masks, where, "masks")
        for k, m in masks.items():
            if k not in sd or m.shape != sd[k].shape:
                raise CheckpointError(f"{where}: mask {k!r} of shape {tuple(m.shape)} fits no weight of the model")


def load_model(path_or_obj, *, layout: str | None = None, width_mult: float | None = None,
               num_classes: int | None = None, where: str = "checkpoint") -> tuple[MobileNetV2, dict]:
    """Build our model from a checkpoint file (or an already loaded dict, which `where` names in errors).
    Returns (model in eval mode, checkpoint).

    Arguments given here must agree with the checkpoint's own model config; for a torchvision state_dict, which
    carries none, they fill it (layout defaults to "cifar", width and classes are read from the shapes).
    """
    if isinstance(path_or_obj, dict):
        ckpt = path_or_obj
        check_checkpoint(ckpt, where)
    else:
        ckpt, where = load_checkpoint(path_or_obj), str(path_or_obj)
    asked = {k: v for k, v in (("layout", layout), ("width_mult", width_mult), ("num_classes", num_classes))
             if v is not None}
    if ckpt.get("format") == FORMAT:
        cfg = model_config_of(ckpt, where)
        for k, v in asked.items():
            if getattr(cfg, k) != v:
                raise CheckpointError(f"{where} holds a model with {k}={getattr(cfg, k)!r}, not {v!r}")
        sd = ckpt["model"]
    else:
        asked.setdefault("layout", "cifar")
        try:
            cfg = _infer_config(ckpt, asked)
        except (IndexError, ValueError) as e:        # a 0-d tensor, a width of 0
            raise CheckpointError(f"{where}: no model fits the state_dict's shapes ({e})") from None
        shapes = _shape_model(cfg, where)
        try:
            sd = from_torchvision_state_dict(ckpt, shapes)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        ckpt = {"format": FORMAT, "kind": "fp32", "model_config": cfg.to_dict(), "model": sd,
                "source": "torchvision state_dict"}
    _check_shapes(sd, _shape_model(cfg, where), where)    # before the real model: its size is then the file's
    model = build_model(cfg)
    model.load_state_dict(sd)
    return model.eval(), ckpt
