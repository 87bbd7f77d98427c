"""The experiment-matrix report: report.md and report.html with PNG plots, generated from the results files.

    python -m bench.study_report RESULTS_DIR [--prune-dir DIR] [--out-dir DIR]

Reads RESULTS_DIR/matrix.csv and meta.json (common.matrix, common.provenance) and, if present, the pruning run's files
(prune_dir, default RESULTS_DIR/prune). Writes report.md, report.html and plots/*.png to out_dir (default
RESULTS_DIR). Every number on the page is read or computed from those files; what is missing is shown as
"not measured". The page is built once as a list of blocks and rendered twice, as Markdown and as HTML.
"""
from __future__ import annotations

import datetime
import html
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.files import atomic_write_text

from common import plots
from prune import plots as prune_plots
from bench.findings import (STUDY_DEVICE, STUDY_MODEL, compare_with_study, compute_findings, our_setting,
                            study_rows_table)
from bench.peers import peer_blocks
from bench.results import PRUNE_FILES, load_prune
from common.matrix import read_matrix
from common.provenance import read_meta
from common.units import NA, fmt_bytes, fmt_ms, fmt_pct, fmt_snr
from common.units import finite as _finite

__all__ = ["ReportConfig", "write_report", "build_blocks", "render_md", "render_html", "run_report",
           "main"]


@dataclass
class ReportConfig:
    results_dir: str = field(default="", metadata={"help": "directory holding matrix.csv and meta.json"})
    prune_dir: str = field(default="", metadata={
        "help": "pruning run directory (sweep_global.csv, sweep_layers.csv, prune_report.json); "
                "default RESULTS_DIR/prune"})
    out_dir: str = field(default="", metadata={
        "help": "where report.md, report.html and plots/ go; default RESULTS_DIR"})
    title: str = field(default="MobileNetV2 compression: experiment matrix", metadata={"help": "page title"})


def _int(v) -> str:
    return str(v) if v is not None else NA


def _exact(v) -> str:
    if not _finite(v):
        return NA
    return "yes" if v == 1.0 else "no" if v == 0.0 else f"{100 * v:.2f} %"


# ---------------------------------------------------------------- the page as blocks

def _key_cells(r: dict) -> list[str]:
    return [r.get("config") or NA, r.get("granularity") or NA, r.get("calib") or NA, r.get("method") or NA]


KEY_HEAD = ["config", "granularity", "calib", "method"]


def _provenance(meta: dict | None, matrix: Path) -> list:
    if meta is None:
        return [("warn", f"Provenance not recorded: {matrix.parent / 'meta.json'} is missing, so the command, "
                         "checkpoint, commit and machine behind these numbers are unknown.")]
    m = meta.get("machine") or {}
    machine = ", ".join(x for x in (m.get("cpu"), m.get("isa"), f"{m['cores']} cores" if m.get("cores") else None,
                                    f"{m['usable_cores']} usable" if m.get("usable_cores") else None,
                                    m.get("system")) if x) if isinstance(m, dict) else str(m)
    v = meta.get("versions") or {}
    commit = (meta.get("commit") or "unknown") + (" (with uncommitted changes)" if meta.get("commit_dirty") else "")
    items = [("command", f"`{meta.get('command', '?')}`"),
             ("checkpoint", f"{meta.get('checkpoint', '?')} (sha256 {(meta.get('checkpoint_sha256') or '?')[:16]})"),
             ("data", meta.get("eval_subset") or NA), ("seed", _int(meta.get("seed"))), ("commit", commit),
             ("machine", machine), ("versions", ", ".join(f"{k} {x}" for k, x in v.items() if x) or NA),
             ("date", meta.get("date") or NA)]
    hist = meta.get("history") or []
    if len(hist) > 1:   # a resumed run: every invocation that wrote rows, oldest first
        items.append(("invocations", "; ".join(
            f"{h.get('date', '?')} · commit {(h.get('commit') or '?')[:7]}"
            f"{' (dirty)' if h.get('commit_dirty') else ''} · `{h.get('command', '?')}`"
            + (f" (resumed after {h['rows_before']} rows)" if h.get("rows_before") else "")
            + (f" (re-timed: {h['retimed']})" if h.get("retimed") else "")
            + (f" ({h['note']})" if h.get("note") else "") for h in hist)))
    return [("kv", items)]


