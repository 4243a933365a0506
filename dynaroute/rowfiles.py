"""Reading inputs from files for `dynaroute infer`: one example (`--tensor`) or many (`--batch`).

A batch file holds one example per row, checked here against the served model's input spec
(GetModel), so that a malformed row is refused before anything is sent, with a message naming
the row (numbered from 0, header lines not counted) and the line it is on:

- `.npy`: an array [N, ...one example's shape] (or [N, size] of flattened examples; for text
  models, a 1-D array of strings), cast to the model's dtype;
- `.csv`: one example per line, its values flattened in row-major order; a first line that is
  not all numbers is a header. Text models: one sentence per line, in the column named `text`
  or `sentence` when the first line names one, else in the first column;
- `.jsonl`: one JSON value per line (blank lines skipped): an array of numbers (nested as the
  example's shape, or flat), or for text models a string or an object with a `"text"` string.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

BATCH_SUFFIXES = (".npy", ".csv", ".jsonl")
TEXT_COLUMNS = ("text", "sentence")


def load_tensor(path: str, dtype: str | None) -> np.ndarray:
    """One example from a .npy file (kept as stored) or a .json nested list (cast to `dtype`,
    the model's input dtype, since JSON numbers carry none)."""
    p = Path(path)
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--tensor {path}: not JSON ({e})") from None
        # A bare number or a nested list of numbers; numpy would make an object array of a
        # dict or of ragged lists, or raise TypeError deep inside.
        if not isinstance(data, list | int | float) or isinstance(data, bool):
            kind = {dict: "an object", str: "a string", bool: "true or false"}.get(type(data), "null")
            raise ValueError(f"--tensor {path}: expected a JSON array of numbers (one example), got {kind}")
        try:
            return np.asarray(data, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--tensor {path}: expected a JSON array of numbers (nested lists of one shape), "
                             f"which this is not ({e})") from None
    raise ValueError(f"--tensor: {path!r} must end in .npy or .json")


def load_rows(path: str, kind: str, dtype: str = "", shape: tuple[int, ...] = ()) -> np.ndarray | list[str]:
    """Every example of a batch file: an array [N, *shape] of `dtype` for a tensor model
    (`kind` "tensor"), a list of N sentences for a text model. ValueError names the row."""
    p = Path(path)
    if p.suffix not in BATCH_SUFFIXES:
        raise ValueError(f"--batch: {path!r} must end in one of {', '.join(BATCH_SUFFIXES)}")
    where = f"--batch {path}"
    if kind == "text":
        texts = _text_rows(p, where)
        if not texts:
            raise ValueError(f"{where}: holds no rows; expected one sentence per row")
        return texts
    if p.suffix == ".npy":
        array = _npy_tensor(p, where, dtype, shape)
    else:
        rows = _csv_numbers(p, where) if p.suffix == ".csv" else _jsonl_numbers(p, where)
        array = _stack(rows, where, dtype, shape)
    if len(array) == 0:
        raise ValueError(f"{where}: holds no rows; expected one example per row")
    return array


def _npy_tensor(p: Path, where: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    a = np.load(p, allow_pickle=False)
    size = math.prod(shape)
    if a.ndim == len(shape) + 1 and a.shape[1:] == shape:
        pass
    elif a.ndim == 2 and a.shape[1] == size:  # flattened examples
        a = a.reshape(len(a), *shape)
    else:
        raise ValueError(f"{where}: an array of shape {list(a.shape)}; expected [N, {', '.join(map(str, shape))}] "
                         f"(or [N, {size}]) for N examples")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{where}: an array of {a.dtype}; expected numbers (the model takes {dtype})")
    return a.astype(dtype, copy=False)


def _stack(rows: list[tuple[int, Any]], where: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """(line, values) per row -> [N, *shape]; each row nested as `shape` or flat."""
    size = math.prod(shape)
    out = np.empty((len(rows), *shape), dtype=dtype)
    for i, (line, values) in enumerate(rows):
        try:
            a = np.asarray(values, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: row {i} (line {line}): not an array of numbers ({e})") from None
        if a.shape != shape:
            if a.size != size or a.ndim != 1:
                raise ValueError(f"{where}: row {i} (line {line}): {a.size} values of shape {list(a.shape)}; "
                                 f"expected shape {list(shape)} or {size} values")
            a = a.reshape(shape)
        out[i] = a
    return out


def _csv_numbers(p: Path, where: str) -> list[tuple[int, list[float]]]:
    rows: list[tuple[int, list[float]]] = []
    with p.open(newline="") as f:
        reader = csv.reader(f)
        for fields in reader:
            if not fields or all(not v.strip() for v in fields):
                continue
            try:
                values = [float(v) for v in fields]
            except ValueError:
                if not rows and not any(_is_number(v) for v in fields):  # the header
                    continue
                bad = next(v for v in fields if not _is_number(v))
                raise ValueError(f"{where}: row {len(rows)} (line {reader.line_num}): {bad.strip()!r:.40} is not "
                                 "a number; expected comma-separated numbers") from None
            rows.append((reader.line_num, values))
    return rows


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _jsonl_lines(p: Path, where: str) -> list[tuple[int, Any]]:
    out = []
    for line_num, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((line_num, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: row {len(out)} (line {line_num}): not JSON ({e})") from None
    return out


def _jsonl_numbers(p: Path, where: str) -> list[tuple[int, Any]]:
    rows = _jsonl_lines(p, where)
    for i, (line, value) in enumerate(rows):
        if not isinstance(value, list):
            raise ValueError(f"{where}: row {i} (line {line}): expected a JSON array of numbers, "
                             f"got {type(value).__name__}")
    return rows


def _text_rows(p: Path, where: str) -> list[str]:
    if p.suffix == ".npy":
        a = np.load(p, allow_pickle=False)
        if a.ndim != 1 or a.dtype.kind != "U":
            raise ValueError(f"{where}: an array of {a.dtype} and shape {list(a.shape)}; the model takes text: "
                             "expected a 1-D array of strings")
        return [str(t) for t in a]
    if p.suffix == ".jsonl":
        texts = []
        for i, (line, value) in enumerate(_jsonl_lines(p, where)):
            if isinstance(value, dict):
                value = value.get("text")
            if not isinstance(value, str):
                raise ValueError(f"{where}: row {i} (line {line}): expected a JSON string or an object with a "
                                 "\"text\" string")
            texts.append(value)
        return texts
    with p.open(newline="") as f:
        reader = csv.reader(f)
        column, texts = 0, []
        for fields in reader:
            if not fields:
                continue
            if reader.line_num == 1 and (named := [v.strip().lower() for v in fields]) and (
                set(named) & set(TEXT_COLUMNS)
            ):
                column = next(j for j, v in enumerate(named) if v in TEXT_COLUMNS)
                continue
            if column >= len(fields):
                raise ValueError(f"{where}: row {len(texts)} (line {reader.line_num}): has no column {column + 1}")
            texts.append(fields[column])
        return texts
