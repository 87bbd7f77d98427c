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

__all__ = ["Finding", "STUDY", "STUDY_ROWS", "compute_findings", "compare_with_study", "study_rows_table",
           "study_kind", "our_setting", "w8_snr", "per_tensor_delta", "w4_snr",
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
        out.append(Finding("dynamic_slowdown", f"{dy['config']} (dynamic range) is {how} static "
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

# The earlier study's files were ai-edge-quantizer's, of the ImageNet MobileNetV2, timed on a phone:
# (its row, file MB, latency ms). Its "W8A16 dynamic" quantized activations to int8 at run time (AEQ
# dynamic_wi8_afp32; LiteRT has no 16-bit run-time path): the same file kind as our W8A8-dynamic row.
STUDY_MODEL, STUDY_INPUT = "ImageNet, 224×224, 1000 classes", 224
STUDY_DEVICE = "a Galaxy A7 phone (Arm)"
# It measured W16A32 (fp16 weights) too, without figures in its table.
STUDY_ROWS = [("FP32", 13.43, 5.49), ("W8A32", 3.74, 5.46), ("W16A32", None, None), ("W8A16 dynamic", 3.71, 10.93),
              ("W8A8", 3.92, 6.70), ("W4A32", 2.20, 9.27), ("W4A8", 2.36, 13.83)]
# our rows of the same file kinds: (w_bits, act_mode, a_bits), round to nearest (the study's recipes), per-channel
_KINDS = {"W8A32": (8, "none", None), "W16A32": (16, "none", None), "W8A16 dynamic": (8, "dynamic", 8),
          "W8A8": (8, "static", 8), "W4A32": (4, "none", None), "W4A8": (4, "static", 8)}


def study_kind(rows: list[dict], name: str) -> dict | None:
    """Our row of the same file kind as the study's row `name`, exported where possible, the reference
    configuration first."""
    if name == "FP32":
        return _fp32(rows)
    w, act, a = _KINDS[name]
    cands = [r for r in rows if r.get("w_bits") == w and r.get("act_mode") == act and r.get("method") == "rtn"
             and (a is None or r.get("a_bits") == a)]
    return min(cands, key=lambda r: (r.get("export_status") != "ok",) + _pref(r), default=None)


def _latency(ra: dict, rb: dict) -> tuple[float, float, str] | None:
    """(a, b, where) for two rows: the phone's figures when both have one, else the host's at one thread count."""
    if _finite(ra.get("device_ms")) and _finite(rb.get("device_ms")):
        return ra["device_ms"], rb["device_ms"], "phone"
    if (_finite(ra.get("host_ms_median")) and _finite(rb.get("host_ms_median"))
            and ra.get("host_threads") == rb.get("host_threads")):
        return ra["host_ms_median"], rb["host_ms_median"], "host"
    return None


def _study_ratio(a: str, b: str, what: str):
    """A measure: our row of kind a / our row of kind b, file bytes or latency."""
    def measure(rows: list[dict]) -> dict | None:
        ra, rb = study_kind(rows, a), study_kind(rows, b)
        if ra is None or rb is None:
            return None
        if what == "size":
            if not (_num(ra.get("file_bytes")) and _num(rb.get("file_bytes")) and rb["file_bytes"] > 0):
                return None
            return {"value": ra["file_bytes"] / rb["file_bytes"], "where": "file"}
        lat = _latency(ra, rb)
        return None if lat is None or lat[1] <= 0 else {"value": lat[0] / lat[1], "where": lat[2],
                                                        "device": ra.get("device")}
    return measure


def _ratio_claim(key: str, a: str, b: str, what: str) -> tuple:
    """A STUDY entry comparing the study's row a / row b (file bytes or latency) with ours. The ranges are
    ours: +-10 % of the study's ratio for file sizes (byte counts barely move between runs), +-15 % for
    latency ratios (the study's own 1.6x dynamic slowdown is 10.93 / 6.70 ms, one phone run each)."""
    i, unit_text, rel = (1, "MB", 0.10) if what == "size" else (2, "ms", 0.15)
    fa, fb = (next(r[i] for r in STUDY_ROWS if r[0] == n) for n in (a, b))
    v = fa / fb
    claim = f"{a} / {b} {'file bytes' if what == 'size' else 'latency'}"
    return (key, claim, f"{v:.2f}× ({fa:.2f} / {fb:.2f} {unit_text})", (v * (1 - rel), v * (1 + rel)), "×",
            "size" if what == "size" else "speed", _study_ratio(a, b, what))


# (key, claim, the study's figure as text, range counted as agreeing, unit, what the figure depends on besides
# the file kind: "data" = the model and its data set, "size" = the model's shape, "speed" = the model's shape and
# the processor, measure). The SNR ranges are ours: the study's band for W8, its figure +-1 dB for the
# per-tensor loss.
STUDY = [
    ("w8_snr", "W8A8 logits SNR against FP32 (per-channel, round to nearest)", "22–24 dB", (22.0, 24.0), "dB",
     "data", w8_snr),
    ("per_tensor", "per-tensor minus per-channel SNR at W8A8", "-6.5 dB", (-7.5, -5.5), "dB", "data",
     per_tensor_delta),
    ("w4_snr", "W4 SNR, round to nearest", "< 1 dB", (-math.inf, 1.0), "dB", "data", w4_snr),
    _ratio_claim("size_fp32_w8a8", "FP32", "W8A8", "size"),
    _ratio_claim("size_w8a32_fp32", "W8A32", "FP32", "size"),
    _ratio_claim("size_w4a32_w8a32", "W4A32", "W8A32", "size"),
    _ratio_claim("size_w4a8_w8a8", "W4A8", "W8A8", "size"),
    _ratio_claim("dynamic_slowdown", "W8A16 dynamic", "W8A8", "latency"),
    _ratio_claim("speed_w8a8_fp32", "W8A8", "FP32", "latency"),
    _ratio_claim("speed_w8a32_fp32", "W8A32", "FP32", "latency"),
    _ratio_claim("speed_w4a32_w8a32", "W4A32", "W8A32", "latency"),
    _ratio_claim("speed_w4a8_w8a8", "W4A8", "W8A8", "latency"),
]


def our_setting(meta: dict | None) -> dict:
    """Our model and processor in words, from the run's meta.json, for the verdicts."""
    meta = meta or {}
    d, m = meta.get("data") or {}, meta.get("machine") or {}
    model, res = "this run's model and data set", None
    if isinstance(d, dict) and d.get("resolution") and d.get("classes"):
        res = d["resolution"]
        name = "CIFAR-10" if d.get("layout") == "cifar" and len(d["classes"]) == 10 else (
            str(d.get("root") or "").rstrip("/").rsplit("/", 1)[-1] or "its data set")
        model = f"{name}, {d['resolution']}×{d['resolution']}, {len(d['classes'])} classes"
    cpu = ", ".join(x for x in (m.get("cpu"), m.get("isa")) if x) if isinstance(m, dict) else ""
    return {"model": model, "cpu": f"{cpu or 'this computer'}, XNNPACK",
            "input": f"{res}×{res}" if res else "this run's input size"}


def _differs(kind: str, where: str, setting: dict, device: str | None) -> str:
    """What differs between the study's measurement and ours, for a figure that depends on `kind`."""
    models = f"(ours {setting['model']}; the study's {STUDY_MODEL})"
    if kind in ("data", "size"):
        return f"{'model and data set' if kind == 'data' else 'model'} {models}"
    proc = (f"phone against phone (ours {device or 'a phone'}; the study's {STUDY_DEVICE})" if where == "phone"
            else f"CPU against phone (ours {setting['cpu']}; the study's {STUDY_DEVICE})")
    return f"{proc}, and input size (ours {setting['input']}; the study's {STUDY_INPUT}×{STUDY_INPUT})"


def compare_with_study(rows: list[dict], meta: dict | None = None) -> list[dict]:
    """One dict per study claim: claim, study, ours (text), value (float or None), verdict, tolerance. A verdict
    other than "agrees" names what differs between the two measurements (model and data set, CPU against
    phone), from `meta` (the matrix's meta.json) where it is given."""
    setting = our_setting(meta)
    out = []
    for key, claim, study, (lo, hi), unit, kind, measure in STUDY:
        m = measure(rows)
        tol = f"< {hi:g} {unit}" if math.isinf(lo) else (
            f"{lo:.2f} … {hi:.2f}×" if unit == "×" else f"{lo:g} … {hi:g} {unit}")
        if m is None:
            out.append({"key": key, "claim": claim, "study": study, "ours": "not measured", "value": None,
                        "verdict": "not measured", "tolerance": tol})
            continue
        v = m["value"]
        where = m.get("where", "")
        ours = f"{v:.1f} dB" if unit == "dB" else f"{v:.2f}×" + (f" ({where})" if where in ("host", "phone") else "")
        verdict = "agrees" if lo <= v <= hi else "differs: " + _differs(kind, where, setting, m.get("device"))
        out.append({"key": key, "claim": claim, "study": study, "ours": ours, "value": v, "verdict": verdict,
                    "tolerance": tol})
    return out


def study_rows_table(rows: list[dict]) -> list[list[str]]:
    """The study's rows beside ours of the same file kinds: [study row, our row, study MB, our MB, study ms,
    our ms (host or phone)]."""
    out = []
    for name, mb, ms in STUDY_ROWS:
        r = study_kind(rows, name)
        fig = ("not in its table",) * 2 if mb is None else (f"{mb:.2f} MB", f"{ms:.2f} ms")
        if r is None:
            out.append([name, "not measured", fig[0], "not measured", fig[1], "not measured"])
            continue
        label = row_label(r)
        size = _mb(r["file_bytes"]) if _num(r.get("file_bytes")) else "not exported"
        if _finite(r.get("device_ms")):
            lat = f"{_ms(r['device_ms'])} (phone)"
        elif _finite(r.get("host_ms_median")):
            lat = f"{_ms(r['host_ms_median'])} (host, {r.get('host_threads')} thread)"
        else:
            lat = "not measured"
        out.append([name, label, fig[0], size, fig[1], lat])
    return out