def _matrix_tables(rows: list[dict]) -> list:
    fp_file = next((r.get("file_bytes") for r in rows if r.get("method") == "fp32" and _finite(r.get("file_bytes"))),
                   None)
    acc = [_key_cells(r) + [r.get("act_mode") or NA, fmt_pct(r.get("top1")),
                            f"{100 * (r['top1'] - r['top1_fp32']):+.2f}" if _finite(r.get("top1")) and
                            _finite(r.get("top1_fp32")) else NA,
                            fmt_pct(r.get("agreement")), fmt_snr(r.get("snr_db")),
                            f"{r['mse']:.3g}" if _finite(r.get("mse")) else NA, _int(r.get("eval_images"))]
           for r in rows]
    notes = []          # long notes (a refusal's reason) are numbered in the table and written out below it

    def note_ref(text: str) -> str:
        if len(text) <= 48:
            return text
        if text not in notes:
            notes.append(text)
        return f"{text.split(' (')[0][:48]} [{notes.index(text) + 1}]"

    size = [_key_cells(r) + [fmt_bytes(r.get("weight_bytes")), fmt_bytes(r.get("file_bytes")),
                             fmt_bytes(r.get("gzip_bytes")),
                             f"{fp_file / r['file_bytes']:.2f}×" if fp_file and _finite(r.get("file_bytes")) else NA,
                             ("status", r.get("export_status") or NA), note_ref(r.get("export_note") or ""),
                             _exact(r.get("exact_match")), _int(r.get("max_lsb")), fmt_pct(r.get("file_agreement"))]
            for r in rows]
    lat = [_key_cells(r) + [fmt_ms(r.get("host_ms_median")),
                            f"{fmt_ms(r.get('host_ms_p5'))} … {fmt_ms(r.get('host_ms_p95'))}"
                            if _finite(r.get("host_ms_p5")) and _finite(r.get("host_ms_p95")) else NA,
                            _int(r.get("host_threads")), fmt_ms(r.get("device_ms")), r.get("device") or NA]
           for r in rows]
    out = [("h2", "Accuracy and fidelity"),
           ("p", "Top-1 and agreement are fractions of the evaluation images; Δ is in percentage points against "
                 "FP32; SNR and MSE compare the logits with the FP32 model's."),
           ("table", KEY_HEAD + ["activations", "top-1", "Δ top-1", "agreement", "SNR", "MSE", "images"],
            acc),
           ("h2", "Size and export"),
           ("p", "Sizes in decimal units (1 KB = 1000 bytes). “exact” says whether the .tflite file's outputs "
                 "equal the PyTorch simulation's bit for bit; “max LSB” is the largest difference in output "
                 "quantization steps."),
           ("table", KEY_HEAD + ["weight bytes", ".tflite", "gzip", "FP32 / this", "export", "note", "exact",
                                 "max LSB", "file agreement"], size)]
    if notes:
        out.append(("ul", [f"[{i + 1}] {t}" for i, t in enumerate(notes)]))
    out += [("h2", "Latency"),
           ("table", KEY_HEAD + ["host median", "host p5 … p95", "threads", "device", "device name"], lat)]
    if not any(_finite(r.get("device_ms")) for r in rows):
        out.append(("p", "Device latency: not measured."))
    if not any(_finite(r.get("host_ms_median")) for r in rows):
        out.append(("p", "Host latency: not measured."))
    return out


def _figure(title: str, path, rel_dir: str, absent: str) -> list:
    if path is None:
        return [("h3", title), ("p", f"Not measured: {absent}.")]
    return [("h3", title), ("img", f"{rel_dir}/{Path(path).name}", title)]


