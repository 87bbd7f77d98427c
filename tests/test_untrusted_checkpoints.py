"""Checkpoints from elsewhere: loading never runs code, and every malformed file gets one line naming it, exit 2,
nothing written. Every command that takes a checkpoint is called as a user calls it (its `main(argv)`); they all
fail while loading, before any data or model work, so each call takes a fraction of a second."""
from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
import torch
from torchvision.models import mobilenet_v2

import bench.__main__ as bench_cli
import export.__main__ as export_cli
import prune.__main__ as prune_cli
import quantize.__main__ as quantize_cli
import train
from conftest import REFERENCE_CKPT, tiny_config
from mobilenet import InvertedResidual, build_model
from mobilenet.checkpoint import FORMAT, CheckpointError, atomic_save, load_checkpoint, load_model
from common.files import atomic_write_text

MISSING = "/nonexistent/mnv2-data"      # a data path that fails the step after the checkpoint is loaded


def _commands(ckpt, out, data: str | None = None) -> dict:
    """Every command that reads a checkpoint, with arguments that make it cheap. `data`: a data path (the
    commands that load data after the checkpoint then fail there); None: synthetic data."""
    ckpt, out = str(ckpt), str(out)
    src = ["--data-source", "folder", "--data", data] if data else ["--data-source", "random"]
    return {
        "train --init": lambda: train.main(["--init", ckpt, "--width", "0.25", "--epochs", "1", "--max-steps-per-epoch",
                                            "1", "--out", out] + (["--data", data] if data else ["--data-source", "random"])),
        "prune": lambda: prune_cli.main(["--checkpoint", ckpt, "--ratio", "0.5", "--no-sweep", "--out", out] + src),
        "quantize": lambda: quantize_cli.main(["--checkpoint", ckpt, "--out", out, "--no-progress"] + src),
        "export": lambda: export_cli.main(["--checkpoint", ckpt, "--out", os.path.join(out, "m.tflite"),
                                           "--data", data or "random"]),
        "bench matrix": lambda: bench_cli.main(["--matrix", "--checkpoint", ckpt, "--out", out]),
        "bench chain": lambda: bench_cli.main(["--chain", "--init", ckpt, "--out", out]),
    }


def _refused(capsys, rc: int, out, *needles: str) -> str:
    """Exit 2, one line on stderr holding every needle, no traceback, nothing at `out`."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err[-3000:])
    for n in needles:
        assert n in lines[0], lines[0]
    assert not os.path.exists(out), f"{out} was written"
    return lines[0]


def _float_ckpt(model=None, **changes) -> dict:
    torch.manual_seed(0)
    model = model or build_model(tiny_config())
    ckpt = {"format": FORMAT, "kind": "fp32", "model_config": model.cfg.to_dict(), "model": model.state_dict()}
    ckpt.update(changes)
    return ckpt


class _WritesMarker:
    """Unpickled by a loader that runs code, this opens (creates) the marker file for writing."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------- code in a pickle

@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    d = tmp_path_factory.mktemp("evil")
    marker = d / "marker"
    path = d / "evil.pt"
    torch.save(_float_ckpt(note=_WritesMarker(marker)), path)   # a valid checkpoint but for the note
    return path, marker


@pytest.mark.parametrize("command", list(_commands("c", "o")))
def test_a_checkpoint_that_runs_code_is_refused_by_every_command(evil, tmp_path, capsys, command):
    path, marker = evil
    out = tmp_path / "out"
    rc = _commands(path, out)[command]()
    _refused(capsys, rc, out, str(path), "asks to run Python code (io.open)")
    assert not marker.exists()


