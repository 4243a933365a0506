"""Data sets: sklearn's digits (the embedded default) and SST-2 TSV files."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIGITS_SEED = 0


@dataclass(frozen=True)
class Split:
    """Arrays of one split: inputs `x` and integer labels `y`."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split


def load_digits_splits() -> Splits:
    """sklearn's digits (8x8 images, values 0..16, as float32 of shape [64]) with a fixed
    stratified 60 / 20 / 20 train / validation / test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=DIGITS_SEED
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=DIGITS_SEED
    )
    return Splits(Split(x_train, y_train), Split(x_val, y_val), Split(x_test, y_test))


def read_sst2(path: str | Path, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """Read a GLUE SST-2 TSV (header `label<TAB>content`, or GLUE's `sentence<TAB>label`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SST-2 file {str(path)!r} does not exist")
    texts: list[str] = []
    labels: list[int] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        text_key = "content" if "content" in (reader.fieldnames or []) else "sentence"
        if text_key not in (reader.fieldnames or []) or "label" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: expected a header with 'label' and 'content' (or 'sentence')")
        for row in reader:
            texts.append(row[text_key])
            labels.append(int(row["label"]))
            if limit is not None and len(texts) >= limit:
                break
    return texts, np.asarray(labels, dtype=np.int64)
