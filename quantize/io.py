"""Quantized checkpoints: written atomically, rebuilt into a frozen, ready-to-run QMobileNet.

    {"format": "mnv2-compress", "kind": "quantized",
     "model_config": ModelConfig dict, "quant_config": QuantConfig dict,
     "qat": True when quantization-aware training produced it,
     "model": QMobileNet.state_dict()   (BN kept for QAT simulation appears as `.bn.` keys; PTQ has none),
     "qparams": {module path: FakeQuant.qparams_dict()} for every weight and activation point (readable copy),
     "metrics": dict, "source_checkpoint": str, "masks": pruning masks when the source had them, ...extra}
"""
from __future__ import annotations

import os

import torch

from mobilenet.checkpoint import FORMAT, CheckpointError, atomic_save, load_checkpoint
from mobilenet.model import ModelConfig, build_model

from .config import QuantConfig
from .fakequant import FakeQuant
from .qmodel import QMobileNet, prepare, qlayers

__all__ = ["save_quantized", "load_quantized", "qparams_of", "require_float_checkpoint"]


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


def load_quantized(path_or_obj) -> tuple[QMobileNet, dict]:
    """(frozen QMobileNet in eval mode, checkpoint dict). CheckpointError for anything but a quantized checkpoint."""
    ckpt = load_checkpoint(path_or_obj) if not isinstance(path_or_obj, dict) else path_or_obj
    where = str(path_or_obj) if not isinstance(path_or_obj, dict) else "checkpoint"
    kind = ckpt.get("kind", "a torchvision state_dict" if ckpt.get("format") != FORMAT else None)
    if ckpt.get("format") != FORMAT or kind != "quantized":
        raise CheckpointError(f"{where} is not a quantized checkpoint (kind: {kind}); produce one with "
                              f"`python -m quantize --checkpoint {where} --config W8A8 --out DIR`")
    try:
        mcfg = ModelConfig(**ckpt["model_config"])
        qcfg = QuantConfig(**ckpt["quant_config"])
        sd = ckpt["model"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed quantized checkpoint ({type(e).__name__}: {e})") from e
    kept_bn = any(".bn." in k for k in sd)                  # a QAT simulation saved before to_ptq
    qm = prepare(build_model(mcfg).eval(), qcfg, qat=kept_bn)
    try:
        qm.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: the saved state does not fit model {mcfg.to_dict()} under "
                              f"{qcfg.name}: {str(e).splitlines()[0]} ...") from e
    for m in qm.modules():
        if isinstance(m, FakeQuant):
            if not m.frozen:
                raise CheckpointError(f"{where}: a quantizer was saved unfrozen; the checkpoint is unusable")
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
