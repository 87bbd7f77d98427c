"""One command-line layer (common/cli.py): one vocabulary, one error convention, bench's subcommands."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from common.cli import Parser, add_config, config_from, opt, run_command, torch_device

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"train.py": [sys.executable, "train.py"], "prune": [sys.executable, "-m", "prune"],
            "quantize": [sys.executable, "-m", "quantize"], "export": [sys.executable, "-m", "export"],
            "bench chain": [sys.executable, "-m", "bench", "chain"],
            "bench matrix": [sys.executable, "-m", "bench", "matrix"]}
OLD_NAMES = ("--root", "--source", "--eval-stride", "--eval-size", "--eval-every")


@dataclass
class _Demo:
    path: str = opt("", "a file")
    count: int = opt(3, "a count")
    rate: float | None = opt(None, "a rate")
    ratio: float | str | None = opt(None, "a ratio or auto", flags=("--alias",))
    threads: list[int] = opt([1], "thread counts")
    xnnpack: list[bool] = opt([True], "delegate on/off")
    flag: bool = opt(False, "a switch")
    tri: bool | None = opt(None, "forced on/off, or the default")


def test_add_config_reads_every_field_kind_back():
    p = Parser(prog="demo")
    add_config(p, _Demo)
    assert config_from(p.parse_args([]), _Demo) == _Demo()
    got = config_from(p.parse_args(["--path", "x", "--count", "7", "--rate", "0.5", "--alias", "auto",
                                    "--threads", "1,2", "--xnnpack", "on,off", "--flag", "--no-tri"]), _Demo)
    assert got == _Demo("x", 7, 0.5, "auto", [1, 2], [True, False], True, False)
    assert config_from(p.parse_args(["--ratio", "0.7"]), _Demo).ratio == "0.7"   # the config parses ratios
    assert {f.name for f in fields(_Demo)} == set(vars(p.parse_args([])))


def test_a_malformed_flag_is_one_line_and_exit_2(capsys):
    p = Parser(prog="demo")
    add_config(p, _Demo)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--count", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["demo: error: argument --count: invalid int value: 'many'"]


def test_run_command_maps_user_errors_to_2_and_failed_checks_to_1(capsys):
    from common.cli import CheckFailed

    def raise_(e):
        raise e
    assert run_command("demo", lambda: raise_(ValueError("--count should be >= 0 instead of -1"))) == 2
    assert run_command("demo", lambda: raise_(FileNotFoundError("no such file: x.pt"))) == 2
    assert run_command("demo", lambda: raise_(CheckFailed("validation failed"))) == 1
    assert capsys.readouterr().err.splitlines() == ["demo: error: --count should be >= 0 instead of -1",
                                                     "demo: error: no such file: x.pt",
                                                     "demo: error: validation failed"]
    with pytest.raises(KeyError):    # a bug keeps its traceback
        run_command("demo", lambda: raise_(KeyError("x")))


def test_torch_device_names_a_device_this_machine_lacks():
    assert torch_device("cpu").type == "cpu"
    assert torch_device("auto").type in ("cpu", "cuda")
    for bad in ("cuda:99", "tpu", "gpu"):
        with pytest.raises(ValueError, match=bad):
            torch_device(bad)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_speaks_one_vocabulary(name):
    """--data, --data-source, --device (torch), --eval-images in every command that trains or evaluates; none of
    the earlier per-command spellings."""
    out = subprocess.run(COMMANDS[name] + ["--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    flags = set(out.stdout.replace("[", " ").replace("]", " ").replace(",", " ").split())
    want = {"--data"} | ({"--eval-images"} if name != "export" else {"--val-images"})
    want |= {"--data-source"} if name not in ("bench chain", "bench matrix") else set()
    want |= {"--device"} if name not in ("export", "bench matrix") else set()   # they run torch on the CPU only
    assert want <= flags, (name, want - flags)
    # train.py's --eval-every counts epochs; elsewhere it meant an image stride, and that spelling is gone
    old = set(OLD_NAMES) - ({"--eval-every"} if name == "train.py" else set())
    assert not flags & old, (name, flags & old)


def test_bench_help_is_per_subcommand():
    run = lambda *a: subprocess.run([sys.executable, "-m", "bench", *a, "--help"], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, timeout=120).stdout
    chain, old_chain, phone = run("chain"), run("--chain"), run("--device")
    assert chain == old_chain and "--train-minutes" in chain and "--adaround-iters" not in chain
    assert "--serial" in phone and "--benchmark-binary" in phone and "--train-minutes" not in phone


@pytest.mark.parametrize("argv,want", [
    ([], ["host"]),
    (["m.tflite", "--threads", "1,2"], ["host", "m.tflite", "--threads", "1,2"]),
    (["--device"], ["phone"]),                                   # the design card's spelling
    (["--device", "m.tflite", "--serial", "S"], ["phone", "m.tflite", "--serial", "S"]),
    (["--chain", "--qat"], ["chain", "--qat"]),
    (["--chain", "--device", "cuda"], ["chain", "--device", "cuda"]),
    (["--matrix", "--device", "--quick"], ["matrix", "--phone", "--quick"]),   # the old "time on a phone too"
    (["--matrix", "--device"], ["matrix", "--phone"]),
    (["--matrix", "--device", "cpu"], ["matrix", "--device", "cpu"]),
    (["--report", "runs/matrix"], ["report", "runs/matrix"]),
    (["phone", "--device"], ["phone", "--device"]),             # a subcommand is taken as written
])
def test_bench_reads_the_earlier_spellings_as_subcommands(argv, want):
    from bench.__main__ import canonical_argv
    assert canonical_argv(argv) == want


def test_user_errors_share_one_prefix_and_exit_2(tmp_path, capsys):
    """The same kind of mistake in each command: one line `<prog>: error: ...` naming the value, exit 2."""
    import export.__main__ as export_cli
    import prune.__main__ as prune_cli
    import quantize.__main__ as quantize_cli
    import train
    from bench.__main__ import main as bench_main
    missing = str(tmp_path / "missing.pt")
    cases = [(train.main, ["--data-source", "random", "--device", "cuda:99", "--out", str(tmp_path / "t")],
              "train.py", "cuda:99"),
             (prune_cli.main, ["--checkpoint", missing, "--ratio", "0.5"], "python -m prune", "missing.pt"),
             (quantize_cli.main, ["--checkpoint", missing], "python -m quantize", "missing.pt"),
             (export_cli.main, ["--checkpoint", missing, "--out", str(tmp_path / "m.tflite")], "python -m export",
              "missing.pt"),
             (bench_main, ["host", str(tmp_path / "missing.tflite")], "python -m bench", "missing.tflite"),
             (bench_main, ["chain", "--device", "cuda:99", "--out", str(tmp_path / "c")], "python -m bench",
              "cuda:99")]
    for main, argv, prog, value in cases:
        assert main(argv) == 2, prog
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and value in err[0], (prog, err)
    assert not any(tmp_path.iterdir())
