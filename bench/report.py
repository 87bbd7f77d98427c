"""Tables and files: a text table for the terminal, CSV and JSON written atomically."""

from __future__ import annotations

import csv
import io
import json
import os

from common.files import atomic_write_text

__all__ = ["format_table", "write_csv", "append_csv", "write_json", "write_text"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Fixed-width text table; None shows as '-', floats with 4 significant digits."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_text(path: str, text: str) -> None:
    """Replace `path` with `text`, atomically (a reader never sees half a file; a failed command leaves the
    previous file, or none), with the mode a plain open() would give."""
    atomic_write_text(text, path)


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return buf.getvalue()


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    """Replace `path` with a CSV of `rows`."""
    write_text(path, _csv_text(rows, columns))


def append_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    """Add `rows` to the CSV at `path` (created with a header if missing), atomically.

    Raises ValueError if the existing file has other columns, rather than mixing shapes.
    """
    old: list[dict] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames and list(reader.fieldnames) != columns:
                raise ValueError(
                    f"{path} has columns {reader.fieldnames}, expected {columns}: "
                    "use another --csv file")
            old = list(reader)
    write_csv(path, old + rows, columns)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
