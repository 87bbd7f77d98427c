"""Number formats shared by the report page, its findings and the plot labels, so a value reads the same everywhere.

    SNR      one decimal, dB; inf (identical outputs) as ∞       23.4 dB
    top-1    a fraction in [0, 1] shown as % with two decimals    90.50 %
    sizes    decimal units, 1 KB = 1000 bytes                     2.40 MB, 812.3 KB
    latency  three significant digits, never an exponent          4.00 ms, 12.3 ms, 0.912 ms
"""
from __future__ import annotations

import math

__all__ = ["NA", "finite", "fmt_snr", "fmt_pct", "fmt_bytes", "fmt_ms", "sig3"]

NA = "–"      # a cell with no value


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sig3(v: float) -> str:
    """Three significant digits without an exponent: 0.912, 4.00, 12.3, 1234."""
    digits = max(0, 2 - int(math.floor(math.log10(abs(v))))) if v else 2
    return f"{v:.{digits}f}"


def fmt_snr(v) -> str:
    if isinstance(v, float) and math.isinf(v) and v > 0:
        return "∞ (identical)"
    return f"{v:.1f} dB" if finite(v) else NA


def fmt_pct(v) -> str:
    return f"{100 * v:.2f} %" if finite(v) else NA


def fmt_bytes(n) -> str:
    if not finite(n):
        return NA
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB" if n >= 1e3 else f"{int(n)} B"


def fmt_ms(v) -> str:
    return f"{sig3(v)} ms" if finite(v) else NA