# The pruning design this project follows expected these stages (its table; sizes in MB of 10^6 bytes).
DESIGN_STAGES = (("baseline FP32", 9.0, 0.945), ("pruned 70 %", 9.0, 0.930), ("fine-tuned", 9.0, 0.940),
                 ("INT8", 2.3, 0.935))


def _design_table(rep: dict, rows: list[dict]) -> list:
    """Baseline -> pruned -> fine-tuned -> INT8 with size and top-1 at each stage, ours beside the design's, and
    what makes the two unequal. Ours: the pruning report (accuracies, dense weight bytes) and the matrix rows of
    the same run (the pruned model's FP32 and INT8 files)."""
    by = {r.get("config"): r for r in rows}
    # the INT8 stage: the shipped file, so a row with one (W8A8 first), else the first quantized row
    quant = sorted((r for r in rows if r.get("config") not in ("FP32", None)),
                   key=lambda r: (not r.get("file_bytes"), r.get("config") != "W8A8"))
    fp32, q = by.get("FP32") or {}, quant[0] if quant else {}
    dense = (rep.get("size_baseline") or {}).get("dense_bytes")
    tuned = rep.get("acc_finetuned")
    ours = [(fmt_bytes(dense) + " (weights)", rep.get("acc_baseline")),
            (fmt_bytes((rep.get("size_pruned") or {}).get("dense_bytes")) + " (stored dense)",
             rep.get("acc_bn_recalibrated", rep.get("acc_pruned"))),
            (fmt_bytes(fp32.get("file_bytes")) + " (FP32 .tflite, sparse storage)" if fp32.get("file_bytes")
             else NA, tuned),
            (fmt_bytes(q.get("file_bytes")) + f" ({q.get('config')} .tflite)" if q.get("file_bytes") else NA,
             q.get("top1"))]
    cells = [[stage, size, fmt_pct(acc), f"{d_size:.1f} MB", fmt_pct(d_acc)]
             for (stage, d_size, d_acc), (size, acc) in zip(DESIGN_STAGES, ours)]
    base = rep.get("acc_baseline")
    drops = [f"{100 * (a - base):+.2f}" if _finite(a) and _finite(base) else NA for _, a in ours[1:]]
    d_drops = [f"{100 * (a - DESIGN_STAGES[0][2]):+.2f}" for _, _, a in DESIGN_STAGES[1:]]
    return [("h3", "The pruning design's table, side by side"),
            ("table", ["stage", "size, ours", "top-1, ours", "size, design", "top-1, design"], cells),
            ("p", f"Unequal in plain terms: the design starts from a {fmt_pct(DESIGN_STAGES[0][2])} FP32 baseline "
                  f"(a long GPU schedule), this run from {fmt_pct(base)}, so absolute top-1 cannot be compared; "
                  f"the changes against each baseline can, roughly: ours {', '.join(drops)} points "
                  f"(pruned after BN re-estimation, fine-tuned, INT8), the design's {', '.join(d_drops)}. The "
                  "design's pruned sizes stay 9.0 MB because dense storage keeps the zeros; our files store "
                  "pruned weights sparse (CSR + DENSIFY) wherever that is smaller. Our INT8 top-1 is measured on "
                  f"{_int(q.get('eval_images'))} test images, the others on {_int(rep.get('eval_images'))}.")]


