"""The machine a figure was measured on: the CPU's name and the instruction sets that decide int8 and bf16 speed.

Every speed figure names these (bench prints and records them, provenance saves them), because the same file
runs at different relative speeds on different CPUs: int8 gains over FP32 need VNNI (x86) or dot-product (ARM)
instructions, and bf16 gains need native bf16.
"""
from __future__ import annotations

import functools
import platform

__all__ = ["BF16_FLAGS", "cpu_flags", "cpu_isa", "cpu_name", "cpu_summary"]

# /proc/cpuinfo flags that mean a native bf16 dot product on x86
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isa(flags: frozenset[str] | None = None) -> str:
    """The instruction sets that decide our speed, e.g. 'AVX2' or 'AVX-512 VNNI, bf16': int8 gains over FP32 need
    VNNI (x86) or dot-product (ARM) instructions, bf16 gains need native bf16."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return platform.machine() or "unknown"
    if "asimd" in flags:  # ARM
        parts = ["NEON"] + (["dotprod"] if "asimddp" in flags else []) + (["bf16"] if "bf16" in flags else [])
        return ", ".join(parts)
    if "avx512f" in flags:
        parts = ["AVX-512" + (" VNNI" if "avx512_vnni" in flags else "")]
    elif "avx2" in flags:
        parts = ["AVX2" + (" VNNI" if "avx_vnni" in flags else "")]
    else:
        parts = ["SSE"]
    if any(f in flags for f in BF16_FLAGS):
        parts.append("bf16")
    if "amx_tile" in flags:
        parts.append("AMX")
    return ", ".join(parts)


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name, e.g. 'AMD EPYC'."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_summary() -> str:
    """What every speed figure names: the CPU and the instruction sets that decide its int8 and bf16 speed,
    e.g. 'AMD EPYC (AVX2)' or 'AMD EPYC (AVX-512 VNNI, bf16)'."""
    return f"{cpu_name()} ({cpu_isa()})"
