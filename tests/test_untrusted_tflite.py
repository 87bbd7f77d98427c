""".tflite files from elsewhere: every command that reads one (bench on the host and for a phone, export's
--compare-to, the matrix and the chain that re-read their files) refuses a malformed file with one line naming
it, exit 2, nothing written; the flatbuffer-editing path checks every offset it follows. On the tiny .tflite
files of tests/bench_fixtures.py, with the real LiteRT interpreter behind bench."""
from __future__ import annotations

import csv
import os
import random
import struct

import pytest
import torch

import bench.__main__ as bench_cli
import export.__main__ as export_cli
from conftest import tiny_config
from export import flatbuffer as fb
from export.tflite_file import TfliteError, verify
from mobilenet import build_model
from mobilenet.checkpoint import FORMAT, atomic_save
from tests.bench_fixtures import tiny_models  # noqa: F401 (fixture)


def _refused(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err[-3000:])
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _edit(data: bytes, change) -> bytes:
    """A well-formed flatbuffer whose content `change(model)` spoils (written without any check)."""
    model = fb.read(data)
    change(model)
    return fb.write(model)


def _bad(data: bytes, case: str) -> tuple[bytes, str]:
    """(malformed variant `case` of the valid file `data`, what its error must say)."""
    b = bytearray(data)
    if case == "no identifier":
        return bytes(64), "is not a .tflite file (no TFL3 identifier)"
    if case == "truncated":
        return data[:len(data) // 2], "is not a valid .tflite file"
    if case == "root past the end":
        struct.pack_into("<I", b, 0, len(b) + 100)
        return bytes(b), "outside the file"
    if case == "corrupt tables":                  # right identifier, tables overwritten
        b[8:72] = b"\xff" * 64
        return bytes(b), "is not a valid .tflite file"
    if case == "buffer index":
        return _edit(data, lambda m: setattr(m.subgraphs[0].tensors[0], "buffer", 999)), "names buffer 999"
    raise AssertionError(case)


CASES = ["no identifier", "truncated", "root past the end", "corrupt tables", "buffer index"]


@pytest.fixture
def bad(tiny_models, tmp_path, request):
    data, need = _bad(tiny_models["int8"].read_bytes(), request.param)
    path = tmp_path / "bad.tflite"
    path.write_bytes(data)
    return path, need


def _tiny_checkpoint(path):
    torch.manual_seed(0)
    m = build_model(tiny_config())
    atomic_save({"format": FORMAT, "kind": "fp32", "model_config": m.cfg.to_dict(), "model": m.state_dict()}, path)
    return path


@pytest.mark.parametrize("bad", CASES, indirect=True)
def test_bench_host_and_device_refuse_a_malformed_file(bad, tmp_path, capsys):
    path, need = bad
    out = tmp_path / "r.csv"
    _refused(capsys, bench_cli.main([str(path), "--csv", str(out)]), str(path), need)
    _refused(capsys, bench_cli.main(["--device", str(path), "--benchmark-binary", str(tmp_path / "bm"),
                                     "--csv", str(out)]), str(path), need)     # read before anything is pushed
    assert not out.exists()
    with pytest.raises(TfliteError, match=need.split(" (")[0]):      # the editing path: checked before unpacking
        fb.read(path.read_bytes(), str(path))


@pytest.mark.parametrize("bad", CASES, indirect=True)
def test_export_compare_to_refuses_a_malformed_file(bad, tmp_path, capsys):
    path, need = bad
    out = tmp_path / "m.tflite"
    rc = export_cli.main(["--checkpoint", str(_tiny_checkpoint(tmp_path / "c.pt")), "--out", str(out),
                          "--data", "random", "--compare-to", str(path)])
    _refused(capsys, rc, str(path), need)          # refused before the conversion starts
    assert not out.exists() and not (tmp_path / "m.tflite.json").exists()


@pytest.mark.parametrize("bad", ["truncated"], indirect=True)
def test_matrix_retime_and_chain_refuse_their_own_files_once_damaged(bad, tmp_path, capsys):
    from common.matrix import write_matrix_row
    path, need = bad
    mdir = tmp_path / "matrix"
    mdir.mkdir()
    write_matrix_row(mdir / "matrix.csv", {"config": "W8A8", "granularity": "per-channel", "calib": "real",
                                           "method": "rtn", "tflite": str(path), "export_status": "ok"})
    before = {f: (mdir / f).read_bytes() for f in os.listdir(mdir)}
    _refused(capsys, bench_cli.main(["--matrix", "--retime", "1", "--out", str(mdir)]), str(path), need)
    assert {f: (mdir / f).read_bytes() for f in os.listdir(mdir)} == before

    chain = tmp_path / "chain"          # every step before the host benchmark done, its two files damaged
    for name in ("prune/pruned.pt", "quantize/quantized.pt", "model_fp32.tflite", "model_w8a8.tflite"):
        (chain / name).parent.mkdir(parents=True, exist_ok=True)
        (chain / name).write_bytes(path.read_bytes())
    rc = bench_cli.main(["--chain", "--init", str(_tiny_checkpoint(tmp_path / "c.pt")), "--out", str(chain)])
    _refused(capsys, rc, str(chain / "model_fp32.tflite"), need)
    assert not (chain / "bench_host.csv").exists() and not (chain / "report.html").exists()


def test_a_file_litert_refuses_is_one_line(tiny_models, tmp_path, capsys):
    """Well-formed, but an operator version no kernel has: the worker's interpreter refuses it."""
    path = tmp_path / "v.tflite"
    path.write_bytes(_edit(tiny_models["int8"].read_bytes(), lambda m: setattr(m.operatorCodes[0], "version", 999)))
    verify(path.read_bytes())
    out = tmp_path / "r.csv"
    _refused(capsys, bench_cli.main([str(path), "--runs", "1", "--warmup", "0", "--csv", str(out)]),
             f"LiteRT cannot run {path}", "version '999'")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- fuzz

def _mutants(data: bytes, rng: random.Random, n: int) -> list[bytes]:
    """n/2 truncations and n/2 variants with 1 to 4 flipped bits."""
    out = [data[:rng.randrange(len(data))] for _ in range(n // 2)]
    for _ in range(n - n // 2):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    return out


def test_fuzzed_files_never_reach_a_reader_unchecked(tiny_models):
    """400 seeded mutants of both tiny files: `verify` raises TfliteError (one line) or passes, and every file it
    passes unpacks through the object API (export.flatbuffer.read) without an error. ~1 s."""
    rng = random.Random(18)
    passed = refused = 0
    for kind in ("int8", "float"):
        for m in _mutants(tiny_models[kind].read_bytes(), rng, 200):
            try:
                verify(m, "m")
            except TfliteError as e:
                assert "\n" not in str(e) and str(e).startswith("m is not a")
                refused += 1
                continue
            fb.read(m)
            passed += 1
    assert refused > 100 and passed > 50, (refused, passed)      # both sides of the check exercised


def test_fuzzed_files_through_the_commands(tiny_models, tmp_path, capsys):
    """Seeded truncations and bit flips of the tiny int8 file through bench (host and phone) and export's
    --compare-to, each given an option that fails after the file is read (--runs 0, no benchmark binary, a
    missing checkpoint), so that a mutant still well-formed (a flipped weight bit) ends in exit 2 too. Every run:
    exit 2, one line, no traceback, no output file; every truncation is refused by name."""
    rng = random.Random(18)
    out = tmp_path / "o.csv"
    named = 0
    for i, m in enumerate(_mutants(tiny_models["int8"].read_bytes(), rng, 16)):
        path = tmp_path / f"m{i}.tflite"
        path.write_bytes(m)
        runs = [lambda: bench_cli.main([str(path), "--runs", "0", "--csv", str(out)]),
                lambda: bench_cli.main(["--device", str(path), "--benchmark-binary", str(tmp_path / "none"),
                                        "--csv", str(out)]),
                lambda: export_cli.main(["--checkpoint", str(tmp_path / "none.pt"), "--out",
                                         str(tmp_path / "x.tflite"), "--compare-to", str(path)])]
        for run in runs:
            named += str(path) in _refused(capsys, run())
        assert not out.exists() and not (tmp_path / "x.tflite").exists()
    assert named >= 8 * 3


def test_csv_written_by_bench_has_the_usual_mode(tiny_models, tmp_path):
    out = tmp_path / "r.csv"
    assert bench_cli.main([str(tiny_models["int8"]), "--runs", "2", "--warmup", "0", "--csv", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for f in (out, tmp_path / "r.config.json"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert len(list(csv.DictReader(out.open()))) == 1
