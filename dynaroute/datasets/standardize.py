"""Per-feature standardisation of tabular inputs: (x - mean) / std, with the training split's
statistics. The bundle stores them (manifest `input.mean` / `input.std`); the model is
trained on standardised values and clients send raw ones, which serving and `eval` transform
with the same statistics."""

from __future__ import annotations

import numpy as np

# A feature constant in training (std 0) is left centred, not divided by zero.
MIN_STD = 1e-12


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each column of `x` [rows, features], as float32."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    std = np.where(std < MIN_STD, 1.0, std)
    return x.mean(axis=0).astype(np.float32), std.astype(np.float32)


def standardize(x: np.ndarray, mean: np.ndarray | list[float], std: np.ndarray | list[float]) -> np.ndarray:
    """`(x - mean) / std` per feature, as float32."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32)
