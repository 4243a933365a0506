"""Reading a table from a file: CSV, TSV, JSON Lines or .npz (arrays `X` and `y`).

A `Table` holds every column of the file by name, and for each data row the line it came from
(rows count from 1; a header is not a row). Nothing is validated here beyond the file's own
syntax: which columns are used, and what their values must be, is `dataset.py`'s business.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynaroute.errors import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".npz": "npz"}
# The column names an .npz file's arrays get: X's columns are features x0..x{F-1}, y the label.
NPZ_LABEL = "y"

MISSING: Any = object()  # a JSON Lines row without the key


@dataclass(frozen=True)
class Table:
    """The columns of one file. `columns[name][i]` is row i + 1's value (`MISSING` when a JSON
    Lines row lacks the key); `lines[i]` is the line it was read from (None for .npz)."""

    path: Path
    format: str
    columns: dict[str, Any]  # name -> list of values, or a numpy array (.npz)
    lines: list[int] | None

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    def line(self, row: int) -> int | None:
        """The file line of data row `row` (1-based), for error messages."""
        return self.lines[row - 1] if self.lines else None


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"unknown data format {path.suffix!r}; expected one of {sorted(FORMATS)}", file=str(path))
    return fmt


def read_table(path: str | Path) -> Table:
    """Read `path` by its suffix. Raises DataError naming the file (and row) when it cannot."""
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise DataError("no such file (expected a readable data file)", file=str(path))
    try:
        if fmt == "npz":
            return _read_npz(path)
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            return _read_jsonl(path, f) if fmt == "jsonl" else _read_delimited(path, f, fmt)
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=str(path)) from e
    except OSError as e:
        raise DataError(f"unreadable ({e.strerror or e})", file=str(path)) from e


def _read_delimited(path: Path, f: Any, fmt: str) -> Table:
    # TSV as GLUE writes it: no quoting, so a sentence may hold quote characters as they are.
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError("empty file; expected a header row naming the columns", file=str(path))
        names = [h.strip() for h in header]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"the header names columns {dupes} more than once", file=str(path))
        columns: dict[str, list[str]] = {n: [] for n in names}
        lines: list[int] = []
        for values in reader:
            if not values or (len(values) == 1 and not values[0].strip()):
                continue  # blank line
            row = len(lines) + 1
            if len(values) != len(names):
                raise DataError(f"has {len(values)} fields, the header {len(names)} (line {reader.line_num})",
                                file=str(path), row=row)
            for n, v in zip(names, values, strict=True):
                columns[n].append(v)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"malformed {fmt.upper()} at line {reader.line_num}: {e}", file=str(path)) from e
    return Table(path, fmt, columns, lines)


def _read_jsonl(path: Path, f: Any) -> Table:
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        row = len(records) + 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON (line {line_no}: {e.msg})", file=str(path), row=row) from e
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object per line, got {type(obj).__name__} (line {line_no})",
                            file=str(path), row=row)
        records.append(obj)
        lines.append(line_no)
    if not records:
        raise DataError("empty file; expected one JSON object per line", file=str(path))
    names: list[str] = []
    for r in records:  # every key any row has, in order of first appearance
        names += [k for k in r if k not in names]
    columns = {n: [r.get(n, MISSING) for r in records] for n in names}
    return Table(path, "jsonl", columns, lines)


def _read_npz(path: Path) -> Table:
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"not a readable .npz file ({e})", file=str(path)) from e
    missing = [k for k in ("X", "y") if k not in arrays]
    if missing:
        raise DataError(f"has no array {missing[0]!r}; expected arrays 'X' [rows, features] and 'y' [rows], "
                        f"found {sorted(arrays)}", file=str(path))
    x, y = arrays["X"], arrays["y"]
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"expected X of shape [rows, features] and y of shape [rows], got X {list(x.shape)} and "
                        f"y {list(y.shape)}", file=str(path))
    columns: dict[str, Any] = {f"x{j}": x[:, j] for j in range(x.shape[1])}
    columns[NPZ_LABEL] = [v.item() if hasattr(v, "item") else v for v in y]
    return Table(path, "npz", columns, None)