def _prune_blocks(prune: dict, plot_dir: Path, matrix_meta: dict | None, rows: list[dict]) -> list:
    out = [("h2", "Pruning")]
    rep, g, lay = prune["report"], prune["global"], prune["layers"]
    if not (rep or g or lay):
        names = ", ".join(PRUNE_FILES[k] for k in ("global", "layers", "report"))
        return out + [("p", f"Not measured: none of {names} in {prune['dir'] or 'the results directory'}.")]
    if prune["meta"]:
        footer = plots.footer_text(prune["meta"])
    else:
        conf = prune["config"] or {}      # prune_config.json: {"source"} from the pipeline, {"cli"} from --sweep-only
        src = (rep or {}).get("source") or conf.get("source") or (conf.get("cli") or {}).get("checkpoint") or "?"
        footer = (f"pruning run {prune['dir']} (prune/ outputs) · source checkpoint: {src} · command, commit and "
                  "machine not recorded (no prune_meta.json)")
        out.append(("p", f"Provenance of the pruning run: only its directory and source checkpoint are known "
                         f"({prune['dir']}, {src}); write {PRUNE_FILES['meta']} with common.provenance.collect_meta "
                         "to record the command, commit and machine."))
    if rep:
        sizes = (rep.get("size_baseline") or {}, rep.get("size_pruned") or {})
        out.append(("kv", [("baseline top-1", fmt_pct(rep.get("acc_baseline"))),
                           ("pruned, before fine-tuning", fmt_pct(rep.get("acc_pruned"))),
                           ("pruned and fine-tuned", fmt_pct(rep.get("acc_finetuned"))),
                           ("ratio asked", _int(rep.get("ratio"))),
                           ("global sparsity reached", fmt_pct(rep.get("global_sparsity"))),
                           ("sparsity over all conv/linear weights", fmt_pct(rep.get("total_sparsity"))),
                           ("gzip size, dense → pruned", f"{fmt_bytes(sizes[0].get('gzip_bytes'))} → "
                                                          f"{fmt_bytes(sizes[1].get('gzip_bytes'))}"),
                           ("evaluation images", _int(rep.get("eval_images")))]))
        out += _design_table(rep, rows)
    else:
        out.append(("p", f"Pruning run (baseline / pruned / fine-tuned accuracy): not measured "
                         f"(no {PRUNE_FILES['report']})."))
    if g:
        out.append(("table", ["ratio", "sparsity reached", "top-1", "drop (points)", "images", "bf16 eval"],
                    [[f"{r['ratio']:g}" if _finite(r.get("ratio")) else NA, fmt_pct(r.get("reached_sparsity")),
                      fmt_pct(r.get("acc")), f"{r['drop_points']:.2f}" if _finite(r.get("drop_points")) else NA,
                      _int(r.get("images")), r.get("bf16") or NA] for r in g]))
    p1 = prune_plots.plot_prune_sweep(g, plot_dir / "prune_sweep.png", footer)
    p2 = prune_plots.plot_prune_layers(lay, plot_dir / "prune_layers.png", footer)
    p3 = prune_plots.plot_accuracy_sparsity(g, rep, plot_dir / "prune_sparsity.png", footer)
    out += _figure("Sensitivity: accuracy against global ratio", p1, plot_dir.name, f"no {PRUNE_FILES['global']}")
    out += _figure("Per-layer sensitivity", p2, plot_dir.name, f"no {PRUNE_FILES['layers']}")
    out += _figure("Accuracy against sparsity", p3, plot_dir.name,
                   f"no {PRUNE_FILES['global']} and no sparsity in {PRUNE_FILES['report']}")
    return out


def _study_blocks(rows: list[dict], meta: dict | None) -> list:
    """The earlier study's rows beside ours of the same file kinds, then its claims against ours."""
    setting = our_setting(meta)
    return [("h2", "Against the earlier study"),
            ("p", f"The earlier study measured ai-edge-quantizer's files of the MobileNetV2 trained on "
                  f"{STUDY_MODEL}, on {STUDY_DEVICE}. Ours are the same file kinds made by this toolkit from "
                  f"{setting['model']}, timed on {setting['cpu']} unless a phone figure is given. Absolute "
                  f"sizes and times therefore differ; the claims below compare ratios within each side, and a "
                  f"verdict other than \"agrees\" names what differs between the two measurements."),
            ("table", ["study row", "ours (same file kind)", "study size", "our size", "study latency",
                       "our latency"], study_rows_table(rows)),
            ("table", ["claim", "earlier study", "ours (measured)", "counted as agreeing if", "verdict"],
             [[c["claim"], c["study"], c["ours"], c["tolerance"], ("verdict", c["verdict"])]
              for c in compare_with_study(rows, meta)])]


