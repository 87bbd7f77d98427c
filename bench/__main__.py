"""`python -m bench`: time .tflite files on this computer, or on a phone with --device.

    python -m bench MODEL.tflite [MODEL2 ...] --threads 1,2 --xnnpack on,off --runs 50 \
        --warmup 5 [--budget-s 10] --csv out.csv
    python -m bench --device MODEL.tflite [--benchmark-binary ./benchmark_model] \
        [--serial SERIAL] [--threads 1,4] [--use-gpu] [--taskset f0] [--op-profiling] \
        [--remote-dir /data/local/tmp] [--keep] --csv results/android.csv

The parser is built from one config dataclass per mode (bench.host.HostConfig,
bench.device.DeviceConfig); a new mode adds an entry to MODES and a flag in
build_parser(), and main() dispatches on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

from bench.binary import BinaryError
from bench.device import DEVICE_COLUMNS, DeviceConfig, DeviceError, run_device
from bench.host import HOST_COLUMNS, HostConfig, host_description, run_host, runtime_version
from bench.chain import ChainConfig, run_chain
from bench.matrix import MatrixConfig, run_matrix
from bench.report import format_table, write_csv, write_json
from bench.study_report import ReportConfig, run_report
from mobilenet.runs import find_input

__all__ = ["MODES", "build_parser", "main"]


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _on_off_list(text: str) -> list[bool]:
    table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    out = []
    for v in text.split(","):
        if v.strip().lower() not in table:
            raise argparse.ArgumentTypeError(f"expected on/off values such as on,off; got {v!r}")
        out.append(table[v.strip().lower()])
    return out


# Dataclass field annotation (a string: annotations are postponed) -> argparse keywords.
_KINDS = {
    "list[int]": {"type": _int_list}, "list[bool]": {"type": _on_off_list},
    "int": {"type": int}, "float": {"type": float}, "float | None": {"type": float},
    "str": {"type": str}, "str | None": {"type": str}, "bool": {"action": "store_true"},
}


def _latest_model(cfg) -> None:
    """No model named: the latest validated .tflite that python -m quantize (or export) recorded."""
    if not cfg.models:
        cfg.models = [str(find_input(("tflite",), "MODEL.tflite"))]


def _run_host_mode(cfg: HostConfig) -> int:
    _latest_model(cfg)
    rows = run_host(cfg)
    print(format_table(rows, HOST_COLUMNS[:-2]))
    print(f"# {rows[0]['runtime']} on {host_description()}")
    if cfg.csv:
        write_csv(cfg.csv, rows, HOST_COLUMNS)
        _save_config(cfg, "host")
        print(f"wrote {cfg.csv}")
    return 0


def _run_device_mode(cfg: DeviceConfig) -> int:
    _latest_model(cfg)
    log_dir = os.path.splitext(cfg.csv)[0] + "_logs" if cfg.csv else None
    rows = run_device(cfg, log_dir=log_dir)
    print(format_table(rows, DEVICE_COLUMNS[:-1]))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['model']} {r['config']}: {r['status']}: {r['error']}")
    if cfg.csv:
        _save_config(cfg, "device")
        print(f"appended {len(rows)} rows to {cfg.csv}; raw logs in {log_dir}")
    return 0


def _save_config(cfg, mode: str) -> None:
    """The config beside the result, with what produced it."""
    write_json(os.path.splitext(cfg.csv)[0] + ".config.json", {
        "mode": mode, "config": dataclasses.asdict(cfg), "runtime": runtime_version(),
        "host": host_description(), "argv": sys.argv})


def _run_matrix_mode(cfg: MatrixConfig) -> int:
    run_matrix(cfg, command=" ".join(["python -m bench"] + [shlex.quote(a) for a in sys.argv[1:]]))
    return 0


def _run_chain_mode(cfg: ChainConfig) -> int:
    run_chain(cfg)
    return 0


# mode -> (config dataclass, runner); the mode flag is --<mode> (host is the default).
MODES = {"host": (HostConfig, _run_host_mode), "device": (DeviceConfig, _run_device_mode),
         "matrix": (MatrixConfig, _run_matrix_mode), "report": (ReportConfig, run_report),
         "chain": (ChainConfig, _run_chain_mode)}
MODE_HELP = {"matrix": "the experiment matrix: every configuration of the study on one checkpoint "
                       "(add --device to time the files on a phone too)",
             "report": "write report.md / report.html from a matrix results directory",
             "chain": "the whole chain: train, prune, quantize, export, validate, bench, report"}


def _add_field(group, f: dataclasses.Field) -> None:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if f.name == "models":
        group.add_argument("models", nargs="*", default=[], metavar="MODEL.tflite", help=f.metadata["help"])
        return
    if f.name == "device":   # --device is the device-mode flag; in matrix mode it also times on the phone
        return
    if f.name == "results_dir":
        group.add_argument("--results-dir", dest="results_dir", default="", help=f.metadata.get("help"))
        return
    kw = dict(_KINDS[f.type])
    if f.type == "bool" and default is True:   # on by default: --name / --no-name
        kw = {"action": argparse.BooleanOptionalAction, "default": True}
    if kw.get("action") != "store_true":
        kw["default"] = default
    group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=f.metadata.get("help"), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", action="store_true",
                   help="run benchmark_model on an Android phone through adb (with --matrix: as well)")
    modes = p.add_mutually_exclusive_group()
    for m, text in MODE_HELP.items():
        modes.add_argument("--" + m, dest="mode", action="store_const", const=m, help=text)
    p.set_defaults(mode="host")
    field_sets = {m: {f.name: f for f in dataclasses.fields(cls)} for m, (cls, _) in MODES.items()}
    shared = set.intersection(*(set(fs) for fs in field_sets.values()))
    added: set[str] = set()
    for m, fs in field_sets.items():
        group = p.add_argument_group(f"{m} mode" if m != "host" else "host mode (default)")
        for name, f in fs.items():
            if name in added:
                continue
            _add_field(p if name in shared else group, f)
            added.add(name)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.mode == "host" and ns.device:
        ns.mode = "device"
    elif ns.device and ns.mode != "matrix":
        parser.error(f"--device does not go with --{ns.mode}")
    cls, run = MODES[ns.mode]
    own = {f.name for f in dataclasses.fields(cls)}
    for other, (other_cls, _) in MODES.items():     # options of another mode are a mistake
        for f in dataclasses.fields(other_cls):
            if f.name not in own and f.name != "device" and getattr(ns, f.name) != parser.get_default(f.name):
                parser.error(f"--{f.name.replace('_', '-')} belongs to {other} mode, not {ns.mode}")
    cfg = cls(**{name: getattr(ns, name) for name in own})
    try:
        return run(cfg)
    except (ValueError, DeviceError, BinaryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:    # a worker or adb failure we could not turn into a row
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from mobilenet.checkpoint import exit_cleanly_on_sigterm
    exit_cleanly_on_sigterm()
    sys.exit(main())
