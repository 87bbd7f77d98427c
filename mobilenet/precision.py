"""bf16 or FP32: one resolver for every torch compute path (training, sweep, fine-tuning, QAT, evaluation).

bf16 autocast pays only where the hardware multiplies bf16 natively; elsewhere PyTorch emulates it and the same
step runs many times slower (measured on a 2-core AVX2 EPYC, width-1.0 CIFAR training at batch 128,
channels_last: FP32 45 img/s, bf16 3.9 img/s). So the default is read off the device:

    device                                      default   why
    CUDA with bf16 (Ampere and newer)           bf16      tensor cores run bf16 natively
    CUDA without bf16                           fp32      no native bf16
    x86 CPU with AVX512_BF16 or AMX-BF16        bf16      native bf16 dot products (e.g. AMD Zen 4, Intel SPR)
    any other CPU (AVX2 only, ARM, ...)         fp32      bf16 would be emulated, ~10x slower

A path whose numbers must match float32 bit for bit (QAT's fake quantization, whose rounding must equal the
integer model's; reported accuracies compared with FP32 references) passes `exact=` with its reason, and then
defaults to FP32 whatever the hardware. The user's flag (`--bf16` / `--no-bf16`) forces either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.machine import BF16_FLAGS, cpu_flags, cpu_isa

__all__ = ["Precision", "resolve_precision", "native_bf16"]


@dataclass(frozen=True)
class Precision:
    bf16: bool          # autocast the forward pass to bf16 (weights, gradients and optimizer stay FP32)
    reason: str         # why, in one phrase a person can check

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def to_dict(self) -> dict:
        return {"dtype": self.name, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """(whether `device` runs bf16 natively, the reason)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "CUDA"
        return ok, f"{name} {'has' if ok else 'has no'} native bf16"
    if device.type != "cpu":
        return False, f"{device.type}: bf16 support unknown"
    flags = cpu_flags()
    have = [f for f in BF16_FLAGS if f in flags]
    if have:
        return True, f"the CPU has {'/'.join(f.upper() for f in have)} ({cpu_isa(flags)})"
    return False, f"the CPU has no native bf16 ({cpu_isa(flags)}): bf16 would be emulated, ~10x slower"


def resolve_precision(requested: bool | None, device: torch.device | str = "cpu", *, exact: str = "") -> Precision:
    """The precision of one compute path. `requested`: the user's --bf16 (True) / --no-bf16 (False), or None for
    the hardware's choice; `exact`: why this path needs FP32 unless the user asks otherwise (empty: it does not)."""
    if requested is not None:
        return Precision(bool(requested), "forced by --bf16" if requested else "forced by --no-bf16")
    if exact:
        return Precision(False, exact)
    ok, why = native_bf16(device)
    return Precision(ok, why)
