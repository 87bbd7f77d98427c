"""Quantized checkpoints: written atomically, rebuilt into a frozen, ready-to-run QMobileNet.

    {"format": "mnv2-compress", "kind": "quantized",
     "model_config": ModelConfig dict, "quant_config": QuantConfig dict,
     "qat": True when quantization-aware training produced it,
     "model": QMobileNet.state_dict()   (BN kept for QAT simulation appears as `.bn.` keys; PTQ has none),
     "qparams": {module path: FakeQuant.qparams_dict()} for every weight and activation point (readable copy),
     "metrics": dict, "source_checkpoint": str, "masks": pruning masks when the source had them, ...extra}

Loading checks what mobilenet.checkpoint.check_checkpoint checks of every checkpoint, then what only a quantized
one has: a quant config of the right types, the saved state against the simulation it describes, finite weights
(observer ranges may be +-inf), every quantizer frozen with scales > 0 and zero-points inside its range.
"""
from __future__ import annotations

import os
from dataclasses import fields

import torch

from mobilenet.checkpoint import (FORMAT, CheckpointError, atomic_save, check_checkpoint, check_tensors,
                                  load_checkpoint, model_config_of)
from mobilenet.model import build_model

from .config import QuantConfig
from .fakequant import FakeQuant
from .qmodel import QMobileNet, prepare, qlayers

__all__ = ["save_quantized", "load_quantized", "qparams_of", "require_float_checkpoint"]

# QuantConfig field annotation -> the types a saved value may have (a checkpoint holds plain values only)
_FIELD_TYPES = {"str": (str,), "int": (int,), "bool": (bool,), "int | None": (int, type(None))}


def qparams_of(qm: QMobileNet) -> dict[str, dict]:
    return {n: m.qparams_dict() for n, m in qm.named_modules() if isinstance(m, FakeQuant)}


def save_quantized(path: str | os.PathLike, qm: QMobileNet, extra: dict | None = None):
    """Write `qm` (frozen) and `extra` (metrics, source_checkpoint, masks, qat, ...) to `path` atomically."""
    unfrozen = [n for n, m in qm.named_modules() if isinstance(m, FakeQuant) and not m.frozen]
    if unfrozen:
        raise ValueError(f"the model is not frozen ({len(unfrozen)} quantizers still observing, e.g. "
                         f"{unfrozen[0]!r}): call quantize.freeze first")
    extra = dict(extra or {})
    ckpt = {"format": FORMAT, "kind": "quantized",
            "model_config": qm.model_cfg.to_dict(), "quant_config": qm.qcfg.to_dict(),
            "qat": bool(extra.pop("qat", qm.qat)),
            "model": {k: v.detach().cpu() for k, v in qm.state_dict().items()},
            "qparams": qparams_of(qm),
            "metrics": extra.pop("metrics", {}),
            "source_checkpoint": str(extra.pop("source_checkpoint", "")),
            **extra}
    if ckpt.get("masks") is None:
        ckpt.pop("masks", None)
    return atomic_save(ckpt, path)