class _MakesDir:
    """Names a function of a module torch blocks outright (os), which it reports in other words."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_blocked_module_is_named_too(tmp_path, capsys):
    path, marker = tmp_path / "evil_os.pt", tmp_path / "made"
    torch.save(_float_ckpt(note=_MakesDir(marker)), path)
    rc = quantize_cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "o"), "--data-source", "random"])
    _refused(capsys, rc, tmp_path / "o", str(path), "asks to run Python code (")
    assert not marker.exists()
    torch.load(path, weights_only=False)     # the same file does run code when loaded unsafely
    assert marker.is_dir()


def test_the_marker_file_is_real(evil):
    """The refused file does run code when loaded unsafely: the test above could fail."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_an_old_training_checkpoint_with_numpy_state_is_refused_not_run(tmp_path, capsys):
    path = tmp_path / "old.pt"
    torch.save(_float_ckpt(rng={"numpy": np.random.get_state()}), path)   # what train.py used to write
    rc = quantize_cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "o"), "--data-source", "random"])
    _refused(capsys, rc, tmp_path / "o", str(path), "asks to run Python code (numpy")


# ---------------------------------------------------------------------------------------------- malformed files

def _structured():
    """A tiny model whose block 1 keeps 40 of its 48 hidden channels, and the default hidden widths."""
    full = build_model(tiny_config())
    hidden = [b.conv[-2][0].out_channels for b in full.features if isinstance(b, InvertedResidual)]
    small = build_model(tiny_config(hidden_channels=[40 if i == 1 else h for i, h in enumerate(hidden)]))
    return small, hidden


def _case(name: str, path):
    """Write malformed checkpoint `name` to `path`; return what its error must say."""
    ck = _float_ckpt()
    if name == "no model_config":
        del ck["model_config"]
        need = "without 'model_config'"
    elif name == "model is a list":
        ck["model"], need = [1, 2], "'model' is a list"
    elif name == "width as text":
        ck["model_config"]["width_mult"], need = "0.25", "model_config 'width_mult' is a str"
    elif name == "unknown kind":
        ck["kind"], need = "int4", "unknown kind 'int4'"
    elif name == "entry not a tensor":
        ck["model"]["features.0.0.weight"], need = [0.0], "'features.0.0.weight' is a list, not a tensor"
    elif name == "another width":
        ck["model_config"]["width_mult"], need = 0.5, "has shape"
    elif name == "hidden list does not fit":
        small, hidden = _structured()
        ck = _float_ckpt(small)
        ck["model_config"]["hidden_channels"] = hidden
        need = "hidden_channels[1] is 48 but the weights of block 1"
    elif name == "hidden list too short":
        ck["model_config"]["hidden_channels"], need = [8] * 5, "hidden_channels has 5 entries, expected 17"
    elif name == "NaN weight":
        ck["model"]["features.3.conv.0.0.weight"][0, 0, 0, 0] = float("nan")
        need = "'features.3.conv.0.0.weight' holds 1 NaN or infinite value(s)"
    elif name == "Inf in a torchvision state_dict":
        ck = mobilenet_v2(width_mult=0.25, num_classes=10).state_dict()
        ck["classifier.1.bias"][3] = float("inf")
        need = "'classifier.1.bias' holds 1 NaN or infinite"
    elif name == "not a checkpoint":
        path.write_bytes(b"PK\x03\x04 not really a zip")
        return "is corrupt or not a PyTorch file"
    else:
        ck, need = [1, 2, 3], "holds a list"
    torch.save(ck, path)
    return need


CASES = ["no model_config", "model is a list", "width as text", "unknown kind", "entry not a tensor",
         "another width", "hidden list does not fit", "hidden list too short", "NaN weight",
         "Inf in a torchvision state_dict", "not a checkpoint", "a list"]


@pytest.mark.parametrize("case", CASES)
def test_malformed_checkpoint_one_line_exit_2(case, tmp_path, capsys):
    path = tmp_path / "bad.pt"
    need = _case(case, path)
    rc = quantize_cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "o"), "--data-source", "random"])
    _refused(capsys, rc, tmp_path / "o", str(path), need)
    with pytest.raises(CheckpointError, match="bad.pt"):          # the one place every loader goes through
        load_model(path)


