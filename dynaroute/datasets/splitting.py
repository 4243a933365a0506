"""Seeded stratified splits: each class is shuffled and cut in the same proportions, so every
split holds every class (a class with too few rows for that is refused, naming it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dynaroute.errors import DataError


def stratified_split(
    y: np.ndarray, fractions: Sequence[float], seed: int, file: str, column: str, names: Sequence[str]
) -> list[np.ndarray]:
    """Indices into `y` for each of `len(fractions) + 1` parts: the first gets what the others
    (`fractions` of every class each, at least one row each) leave. Sorted within each part."""
    if any(not 0 < f < 1 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions must be in (0, 1) and sum below 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in range(len(names)):
        idx = np.flatnonzero(y == c)
        need = len(fractions) + 1
        if len(idx) < need:
            raise DataError(f"class {names[c]!r} has {len(idx)} row(s); splitting into train and "
                            f"{len(fractions)} held-out part(s) needs at least {need} per class (or pass "
                            "--validation and --test files)", file=file, column=column)
        idx = rng.permutation(idx)
        start = 0
        cut = []
        for f in fractions:
            cut.append(max(1, round(f * len(idx))))
        while sum(cut) > len(idx) - 1:  # keep at least one training row
            cut[int(np.argmax(cut))] -= 1
        for k, n in enumerate(cut, start=1):
            parts[k] += idx[start : start + n].tolist()
            start += n
        parts[0] += idx[start:].tolist()
    return [np.asarray(sorted(p), dtype=np.int64) for p in parts]