def _quant_config_of(ckpt: dict, where: str) -> QuantConfig:
    raw = ckpt.get("quant_config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: a quantized checkpoint needs a 'quant_config' dict, not "
                              f"{type(raw).__name__}")
    types = {f.name: f.type for f in fields(QuantConfig)}
    if "dw_bits" not in raw and isinstance(raw.get("w_bits"), int) and raw.get("w_format", "int") == "int":
        # saved before depthwise widths existed: every weight then had w_bits, so a W4 checkpoint's depthwise
        # quantizers hold 4-bit ranges that the 8-bit default would misread
        raw = {**raw, "dw_bits": raw["w_bits"]}
    for k, v in raw.items():
        want = _FIELD_TYPES.get(types.get(k))
        if want is None:
            raise CheckpointError(f"{where}: quant_config has an unknown key {k!r}")
        if (isinstance(v, bool) and bool not in want) or not isinstance(v, want):
            raise CheckpointError(f"{where}: quant_config {k!r} is a {type(v).__name__} ({v!r:.60}), not "
                                  f"{types[k]}")
    try:
        return QuantConfig(**raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: quant_config is not valid: {e}") from None


def _check_qparams(qm: QMobileNet, where: str):
    """Every quantizer frozen, its scales finite and > 0, its zero-points inside [qmin, qmax]: a zero or negative
    scale would divide by zero or flip signs in every later step, the exported file included."""
    for name, m in qm.named_modules():
        if not isinstance(m, FakeQuant):
            continue
        if not m.frozen:
            raise CheckpointError(f"{where}: quantizer {name!r} was saved unfrozen; the checkpoint is unusable")
        bad = ~(torch.isfinite(m.scale) & (m.scale > 0))
        if bool(bad.any()):
            raise CheckpointError(f"{where}: quantizer {name!r} has {int(bad.sum())} scale(s) that are not > 0, "
                                  f"e.g. {m.scale[bad].flatten()[0].item()!r}")
        zp = m.zero_point
        if bool(((zp < m.spec.qmin) | (zp > m.spec.qmax)).any()):
            raise CheckpointError(f"{where}: quantizer {name!r} has zero-points outside [{m.spec.qmin}, "
                                  f"{m.spec.qmax}]")


def _observer(key: str) -> bool:
    return ".observer." in key          # a range: +-inf until data is seen, () or (C,) shaped


def _check_shapes(sd: dict, mcfg, qcfg: QuantConfig, kept_bn: bool, where: str):
    """The saved state against the simulation the configs describe, built on the meta device (shapes without
    memory), so that the real model built next is no larger than the file's own weights."""
    try:
        with torch.device("meta"):
            shapes = prepare(build_model(mcfg).eval(), qcfg, qat=kept_bn).state_dict()
    except ValueError as e:
        raise CheckpointError(f"{where}: model_config {mcfg.to_dict()} under {qcfg.name} does not build: {e}") from None
    wrong = [k for k in shapes if k not in sd or (sd[k].shape != shapes[k].shape and not _observer(k))] + \
            [k for k in sd if k not in shapes]
    if wrong:
        k = wrong[0]
        got = tuple(sd[k].shape) if k in sd else "missing"
        want = tuple(shapes[k].shape) if k in shapes else "no such key"
        raise CheckpointError(f"{where}: the saved state does not fit model {mcfg.to_dict()} under {qcfg.name}: "
                              f"{len(wrong)} entries differ, e.g. {k!r} ({got}; the model: {want})")


def load_quantized(path_or_obj, where: str = "checkpoint") -> tuple[QMobileNet, dict]:
    """(frozen QMobileNet in eval mode, checkpoint dict). CheckpointError naming the file (`where` for a loaded
    dict) and the fault for anything but a usable quantized checkpoint (mobilenet.checkpoint.check_checkpoint,
    then the checks here)."""
    if isinstance(path_or_obj, dict):
        ckpt = path_or_obj
        check_checkpoint(ckpt, where)
    else:
        ckpt, where = load_checkpoint(path_or_obj), str(path_or_obj)
    kind = ckpt.get("kind", "a torchvision state_dict" if ckpt.get("format") != FORMAT else None)
    if ckpt.get("format") != FORMAT or kind != "quantized":
        raise CheckpointError(f"{where} is not a quantized checkpoint (kind: {kind}); produce one with "
                              f"`python -m quantize --checkpoint {where} --config W8A8 --out DIR`")
    mcfg = model_config_of(ckpt, where)
    qcfg = _quant_config_of(ckpt, where)
    sd = ckpt["model"]
    check_tensors(sd, where, "model", finite=lambda key: not _observer(key))
    kept_bn = any(".bn." in k for k in sd)                  # a QAT simulation saved before to_ptq
    _check_shapes(sd, mcfg, qcfg, kept_bn, where)
    qm = prepare(build_model(mcfg).eval(), qcfg, qat=kept_bn)
    try:
        qm.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: the saved state does not fit model {mcfg.to_dict()} under "
                              f"{qcfg.name}: {str(e).splitlines()[0]} ...") from None
    _check_qparams(qm, where)
    for m in qm.modules():
        if isinstance(m, FakeQuant):
            m.observe, m.fake_quant = False, True
    for layer in qlayers(qm).values():
        if layer.bn is not None:
            layer.bn_frozen = True
    qm.qat = kept_bn
    return qm.eval(), ckpt


def require_float_checkpoint(ckpt: dict, where: str):
    """CheckpointError when a quantized checkpoint is given where a float model is needed."""
    if ckpt.get("format") == FORMAT and ckpt.get("kind") == "quantized":
        raise CheckpointError(f"{where} is a quantized checkpoint; give the FP32 (or pruned) checkpoint it was "
                              f"made from{' (' + ckpt['source_checkpoint'] + ')' if ckpt.get('source_checkpoint') else ''}")
