"""Findings computed from the matrix rows, and the comparison with the earlier study's numbers.

Every number in a finding comes from the rows passed in; a finding whose rows are absent is left out
(the comparison table then says "not measured"). Where several rows could answer a question, the
reference configuration is preferred: per-channel weights, real calibration images, round-to-nearest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.matrix import METHOD_NAMES, row_label
from common.units import fmt_bytes as _mb
from common.units import fmt_ms as _ms

__all__ = ["Finding", "STUDY", "compute_findings", "compare_with_study", "w8_snr", "per_tensor_delta", "w4_snr",
           "dynamic_slowdown", "int8_size_ratio", "calibration_delta", "method_gains"]


@dataclass
class Finding:
    key: str                  # what was compared, e.g. "per_tensor"
    text: str                 # one sentence with the computed numbers
    value: float              # the headline number of the sentence (dB, x, points)
    basis: list[str] = field(default_factory=list)   # labels of the rows it was computed from


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _finite(v) -> bool:
    return _num(v) and math.isfinite(v)


def _pref(row: dict) -> tuple:
    """Sort key: the reference configuration first (per-channel, real calibration, round-to-nearest)."""
    return (row.get("granularity") != "per-channel", row.get("calib") != "real", row.get("method") != "rtn")


def _w8a8(row: dict) -> bool:
    return row.get("w_bits") == 8 and row.get("a_bits") == 8 and row.get("act_mode") == "static"


def _fp32(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r.get("method") == "fp32"), None)


def _pairs(rows: list[dict], column: str, a: str, b: str, same: tuple[str, ...], metric: str,
           where=lambda r: True) -> list[tuple[dict, dict]]:
    """(row with column == a, row with column == b) matched on `same`, both with a finite `metric`."""
    first = {tuple(r.get(c) for c in same): r for r in rows
             if r.get(column) == a and where(r) and _finite(r.get(metric))}
    out = [(first[k], r) for r in rows if r.get(column) == b and where(r) and _finite(r.get(metric))
           for k in [tuple(r.get(c) for c in same)] if k in first]
    return sorted(out, key=lambda p: _pref(p[0]))


def _f1(x: float) -> str:
    return f"{x:.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"




# ---------------------------------------------------------------- one question each: a dict, or None

def w8_snr(rows: list[dict]) -> dict | None:
    """SNR of W8A8 with per-channel weights and round-to-nearest (the study's plain W8 setting)."""
    cands = sorted((r for r in rows if _w8a8(r) and r.get("method") == "rtn" and r.get("granularity") ==
                    "per-channel" and _finite(r.get("snr_db"))), key=_pref)
    if not cands:
        return None
    return {"value": cands[0]["snr_db"], "rows": cands}


def per_tensor_delta(rows: list[dict]) -> dict | None:
    """SNR(per-tensor) - SNR(per-channel) at W8A8, same calibration and method (negative = per-tensor loses)."""
    pairs = _pairs(rows, "granularity", "per-channel", "per-tensor", ("config", "calib", "method"), "snr_db", _w8a8)
    if not pairs:
        return None
    pc, pt = pairs[0]
    return {"value": pt["snr_db"] - pc["snr_db"], "pc": pc, "pt": pt}


def w4_snr(rows: list[dict]) -> dict | None:
    """SNR of 4-bit weights with round-to-nearest (no AdaRound, no QAT)."""
    cands = sorted((r for r in rows if r.get("w_bits") == 4 and r.get("method") == "rtn"
                    and _finite(r.get("snr_db"))), key=_pref)
    return {"value": cands[0]["snr_db"], "row": cands[0]} if cands else None


def dynamic_slowdown(rows: list[dict]) -> dict | None:
    """Host median latency of dynamic-range quantization (int8 weights, activations quantized to int8 per run:
    the study's "W8A16 dynamic") / static W8A8, at the same thread count. The static int16 file (`W8A16 static`,
    a_bits 16) is another kind and is not counted."""
    dyn = sorted((r for r in rows if r.get("act_mode") == "dynamic" and r.get("a_bits") == 8
                  and _finite(r.get("host_ms_median"))), key=_pref)
    for d in dyn:
        st = sorted((r for r in rows if _w8a8(r) and _finite(r.get("host_ms_median"))
                     and r.get("host_threads") == d.get("host_threads")), key=_pref)
        if st:
            return {"value": d["host_ms_median"] / st[0]["host_ms_median"], "dyn": d, "static": st[0]}
    return None


def int8_size_ratio(rows: list[dict]) -> dict | None:
    """FP32 .tflite bytes / W8A8 .tflite bytes (exported files); None without both files."""
    fp = _fp32(rows)
    q = sorted((r for r in rows if _w8a8(r) and r.get("export_status") == "ok" and _num(r.get("file_bytes"))),
               key=_pref)
    if fp is None or not _num(fp.get("file_bytes")) or not q:
        return None
    out = {"value": fp["file_bytes"] / q[0]["file_bytes"], "fp32": fp, "int8": q[0]}
    if _num(fp.get("gzip_bytes")) and _num(q[0].get("gzip_bytes")):
        out["gzip"] = fp["gzip_bytes"] / q[0]["gzip_bytes"]
    return out


def calibration_delta(rows: list[dict]) -> dict | None:
    """SNR(random calibration) - SNR(real calibration) at W8A8, same granularity and method."""
    pairs = _pairs(rows, "calib", "real", "random", ("config", "granularity", "method"), "snr_db", _w8a8)
    return {"value": pairs[0][1]["snr_db"] - pairs[0][0]["snr_db"], "real": pairs[0][0],
            "random": pairs[0][1]} if pairs else None


def method_gains(rows: list[dict]) -> list[dict]:
    """Each AdaRound / CLE+BC / QAT row against round-to-nearest with the same config, granularity, calibration."""
    out = []
    for m in (m for m in METHOD_NAMES if m not in ("rtn", "fp32")):
        for rtn, other in _pairs(rows, "method", "rtn", m, ("config", "granularity", "calib"), "snr_db"):
            out.append({"value": other["snr_db"] - rtn["snr_db"], "rtn": rtn, "other": other})
    return out


# ---------------------------------------------------------------- sentences

def compute_findings(rows: list[dict]) -> list[Finding]:
    """The findings the rows support, in reading order. (Long because each finding is a few lines of its own, in
    the order a reader meets them, independent of the others.)"""
    out: list[Finding] = []
    fp = _fp32(rows)
    if (w := w8_snr(rows)) is not None:
        r = w["rows"][0]
        acc = ""
        if _num(r.get("top1")) and _num(r.get("top1_fp32")):
            acc = (f"; top-1 {_pct(r['top1'])} against {_pct(r['top1_fp32'])} in FP32 "
                   f"({100 * (r['top1'] - r['top1_fp32']):+.2f} points)")
        out.append(Finding("w8_snr", f"{r['config']} (per-channel weights, {r['calib']} calibration, round-to-nearest)"
                                     f" reaches {_f1(w['value'])} dB SNR against FP32{acc}.", w["value"],
                           [row_label(r)]))
    if (d := per_tensor_delta(rows)) is not None:
        verb = "lose" if d["value"] < 0 else "gain"
        pc, pt = d["pc"], d["pt"]
        out.append(Finding("per_tensor", f"Per-tensor weights {verb} {_f1(abs(d['value']))} dB against per-channel "
                                         f"at {pc['config']} ({pc['method']}, {pc['calib']} calibration): "
                                         f"{_f1(pt['snr_db'])} vs {_f1(pc['snr_db'])} dB.", d["value"],
                           [row_label(d["pc"]), row_label(d["pt"])]))
    if (c := calibration_delta(rows)) is not None:
        verb = "costs" if c["value"] < 0 else "gains"
        out.append(Finding("calibration", f"Random calibration data {verb} {_f1(abs(c['value']))} dB against real "
                                          f"images at {c['real']['config']} ({c['real']['granularity']}): "
                                          f"{_f1(c['random']['snr_db'])} vs {_f1(c['real']['snr_db'])} dB.",
                           c["value"], [row_label(c["real"]), row_label(c["random"])]))
    if (w4 := w4_snr(rows)) is not None:
        r = w4["row"]
        out.append(Finding("w4_snr", f"{r['config']} with round-to-nearest ({r['granularity']} weights, {r['calib']} "
                                     f"calibration) reaches {_f1(w4['value'])} dB SNR.", w4["value"], [row_label(r)]))
    names = METHOD_NAMES
    for g in method_gains(rows):
        o, r = g["other"], g["rtn"]
        out.append(Finding(f"method_{o['method']}_{o['config']}",
                           f"{o['config']} with {names[o['method']]}: {_f1(o['snr_db'])} dB vs {_f1(r['snr_db'])} dB "
                           f"without ({r['granularity']}, {r['calib']} calibration), {g['value']:+.1f} dB.",
                           g["value"], [row_label(r), row_label(o)]))
    if (s := int8_size_ratio(rows)) is not None:
        gz = f"; gzip {s['gzip']:.1f}×" if "gzip" in s else ""
        out.append(Finding("int8_size", f"The INT8 {s['int8']['config']} file is {s['value']:.1f}× smaller than the "
                                        f"FP32 file ({_mb(s['int8']['file_bytes'])} vs {_mb(s['fp32']['file_bytes'])}"
                                        f"{gz}).", s["value"], [row_label(s["fp32"]), row_label(s["int8"])]))
    if (k := dynamic_slowdown(rows)) is not None:
        dy, st = k["dyn"], k["static"]
        how = f"{k['value']:.2f}× slower than" if k["value"] >= 1 else f"faster ({k['value']:.2f}× the time) than"
        out.append(Finding("dynamic_slowdown", f"Dynamic {dy['config']} is {how} static "
                                               f"{st['config']} on the host: {_ms(dy['host_ms_median'])} vs "
                                               f"{_ms(st['host_ms_median'])} median, {st['host_threads']} thread(s).",
                           k["value"], [row_label(dy), row_label(st)]))
    dev = [r for r in rows if _w8a8(r) and _finite(r.get("device_ms"))]
    if fp is not None and _finite(fp.get("device_ms")) and dev:
        q = sorted(dev, key=_pref)[0]
        out.append(Finding("device_speedup", f"On {q.get('device') or 'the phone'}, {q['config']} runs in "
                                             f"{_ms(q['device_ms'])} against {_ms(fp['device_ms'])} for FP32 "
                                             f"({fp['device_ms'] / q['device_ms']:.2f}× faster).",
                           fp["device_ms"] / q["device_ms"], [row_label(fp), row_label(q)]))
    tried = [r for r in rows if r.get("export_status")]
    if tried:
        ok = [r for r in tried if r["export_status"] == "ok"]
        bad = [f"{row_label(r)} ({r['export_status']}{': ' + r['export_note'] if r.get('export_note') else ''})"
               for r in tried if r["export_status"] in ("refused", "failed")]
        checked = [r for r in ok if _num(r.get("exact_match"))]
        text = f"{len(ok)} of {len(tried)} configurations exported to .tflite"
        # int16 activations (a_bits 16) are checked against the float simulation in int16 LSBs, int8 graphs
        # against the integer simulation in int8 LSBs: two different yardsticks, reported apart
        for label, group in (("int8", [r for r in checked if r.get("a_bits") != 16]),
                             ("int16-activation", [r for r in checked if r.get("a_bits") == 16])):
            if not group:
                continue
            exact = [r for r in group if r.get("exact_match") == 1.0]
            lsb = [r["max_lsb"] for r in group if _num(r.get("max_lsb"))]
            text += (f"; {len(exact)} of {len(group)} checked {label} files match the simulation bit for bit"
                     + (f" (largest difference {max(lsb)} {label.split('-')[0]} LSB)" if lsb else ""))
        text += "." + (f" Not exported: {'; '.join(bad)}." if bad else "")
        out.append(Finding("export", text, float(len(ok)), [row_label(r) for r in tried]))
    return out


# ---------------------------------------------------------------- the earlier study

# (key, claim, the study's figure, range counted as agreeing, unit). The ranges are ours: the study's band
# for W8, its figure +-1 dB for the per-tensor loss, +-0.2x for the 1.6x slowdown, +-0.5x for the "~4x".
STUDY = [
    ("w8_snr", "W8 SNR against FP32 (per-channel, RTN)", "22–24 dB", (22.0, 24.0), "dB"),
    ("per_tensor", "per-tensor minus per-channel SNR at W8", "-6.5 dB", (-7.5, -5.5), "dB"),
    ("w4_snr", "W4 SNR, round-to-nearest", "< 1 dB", (-math.inf, 1.0), "dB"),
    # the study's "W8A16 dynamic" (AEQ dynamic_wi8_afp32) quantizes activations to int8 at run time, as LiteRT
    # always does: our W8A8-dynamic row, not the static int16 file (W8A16 static)
    ("dynamic_slowdown", "dynamic range (study: \"W8A16 dynamic\"; ours: W8A8-dynamic, int8 activations per "
     "run) / static W8A8 host latency", "1.6× slower", (1.4, 1.8), "×"),
    ("int8_size", "FP32 / INT8 file size", "~4× smaller", (3.5, 4.5), "×"),
]
_MEASURES = {"w8_snr": w8_snr, "per_tensor": per_tensor_delta, "w4_snr": w4_snr,
             "dynamic_slowdown": dynamic_slowdown, "int8_size": int8_size_ratio}


def compare_with_study(rows: list[dict]) -> list[dict]:
    """One dict per study claim: claim, study, ours (text), value (float or None), verdict, tolerance."""
    out = []
    for key, claim, study, (lo, hi), unit in STUDY:
        m = _MEASURES[key](rows)
        sp = "" if unit == "×" else " "
        tol = f"< {hi:g}{sp}{unit}" if math.isinf(lo) else f"{lo:g} … {hi:g}{sp}{unit}"
        if m is None:
            out.append({"key": key, "claim": claim, "study": study, "ours": "not measured", "value": None,
                        "verdict": "not measured", "tolerance": tol})
            continue
        v = m["value"]
        ours = f"{v:.1f} dB" if unit == "dB" else f"{v:.2f}×"
        out.append({"key": key, "claim": claim, "study": study, "ours": ours, "value": v,
                    "verdict": "agrees" if lo <= v <= hi else "differs", "tolerance": tol})
    return out