def build_blocks(cfg: ReportConfig, extra: list | None = None) -> list:
    """The page as blocks; `extra` blocks (e.g. the chain's stages) go right after the provenance."""
    results = Path(cfg.results_dir)
    out_dir = Path(cfg.out_dir or results)
    plot_dir = out_dir / "plots"
    matrix = results / "matrix.csv"
    rows, meta = read_matrix(matrix), read_meta(results / "meta.json")
    prune = load_prune(cfg.prune_dir or results / "prune")
    footer = plots.footer_text(meta)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    inputs = [str(p) for p in (matrix, results / "meta.json") if p.is_file()]
    inputs += [str(Path(prune["dir"]) / PRUNE_FILES[k]) for k in ("global", "layers", "report") if prune[k]]
    blocks = [("h1", cfg.title),
              ("p", f"Generated by `python -m bench.study_report {cfg.results_dir}` on {now} from "
                    f"{', '.join(inputs) or 'no input files'}; nothing on this page is typed by hand."),
              ("h2", "How the numbers were produced")] + _provenance(meta, matrix)
    blocks += extra or []
    blocks.append(("h2", "Findings"))
    findings = compute_findings(rows)
    blocks.append(("ul", [f.text for f in findings]) if findings else ("p", "Not measured: no matrix rows."))
    blocks += _study_blocks(rows, meta)
    blocks += peer_blocks(results)
    if rows:
        blocks += _matrix_tables(rows)
    else:
        blocks += [("h2", "Matrix"), ("p", f"Not measured: {matrix} is missing or empty.")]
    blocks.append(("h2", "Plots"))
    for title, fn, absent in (
            ("SNR per configuration", plots.plot_snr, "no finite SNR in the matrix"),
            ("Size per configuration", plots.plot_size, "no sizes in the matrix"),
            ("Latency per configuration", plots.plot_latency, "no host or device latency in the matrix"),
            ("Per-channel against per-tensor", plots.plot_granularity, "no configuration measured both ways"),
            ("Real against random calibration", plots.plot_calibration, "no configuration calibrated both ways")):
        name = fn.__name__.removeprefix("plot_") + ".png"
        blocks += _figure(title, fn(rows, plot_dir / name, footer), plot_dir.name, absent)
    return blocks + _prune_blocks(prune, plot_dir, meta, rows)


# ---------------------------------------------------------------- rendering

def _md_cell(c) -> str:
    text = c[1] if isinstance(c, tuple) else str(c)
    return text.replace("|", "\\|").replace("\n", " ")


def render_md(blocks: list) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "warn":
            out.append(f"> **Warning:** {b[1]}")
        elif kind == "ul":
            out.append("\n".join(f"- {t}" for t in b[1]))
        elif kind == "kv":
            out.append("\n".join(f"- **{k}:** {v}" for k, v in b[1]))
        elif kind == "table":
            head, rows = b[1], b[2]
            lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escape, then `code` spans as <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _numeric(c) -> bool:
    text = c[1] if isinstance(c, tuple) else c
    return bool(text) and (text[0].isdigit() or text[0] in "+-−∞<~")