@pytest.mark.parametrize("command", list(_commands("c", "o")))
@pytest.mark.parametrize("case", ["NaN weight", "hidden list does not fit"])
def test_every_command_refuses_a_malformed_checkpoint(case, command, tmp_path, capsys):
    path = tmp_path / "bad.pt"
    need = _case(case, path)
    out = tmp_path / "out"
    _refused(capsys, _commands(path, out)[command](), out, str(path), need)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from quantize import calibrate, freeze, prepare, recipe
    from quantize.io import save_quantized
    torch.manual_seed(0)
    qm = prepare(build_model(tiny_config()).eval(), recipe("W8A8"))
    calibrate(qm, [torch.randn(8, 3, 32, 32)])
    freeze(qm)
    path = tmp_path_factory.mktemp("q") / "q.pt"
    save_quantized(path, qm)
    return load_checkpoint(path)


@pytest.mark.parametrize("key,value,need", [
    ("features.0.w_fq.scale", 0.0, "quantizer 'features.0.w_fq' has 1 scale(s) that are not > 0, e.g. 0.0"),
    ("classifier.out_fq.scale", -0.5, "quantizer 'classifier.out_fq' has 1 scale(s) that are not > 0"),
    ("quant_in.zero_point", 300, "zero-points outside [-128, 127]"),
    ("quant_config", None, "needs a 'quant_config' dict"),
    ("quant_config.w_bits", "8", "quant_config 'w_bits' is a str"),
])
def test_malformed_quantized_checkpoint(quantized, key, value, need, tmp_path, capsys):
    import copy
    ck = copy.deepcopy(quantized)
    if key == "quant_config":
        del ck["quant_config"]
    elif key.startswith("quant_config."):
        ck["quant_config"][key.split(".", 1)[1]] = value
    else:
        ck["model"][key].view(-1)[0] = value
    path = tmp_path / "q.pt"
    atomic_save(ck, path)
    out = tmp_path / "m.tflite"
    rc = export_cli.main(["--checkpoint", str(path), "--out", str(out), "--data", "random"])
    _refused(capsys, rc, out, str(path), need)


# ---------------------------------------------------------------------------------------------- what we write

def test_torchvision_reference_still_loads():
    model, ckpt = load_model(REFERENCE_CKPT)
    assert ckpt["source"] == "torchvision state_dict" and model.cfg.width_mult == 1.0


def test_only_plain_contents_are_written(tmp_path):
    path = atomic_save({"v": torch.__version__, "x": np.float64(0.5), "n": [np.int64(3)], "t": torch.ones(2)},
                       tmp_path / "ok.pt")
    back = torch.load(path, weights_only=True)
    assert type(back["v"]) is str and back["x"] == 0.5 and type(back["n"][0]) is int
    with pytest.raises(TypeError, match=r"checkpoint\['rng'\]\['numpy'\] is a numpy.ndarray"):
        atomic_save({"rng": {"numpy": np.zeros(3)}}, tmp_path / "bad.pt")
    with pytest.raises(TypeError, match="ModelConfig"):
        atomic_save({"model_config": tiny_config()}, tmp_path / "bad.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt"]


def test_written_files_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write_text("x\n", tmp_path / "a.txt")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    path = atomic_write_text("x\n", tmp_path / "b.txt")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~old


# ---------------------------------------------------------------------------------------------- fuzz

def test_fuzzed_checkpoints_fail_cleanly(tmp_path, capsys):
    """Seeded truncations and single-bit flips of a small valid checkpoint, through every command that reads one
    cheaply (bench's matrix and chain go through the same load_model, above). A mutant that still loads (a flip
    inside a weight: the zip records carry no checksum torch verifies) fails at the data step after it; either
    way: exit 2, one line, no traceback, nothing written."""
    good = tmp_path / "good.pt"
    atomic_save(_float_ckpt(), good)
    data = good.read_bytes()
    rng = random.Random(18)
    mutants = [data[:rng.randrange(len(data))] for _ in range(4)]
    for _ in range(4):
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        mutants.append(bytes(b))
    refused = 0
    for i, m in enumerate(mutants):
        path = tmp_path / f"m{i}.pt"
        path.write_bytes(m)
        for name, run in _commands(path, tmp_path / "out", data=MISSING).items():
            if name.startswith("bench"):
                continue
            line = _refused(capsys, run(), tmp_path / "out")
            refused += str(path) in line
    assert refused >= 4 * 4        # every truncation, by every command, names the file
