"""Files written so that nothing half-written is ever left behind, with one permission rule, and their digests.

Every file the project writes (checkpoints, .tflite files, CSVs, JSON, plots, the cached benchmark binary) goes
through `atomic_file`: written beside its target under a temporary name, synced, given the mode a plain open()
would give (0644 under the usual umask), then renamed. Entry points call `exit_cleanly_on_sigterm` so that a
`kill` cleans up like Ctrl-C, and `remove_stale_temporaries` clears what a SIGKILL left.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_file", "atomic_write", "atomic_write_bytes", "atomic_write_text", "temp_prefix",
           "remove_stale_temporaries", "exit_cleanly_on_sigterm", "sha256_file", "tensor_digest"]


def temp_prefix(path: str | os.PathLike) -> str:
    """Prefix of the temporary file an atomic write of `path` uses: `.NAME.PID.` (+ random + `.tmp`), so that
    one left behind by a killed process can be told from one a live process is still writing."""
    return f".{Path(path).name}.{os.getpid()}."


_TEMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files in `directory` whose writer is dead (SIGKILL, power loss: nothing can clean
    up after those); files of live processes are left alone. Returns what was removed."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for f in d.iterdir():
        m = _TEMP.match(f.name)
        if not m or not f.is_file():
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue            # alive (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        f.unlink(missing_ok=True)
        removed.append(f)
    return removed


def exit_cleanly_on_sigterm():
    """Make SIGTERM (`kill`, a CI or batch-system timeout) raise SystemExit(143), as Ctrl-C raises
    KeyboardInterrupt, so that the `except BaseException` clean-up of every atomic write runs and no temporary
    file is left behind. Called by each command-line entry point."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write (and check); when the block ends without an
    exception it is synced and renamed to `path`, so a reader never sees half a file, and any exception
    (Ctrl-C, SIGTERM via `exit_cleanly_on_sigterm`, a failed check) deletes it and leaves `path` as it was.
    The file gets the mode a plain open() would give (0644 under the usual umask 022), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write) -> Path:
    """`write(f)` into a binary file opened on a temporary path beside `path`, then renamed (see atomic_file)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write_bytes(text.encode(), path)



def sha256_file(path: str | os.PathLike) -> str | None:
    """Hex sha256 of a file's bytes; None if there is no such file (provenance then says unknown)."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_digest(module) -> str:
    """sha256 over every parameter and buffer of a torch module, in state_dict order (names and bytes): equal
    digests mean bit-identical models."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
