"""The digits recipe: sklearn's digits (8x8 images, values 0..16) through the tabular pipeline,
with a fixed stratified 60 / 20 / 20 split. Its pixels share one scale, so the bundle takes
raw tensors (scaled by `MLPConfig.input_scale` inside the model) rather than standardised
features."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dynaroute.bundle import Bundle
from dynaroute.data import load_digits_splits
from dynaroute.datasets.dataset import Dataset, Part
from dynaroute.experts.mlp import MLPConfig
from dynaroute.training.supernet import SupernetTrainConfig
from dynaroute.training.tabular import train_tabular

DIGITS_DATA_NAME = "sklearn digits"  # the manifest's data name, by which `dynaroute eval` knows the recipe


def digits_dataset() -> Dataset:
    s = load_digits_splits()
    parts = {k: Part(DIGITS_DATA_NAME, np.arange(1, len(getattr(s, k)) + 1), getattr(s, k).x, getattr(s, k).y)
             for k in ("train", "val", "test")}
    return Dataset("tabular", tuple(str(i) for i in range(10)), parts, None,
                   {"name": DIGITS_DATA_NAME, "source": "digits"}, record_rows=False)


def train_digits(
    out: str | Path,
    model_config: MLPConfig | None = None,
    train_config: SupernetTrainConfig | None = None,
    name: str = "digits",
    progress: bool = True,
    run_dir: str | Path | None = None,
) -> Bundle:
    """Train the digits supernet (and its router), evaluate every subnet, write a bundle."""
    return train_tabular(digits_dataset(), out, model_config, train_config, name=name, run_dir=run_dir,
                         standardized=False, progress=progress)
