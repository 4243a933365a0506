"""A labelled classification data set: its kind (text or tabular), its classes, and its
train / val / test splits, read from files (`DataSpec`) or given as arrays.

Every value is checked as it is read, and the first bad one raises one DataError naming the
file, the row and the column: a missing column, an empty text or label, a missing, NaN or
non-numeric feature, a single class, a class too small to split, a label in the validation or
test file that training never saw. Nothing is trained before the whole data set has passed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dynaroute.datasets.labels import LabelEncoder, label_text
from dynaroute.datasets.reading import MISSING, NPZ_LABEL, Table, read_table
from dynaroute.datasets.splitting import stratified_split
from dynaroute.errors import DataError, shown

Kind = Literal["text", "tabular"]
ARRAYS = "<arrays>"  # the "file" of a data set given as Python arrays
DEFAULT_LABEL = "label"


@dataclass(frozen=True)
class DataSpec:
    """Where a data set comes from and how its columns are read.

    train: the training file; validation / test: their own files, or None to split them off
    the training file (seeded, stratified, `val_fraction` and `test_fraction` of every class).
    text_column makes it text classification; otherwise it is tabular, over `feature_columns`
    (default: every column but the label). label_column defaults to "label" ("y" in .npz).
    """

    train: str
    validation: str | None = None
    test: str | None = None
    label_column: str | None = None
    text_column: str | None = None
    feature_columns: tuple[str, ...] | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.text_column is not None and self.feature_columns is not None:
            raise ValueError("DataSpec: give text_column (text) or feature_columns (tabular), not both")
        if self.feature_columns is not None:
            object.__setattr__(self, "feature_columns", tuple(self.feature_columns))
            if not self.feature_columns:
                raise ValueError("DataSpec.feature_columns must name at least one column")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ValueError(f"DataSpec.{name} must be in (0, 1), got {v}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("DataSpec.val_fraction + test_fraction must be below 1")

    @property
    def kind(self) -> Kind:
        return "text" if self.text_column is not None else "tabular"

    def label_for(self, table: Table) -> str:
        return self.label_column or (NPZ_LABEL if table.format == "npz" else DEFAULT_LABEL)


@dataclass(frozen=True)
class Part:
    """One split: inputs `x` (texts, or float32 [rows, features] of raw values), class indices
    `y`, and where each row came from (`file`, 1-based `rows`)."""

    file: str
    rows: np.ndarray
    x: Any
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> Part:
        x = [self.x[i] for i in idx] if isinstance(self.x, list) else self.x[idx]
        return Part(self.file, self.rows[idx], x, self.y[idx])


@dataclass(frozen=True)
class Dataset:
    """Classes (`labels`, class i is labels[i]) and named splits: "train", "val", "test", and
    any a trainer holds out of train (`hold_out`)."""

    kind: Kind
    labels: tuple[str, ...]
    parts: dict[str, Part]
    features: tuple[str, ...] | None = None  # tabular: the feature columns, in input order
    source: dict[str, Any] = field(default_factory=dict)  # the manifest's record of files and columns
    record_rows: bool = True  # False: a built-in data set whose rows are not a user's file's

    def __getitem__(self, split: str) -> Part:
        return self.parts[split]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def hold_out(self, name: str, n: int, seed: int) -> Dataset:
        """A new split `name` of about `n` training rows (stratified, seeded), removed from train."""
        train = self.parts["train"]
        fraction = min(max(n, 1) / len(train), 0.5)
        kept, held = stratified_split(train.y, [fraction], seed, train.file, "label", self.labels)
        return replace(self, parts={**self.parts, "train": train.take(kept), name: train.take(held)})

    def manifest(self) -> dict[str, Any]:
        """The manifest's `data`: the source files and columns, each split's file and rows."""
        out = {**self.source, "split_sizes": {k: len(p) for k, p in self.parts.items()}}
        if self.record_rows:
            out["rows"] = {k: {"file": p.file, "rows": p.rows.tolist()} for k, p in self.parts.items()}
        return out


def _column(table: Table, name: str, role: str) -> Any:
    if name not in table.columns:
        raise DataError(f"no such {role} column; the file has columns {table.names}", file=str(table.path),
                        column=name)
    return table.columns[name]


def _where(table: Table, row: int) -> str:
    line = table.line(row)
    return f" (line {line})" if line is not None else ""


def read_labels(table: Table, column: str) -> list[str]:
    """The label column as names; an empty or missing label is refused."""
    values = _column(table, column, "label")
    out = []
    for row, v in enumerate(values, start=1):
        name = "" if v is MISSING or v is None else label_text(v)
        if not name:
            raise DataError(f"empty label{_where(table, row)}; expected a class name or number", file=str(table.path),
                            row=row, column=column)
        out.append(name)
    return out


def read_texts(table: Table, column: str) -> list[str]:
    values = _column(table, column, "text")
    out = []
    for row, v in enumerate(values, start=1):
        text = "" if v is MISSING or v is None else str(v)
        if not text.strip():
            raise DataError(f"empty text{_where(table, row)}; expected a non-empty string", file=str(table.path),
                            row=row, column=column)
        out.append(text)
    return out


def read_features(table: Table, columns: Sequence[str]) -> np.ndarray:
    """The feature columns as float32 [rows, features]; a missing, non-numeric, NaN or infinite
    value is refused, naming its row and column."""
    cols = []
    for name in columns:
        values = _column(table, name, "feature")
        if isinstance(values, np.ndarray):
            col = values.astype(np.float64) if values.dtype.kind in "biuf" else None
            if col is None:
                raise DataError(f"holds {values.dtype} values; expected numbers", file=str(table.path), column=name)
            bad = np.flatnonzero(~np.isfinite(col))
            if len(bad):
                raise DataError(f"{col[bad[0]]} is not a finite number", file=str(table.path), row=int(bad[0]) + 1,
                                column=name)
            cols.append(col)
            continue
        col = np.empty(len(values), dtype=np.float64)
        for row, v in enumerate(values, start=1):
            col[row - 1] = _number(v, table, row, name)
        cols.append(col)
    return np.stack(cols, axis=1).astype(np.float32)


def _number(v: Any, table: Table, row: int, column: str) -> float:
    hint = "; expected a number (for a text column, pass --text-column)"
    if v is MISSING or v is None or (isinstance(v, str) and not v.strip()):
        raise DataError(f"missing value{_where(table, row)}{hint}", file=str(table.path), row=row, column=column)
    if isinstance(v, bool):
        raise DataError(f"{v} is not a number{_where(table, row)}{hint}", file=str(table.path), row=row, column=column)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise DataError(f"{shown(v)} is not a number{_where(table, row)}{hint}", file=str(table.path), row=row,
                        column=column) from None
    if not math.isfinite(x):
        raise DataError(f"{shown(v)} is not a finite number{_where(table, row)}; expected a number",
                        file=str(table.path), row=row, column=column)
    return x


def feature_columns(spec: DataSpec, table: Table) -> tuple[str, ...]:
    label = spec.label_for(table)
    _column(table, label, "label")
    cols = spec.feature_columns or tuple(n for n in table.names if n != label)
    if not cols:
        raise DataError(f"has no feature column besides the label {label!r}", file=str(table.path))
    return cols


def read_part(path: str, spec: DataSpec, encoder: LabelEncoder, features: Sequence[str] | None) -> Part:
    """Read one file as a Part, its labels encoded by `encoder` (a label it lacks is refused)."""
    table = read_table(path)
    label_column = spec.label_for(table)
    names = read_labels(table, label_column)
    x: Any = read_texts(table, spec.text_column or "") if spec.kind == "text" else read_features(table, features or ())
    rows = np.arange(1, len(table) + 1, dtype=np.int64)
    return Part(str(path), rows, x, encoder.encode(names, rows, str(path), label_column))


def load_dataset(spec: DataSpec) -> Dataset:
    """Read and check every file of `spec`, encode the labels, and split what has no file."""
    train_table = read_table(spec.train)
    label_column = spec.label_for(train_table)
    features = feature_columns(spec, train_table) if spec.kind == "tabular" else None
    if spec.kind == "text":
        x: Any = read_texts(train_table, spec.text_column or "")
    else:
        x = read_features(train_table, features or ())
    names = read_labels(train_table, label_column)
    encoder = LabelEncoder.fit(names, spec.train, label_column)
    rows = np.arange(1, len(train_table) + 1, dtype=np.int64)
    train = Part(spec.train, rows, x, encoder.encode(names, rows, spec.train, label_column))
    given = {k: read_part(p, spec, encoder, features)
             for k, p in (("val", spec.validation), ("test", spec.test)) if p is not None}
    missing = [k for k in ("val", "test") if k not in given]
    if missing:
        fractions = [spec.val_fraction if k == "val" else spec.test_fraction for k in missing]
        kept, *held = stratified_split(train.y, fractions, spec.seed, spec.train, label_column, encoder.names)
        given.update({k: train.take(idx) for k, idx in zip(missing, held, strict=True)})
        train = train.take(kept)
    source = {
        "name": Path(spec.train).stem, "source": "files", "kind": spec.kind, "format": train_table.format,
        "files": {"train": str(Path(spec.train).resolve()),
                  "validation": str(Path(spec.validation).resolve()) if spec.validation else None,
                  "test": str(Path(spec.test).resolve()) if spec.test else None},
        "columns": {"label": label_column, **({"text": spec.text_column} if spec.kind == "text"
                                              else {"features": list(features or ())})},
        "split": {"seed": spec.seed, "val_fraction": spec.val_fraction, "test_fraction": spec.test_fraction,
                  "split_off_train": missing},
    }
    return Dataset(spec.kind, encoder.names, {"train": train, **given}, features, source)


def dataset_from_arrays(
    x: Sequence[str] | np.ndarray | Sequence[Sequence[float]],
    y: Sequence[Any] | np.ndarray,
    features: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """A data set from Python values: `x` a list of strings (text) or a 2-D array of numbers
    (tabular), `y` the labels (names or integers). Checked and split as a file would be; row
    numbers are positions from 1."""
    text = len(x) > 0 and isinstance(x[0], str)
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} rows but y has {len(y)}; expected one label per row", file=ARRAYS)
    columns: dict[str, Any]
    if text:
        columns = {"text": list(x)}
        feats = None
    else:
        arr = np.asarray(x, dtype=object if not isinstance(x, np.ndarray) else None)
        if arr.ndim != 2:
            raise DataError(f"x has shape {list(arr.shape)}; expected strings or [rows, features]", file=ARRAYS)
        feats = tuple(features or (f"x{j}" for j in range(arr.shape[1])))
        if len(feats) != arr.shape[1]:
            raise DataError(f"{len(feats)} feature names for {arr.shape[1]} columns", file=ARRAYS)
        columns = {name: arr[:, j] if arr.dtype != object else list(arr[:, j]) for j, name in enumerate(feats)}
    columns[DEFAULT_LABEL] = [v.item() if isinstance(v, np.generic) else v for v in y]
    table = Table(Path(ARRAYS), "arrays", columns, None)
    xs: Any = read_texts(table, "text") if text else read_features(table, feats or ())
    names = read_labels(table, DEFAULT_LABEL)
    encoder = LabelEncoder.fit(names, ARRAYS, DEFAULT_LABEL)
    rows = np.arange(1, len(table) + 1, dtype=np.int64)
    full = Part(ARRAYS, rows, xs, encoder.encode(names, rows, ARRAYS, DEFAULT_LABEL))
    kept, val, test = stratified_split(full.y, [val_fraction, test_fraction], seed, ARRAYS, DEFAULT_LABEL,
                                       encoder.names)
    source = {"name": "arrays", "source": "arrays", "kind": "text" if text else "tabular",
              "split": {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}}
    return Dataset("text" if text else "tabular", encoder.names,
                   {"train": full.take(kept), "val": full.take(val), "test": full.take(test)}, feats, source)
