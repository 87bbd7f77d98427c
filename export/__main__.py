"""python -m export [--checkpoint Q.pt] [--out model.tflite] [--float-io] [--nhwc] [--val-images N] ...

With no --checkpoint it exports the latest quantized model recorded in runs/latest.json (python -m quantize).
Exits 0 with <out> and <out>.json written; 2 with a one-line message and no file when the checkpoint, the data,
the options or the --compare-to file cannot be used, or LiteRT has no kernel for the model's format; 1 with a
message and no file when the written file fails its validation.
"""
from __future__ import annotations

import json
import os
import sys

from common.cli import Parser, add_config, config_from, run_command
from mobilenet.runs import find_input, record

from .pipeline import ExportConfig, run_export

PROG = "python -m export"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_config(p, ExportConfig)
    return p


def _run(cfg: ExportConfig) -> int:
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # the converter's per-pass progress lines
    if not cfg.checkpoint:
        cfg.checkpoint = str(find_input(("quantized",), "--checkpoint"))
    report = run_export(cfg)
    record("tflite", report["file"], validated=report["validation"]["passed"])
    v = report["validation"]["runs"]
    fs = report["file_summary"]
    print(f"wrote {report['file']} ({fs['size_bytes']:,} bytes, gzip {fs['gzip_bytes']:,}) as "
          f"{report['export_kind']}, batch 1, ops {fs['ops']}")
    print(json.dumps({"validation": v}, indent=1))
    return 0


def main(argv=None) -> int:
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:      # --help (0) or a malformed flag (2, message already printed)
        return int(e.code or 0)
    return run_command(PROG, lambda: _run(config_from(ns, ExportConfig)))


if __name__ == "__main__":
    from common.files import exit_cleanly_on_sigterm
    exit_cleanly_on_sigterm()
    sys.exit(main())
