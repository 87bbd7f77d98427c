"""python -m export --checkpoint Q.pt --out model.tflite [--float-io] [--nhwc] [--val-images N] ...

Exits 0 with <out> and <out>.json written; 2 with a one-line message and no file when the checkpoint, the data
or the --compare-to file cannot be used; 1 with a message and no file when the export is refused or fails its
validation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from mobilenet.checkpoint import CheckpointError
from mobilenet.data import DataError
from mobilenet.runs import record

from .convert import ExportError
from .pipeline import ExportConfig, run_export
from .tflite_file import TfliteError

_HELP = {
    "checkpoint": "quantized checkpoint (python -m quantize), or an FP32 / pruned one for an FP32 export",
    "out": "the .tflite file to write; the report goes to <out>.json",
    "config": "the quant config the checkpoint must hold (e.g. W8A8); default: whatever it holds",
    "float_io": "integer graphs: float input and output (one QUANTIZE and one DEQUANTIZE at the edges)",
    "nhwc": "input (1, H, W, 3) instead of (1, 3, H, W)",
    "w4_storage": "'int8': export 4-bit weights as int8 values in [-7, 7] (runs exactly, no size gain)",
    "val_images": "CIFAR-10 test images run through the file and the simulation",
    "calib_images": "W8A16: calibration images for the static int16 ranges",
    "data": "CIFAR-10 JPEG archive or folder, or 'random' for synthetic images",
    "compare_to": "another .tflite (e.g. the dense export) to report size and gzip size against",
    "skip_builtin": "do not also validate with the builtin (non-XNNPACK) kernels",
    "reported_images": "int8 graphs: the reported-only comparisons (builtin kernels, float simulation) use the "
                       "first min(val-images, this) images; the gate (XNNPACK vs integer simulation) uses all",
    "max_lsb": "int8 graphs: largest output difference from the simulation accepted, in output LSBs",
    "max_lsb_int16": "int16 graphs: the same in int16 LSBs against the float simulation (1/16 of an int8 step; "
                     "rounding at each of ~50 layers drifts up to ~9 on the CIFAR-10 reference)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(ExportConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=_HELP[f.name])
        elif f.type == "int":
            p.add_argument(flag, type=int, default=f.default, help=_HELP[f.name])
        else:
            p.add_argument(flag, default=f.default, required=f.name in ("checkpoint", "out"), help=_HELP[f.name])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # the converter's per-pass progress lines
    cfg = ExportConfig(**vars(args))
    try:
        report = run_export(cfg)
    except (CheckpointError, DataError, TfliteError) as e:      # an unusable input: the user's to fix
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    record("tflite", report["file"], validated=report["validation"]["passed"])
    v = report["validation"]["runs"]
    fs = report["file_summary"]
    print(f"wrote {report['file']} ({fs['size_bytes']:,} bytes, gzip {fs['gzip_bytes']:,}) as "
          f"{report['export_kind']}, batch 1, ops {fs['ops']}")
    print(json.dumps({"validation": v}, indent=1))
    return 0


if __name__ == "__main__":
    from mobilenet.checkpoint import exit_cleanly_on_sigterm
    exit_cleanly_on_sigterm()
    sys.exit(main())
