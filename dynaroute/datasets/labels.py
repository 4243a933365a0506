"""Class labels: the names a data set's label column holds, in a fixed order, and their indices.

The order is the manifest's `task.labels` (class i is `labels[i]`): integer labels sorted by
value (so a file labelled 0..K-1 keeps its numbering), any other labels in order of first
appearance in the training file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynaroute.errors import DataError


def label_text(value: object) -> str:
    """A label cell as the name it stands for: integers (also 3.0 from JSON) as digits."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, np.generic):
        return label_text(value.item())
    return str(value).strip()


def _as_int(name: str) -> int | None:
    try:
        return int(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class LabelEncoder:
    """Label names in class order; `encode` maps a column of names to class indices."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise ValueError(f"LabelEncoder.names needs at least 2 classes, got {list(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"LabelEncoder.names must be distinct, got {list(self.names)}")

    @classmethod
    def fit(cls, names: Sequence[str], file: str, column: str) -> LabelEncoder:
        """The classes of a training label column; a single class is refused (nothing to learn)."""
        seen = list(dict.fromkeys(names))
        if len(seen) < 2:
            raise DataError(f"holds a single class {seen[:1]}; classification needs at least 2",
                            file=file, column=column)
        ints = [_as_int(n) for n in seen]
        if all(i is not None for i in ints):
            seen = [n for _, n in sorted(zip(ints, seen, strict=True))]
        return cls(tuple(seen))

    def encode(self, names: Sequence[str], rows: Sequence[int], file: str, column: str) -> np.ndarray:
        """Class indices; a label the training data never had is refused, naming its row."""
        index = {n: i for i, n in enumerate(self.names)}
        out = np.empty(len(names), dtype=np.int64)
        for k, (name, row) in enumerate(zip(names, rows, strict=True)):
            i = index.get(name)
            if i is None:
                raise DataError(f"label {name!r} never occurs in the training data; known labels: "
                                f"{list(self.names)}", file=file, row=row, column=column)
            out[k] = i
        return out
