"""Atomic writes under kills: SIGTERM cleans up after itself; what SIGKILL leaves is swept by the next run."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from common.files import remove_stale_temporaries, temp_prefix

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_during_an_atomic_write_leaves_nothing(tmp_path):
    target = tmp_path / "model.pt"
    code = (
        "import sys, time\n"
        "from common.files import atomic_write, exit_cleanly_on_sigterm\n"
        "exit_cleanly_on_sigterm()\n"
        "def slow(f):\n"
        "    f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        f"atomic_write({str(target)!r}, slow)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        assert len(list(tmp_path.iterdir())) == 1          # the temporary file exists while writing
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        p.kill()
    assert list(tmp_path.iterdir()) == []                    # neither the target nor a temporary file


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a.tflite.{dead.pid}.k2j4.tmp"
    live = tmp_path / f"{temp_prefix(tmp_path / 'b.pt')}x9q1.tmp"      # this process: alive
    other = tmp_path / "notes.tmp"
    keep = tmp_path / "a.tflite"
    for f in (stale, live, other, keep):
        f.write_bytes(b"1")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, keep.name])
    assert remove_stale_temporaries(tmp_path / "missing") == []