def _html_table(head: list[str], rows: list[list]) -> str:
    """A column whose filled cells are all numbers is right-aligned (its '–' cells too); text may wrap only
    in long-text columns (notes, claims)."""
    ncol = len(head)
    blank = (NA, "", "not measured")
    num = [all(_numeric(r[j]) for r in rows if r[j] not in blank) and any(r[j] not in blank for r in rows)
           for j in range(ncol)]
    wrap = [any(len(r[j] if isinstance(r[j], str) else r[j][1]) > 28 for r in rows) for j in range(ncol)]

    def cell(c, j):
        if isinstance(c, tuple):       # (kind, text): export status, verdict, shown as a tag
            word, _, why = c[1].partition(": ")    # "differs: model and data set (...)": the tag, then the why
            tag = f'<span class="tag {html.escape(word.replace(" ", "-"))}">{html.escape(word)}</span>'
            return f'<td class="wrap">{tag} {html.escape(why)}</td>' if why else f"<td>{tag}</td>"
        cls = "num" if num[j] and not isinstance(c, tuple) else "wrap" if wrap[j] else ""
        return f'<td class="{cls}">{_inline(c)}</td>' if cls else f"<td>{_inline(c)}</td>"
    heads = "".join(f'<th class="num">{html.escape(h)}</th>' if num[j] else f"<th>{html.escape(h)}</th>"
                    for j, h in enumerate(head))
    body = "".join("<tr>" + "".join(cell(c, j) for j, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 20px; margin-top: 36px; border-bottom: 1px solid #ddd; }
h3 { font-size: 16px; margin: 24px 0 8px; } p { max-width: 80ch; }
code { font: 13px ui-monospace, Menlo, Consolas, monospace; background: #f3f3f5; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e6e6e9; text-align: left; vertical-align: top;
         white-space: nowrap; }
th { background: #f6f6f8; font-weight: 600; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.wrap { white-space: normal; min-width: 16ch; max-width: 40ch; }
tbody tr:nth-child(even) { background: #fafafb; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; background: #f6f6f8; width: fit-content;
        padding: 12px 16px; border-radius: 6px; font-size: 14px; }
dl.kv dt { font-weight: 600; } dl.kv dd { margin: 0; overflow-wrap: anywhere; }
.warn { background: #fff4e0; border-left: 4px solid #e08a2c; padding: 8px 12px; }
.tag { padding: 1px 7px; border-radius: 10px; font-size: 12px; background: #eee; white-space: nowrap; }
.tag.ok, .tag.agrees, .tag.met { background: #dff3e6; color: #1b6b3a; }
.tag.refused, .tag.differs, .tag[class*="missed"] { background: #fff0d6; color: #8a5300; }
.tag.failed { background: #fde2e0; color: #9b1c13; } .tag.not-measured, .tag.skipped { color: #666; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
ul li { margin: 3px 0; max-width: 100ch; }
"""


def render_html(blocks: list, title: str) -> str:
    body = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "warn":
            body.append(f'<p class="warn">{_inline(b[1])}</p>')
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in b[1]) + "</ul>")
        elif kind == "kv":
            body.append('<dl class="kv">' + "".join(f"<dt>{html.escape(k)}</dt><dd>{_inline(v)}</dd>"
                                                   for k, v in b[1]) + "</dl>")
        elif kind == "table":
            body.append(_html_table(b[1], b[2]))
        elif kind == "img":
            body.append(f'<figure><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></figure>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style></head>\n<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


def write_report(results_dir, prune_dir=None, out_dir=None, title: str | None = None,
                 extra: list | None = None) -> tuple[Path, Path]:
    """report.md and report.html (and plots/*.png) for the results in `results_dir`; returns their paths."""
    cfg = ReportConfig(results_dir=str(results_dir), prune_dir=str(prune_dir or ""), out_dir=str(out_dir or ""))
    if title:
        cfg.title = title
    return _write(cfg, extra)


def _write(cfg: ReportConfig, extra: list | None = None) -> tuple[Path, Path]:
    if not Path(cfg.results_dir).is_dir():
        raise ValueError(f"results directory not found: {cfg.results_dir}")
    blocks = build_blocks(cfg, extra)
    out = Path(cfg.out_dir or cfg.results_dir)
    md = atomic_write_text(render_md(blocks), out / "report.md")
    page = atomic_write_text(render_html(blocks, cfg.title), out / "report.html")
    return md, page


def run_report(cfg: ReportConfig) -> int:
    """Runner with the (config dataclass, runner) shape of bench.__main__.MODES."""
    md, page = _write(cfg)
    print(f"wrote {md} and {page}")
    return 0


if __name__ == "__main__":   # `python -m bench.study_report DIR`, the earlier spelling of `python -m bench report DIR`
    from bench.__main__ import main
    sys.exit(main(["report", *sys.argv[1:]]))
