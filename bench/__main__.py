"""`python -m bench`: time .tflite files here or on a phone, run the experiment matrix or the whole chain.

    python -m bench host MODEL.tflite [MODEL2 ...] --threads 1,2 --xnnpack on,off --runs 50 [--csv out.csv]
    python -m bench phone [MODEL.tflite ...] [--serial SERIAL] [--threads 1,4] [--use-gpu] [--csv android.csv]
    python -m bench matrix [--checkpoint CKPT] [--data TREE] [--phone]
    python -m bench chain [--device cuda] [--qat]
    python -m bench report RESULTS_DIR

With no model, host and phone time the latest validated .tflite recorded in runs/latest.json. The earlier
spellings still work as the design card writes them: `python -m bench --device` is `bench phone`,
`python -m bench MODEL.tflite` is `bench host`, and `--chain`, `--matrix`, `--report` name their subcommand.
Each subcommand's options come from its config dataclass (bench.host.HostConfig, bench.device.DeviceConfig,
bench.matrix.MatrixConfig, bench.chain.ChainConfig, bench.study_report.ReportConfig).
"""

from __future__ import annotations

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
from common.cli import CheckFailed, Parser, add_config, config_from, run_command
from bench.study_report import ReportConfig, run_report
from mobilenet.runs import find_input

__all__ = ["MODES", "build_parser", "canonical_argv", "main"]

PROG = "python -m bench"


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


# subcommand -> (config dataclass, runner, one-line help)
MODES = {"host": (HostConfig, _run_host_mode, "time .tflite files with the LiteRT interpreter on this computer"),
         "phone": (DeviceConfig, _run_device_mode, "time .tflite files on an Android phone over adb with the "
                                                   "official benchmark_model"),
         "matrix": (MatrixConfig, _run_matrix_mode, "the experiment matrix: every configuration of the study on "
                                                    "one checkpoint (--phone: time the files on a phone too)"),
         "chain": (ChainConfig, _run_chain_mode, "the whole chain: train, prune, quantize, export, validate, "
                                                 "bench, report"),
         "report": (ReportConfig, run_report, "write report.md / report.html from a matrix results directory")}
_POSITIONAL = ("models", "results_dir")
_LEGACY_MODES = {"--chain": "chain", "--matrix": "matrix", "--report": "report"}


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", metavar="{" + ",".join(MODES) + "}", parser_class=Parser)
    p.modes = {}
    for mode, (cls, _, text) in MODES.items():
        p.modes[mode] = sub.add_parser(mode, help=text, description=text)
        add_config(p.modes[mode], cls, positional=_POSITIONAL)
    return p


def parse(argv: list[str]):
    """The subcommand's options; a flag the subcommand does not know is reported under its own name
    (`python -m bench host: error: unrecognized arguments: --serial abc`)."""
    p = build_parser()
    ns, extra = p.parse_known_args(argv)
    if extra:
        p.modes[ns.mode].error("unrecognized arguments: " + " ".join(extra))
    return ns


def canonical_argv(argv: list[str]) -> list[str]:
    """The subcommand form of a command line written the earlier way (a mode flag, or none at all)."""
    argv = list(argv)
    if argv and (argv[0] in MODES or argv[0] in ("-h", "--help")):
        return argv
    for flag, mode in _LEGACY_MODES.items():
        if flag in argv:
            argv.remove(flag)
            if mode == "matrix" and "--device" in argv:   # the old matrix switch: time the files on a phone too
                i = argv.index("--device")
                if i + 1 == len(argv) or argv[i + 1].startswith("-"):
                    argv[i] = "--phone"
            return [mode] + argv
    if "--device" in argv:     # `python -m bench --device [MODEL ...]`, as the design card writes it
        argv.remove("--device")
        return ["phone"] + argv
    return ["host"] + argv


def main(argv: list[str] | None = None) -> int:
    try:
        ns = parse(canonical_argv(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:      # --help (0) or a malformed flag (2, message already printed)
        return int(e.code or 0)
    cls, run, _ = MODES[ns.mode]
    return run_command(PROG, lambda: run(config_from(ns, cls)),
                       errors=(ValueError, OSError, DeviceError, BinaryError),
                       failures=(CheckFailed, RuntimeError))   # a worker, adb or chain step we could not finish


if __name__ == "__main__":
    from common.files import exit_cleanly_on_sigterm
    exit_cleanly_on_sigterm()
    sys.exit(main())
