"""`dynaroute.train(...)`: one entry to training for any classification data set.

A data set (a file path, a `DataSpec`, a `Dataset`, or `(x, y)` arrays) and a family (its
name or class; by default the one for the data's kind: the slimmable MLP for tabular data,
DynaBERT for text) go in; a loaded `Bundle` comes out. The whole data set is read and checked
before anything is trained or written, so bad data leaves no bundle behind. `dynaroute train
--data FILE` calls this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dynaroute.bundle import Bundle
from dynaroute.datasets.dataset import Dataset, DataSpec, dataset_from_arrays, load_dataset
from dynaroute.experts.base import SUPERNET_FAMILIES, DynamicModel
from dynaroute.training.supernet import SupernetTrainConfig

# Each input kind's default family. Tabular data trains any family (built in, a user's by import
# path or entry point, or its class); text trains DynaBERT, whose stages (teacher, width,
# depth distillation) are that family's recipe.
FAMILY_FOR_KIND = {"tabular": "slimmable_mlp", "text": "dynabert"}

DataLike = str | Path | DataSpec | Dataset | tuple[Any, Any]


def as_dataset(data: DataLike, **spec: Any) -> Dataset:
    """Read `data` (a path with `DataSpec` options, a DataSpec, a Dataset, or `(x, y)`)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, DataSpec):
        return load_dataset(data)
    if isinstance(data, tuple) and len(data) == 2:
        keys = {k: spec[k] for k in ("val_fraction", "test_fraction", "seed") if k in spec}
        return dataset_from_arrays(data[0], data[1], features=spec.get("feature_columns"), **keys)
    if isinstance(data, str | Path):
        return load_dataset(DataSpec(str(data), **spec))
    raise TypeError(f"data must be a file path, DataSpec, Dataset or (x, y) arrays; got {type(data).__name__}")


def supernet_family(family: str | type[DynamicModel] | None, kind: str) -> type[DynamicModel]:
    """The family class to train: given by name (as a manifest names it) or class, else the
    data kind's default; refused when this pipeline cannot train it on data of this kind."""
    if family is None:
        family = FAMILY_FOR_KIND[kind]
    cls = SUPERNET_FAMILIES.resolve(family) if isinstance(family, str) else family
    if not (isinstance(cls, type) and issubclass(cls, DynamicModel)):
        raise TypeError(f"family must be a name or a DynamicModel subclass; got {family!r}")
    if kind == "tabular":
        fields = {f.name for f in dataclasses.fields(cls.config_class)} if dataclasses.is_dataclass(
            getattr(cls, "config_class", None)) else set()
        missing = sorted({"in_features", "num_classes", "widths"} - fields)
        if missing:
            raise ValueError(f"family {cls.family!r} cannot be trained on tabular data: its config has no "
                             f"{', '.join(missing)} (the pipeline sizes the model from the data)")
    if kind == "text" and cls is not SUPERNET_FAMILIES.resolve(FAMILY_FOR_KIND["text"]):
        raise ValueError(f"text data trains the {FAMILY_FOR_KIND['text']!r} family (its distillation stages are "
                         f"DynaBERT's); got family {cls.family!r}")
    return cls


def train(
    data: DataLike,
    out: str | Path,
    family: str | type[DynamicModel] | None = None,
    *,
    validation: str | Path | None = None,
    test: str | Path | None = None,
    label_column: str | None = None,
    text_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
    run_dir: str | Path | None = None,
    model_config: Any = None,
    train_config: Any = None,
    base_model: str | Path | None = None,
    steps_cap: int | None = None,
    progress: bool = True,
) -> Bundle:
    """Train a supernet and its router on `data` and write the bundle to `out` (checkpoints to
    `run_dir`, default `<out>.run`); returns the loaded bundle.

    Tabular: `family` any supernet family whose config dataclass has `in_features`,
    `num_classes` and `widths` (the slimmable MLP by default); `model_config` an instance of it
    (its input width and classes are set from the data); `train_config` a SupernetTrainConfig.
    Text: `base_model` a local BERT folder (default all-MiniLM-L6-v2), `train_config` a
    TextTrainConfig, `steps_cap` a cap on every stage's steps (tiny runs).
    `seed` seeds the split (and the training, when no train_config is given).
    """
    spec = {"validation": str(validation) if validation else None, "test": str(test) if test else None,
            "label_column": label_column, "text_column": text_column,
            "feature_columns": tuple(feature_columns) if feature_columns else None,
            "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}
    if isinstance(data, tuple):
        spec = {k: spec[k] for k in ("feature_columns", "val_fraction", "test_fraction", "seed")}
    dataset = as_dataset(data, **spec)
    family_cls = supernet_family(family, dataset.kind)
    name = name or dataset.source.get("name") or Path(out).name
    if dataset.kind == "tabular":
        from dynaroute.training.tabular import train_tabular

        if train_config is not None and not isinstance(train_config, SupernetTrainConfig):
            raise TypeError(f"tabular data trains with a SupernetTrainConfig, got {type(train_config).__name__}")
        return train_tabular(dataset, out, model_config, train_config or SupernetTrainConfig(seed=seed),
                             name=name, run_dir=run_dir, progress=progress, family=family_cls)
    return _train_text(dataset, out, train_config, base_model, name, run_dir, steps_cap, seed, progress)


def _train_text(dataset: Dataset, out: str | Path, cfg: Any, base_model: str | Path | None, name: str,
                run_dir: str | Path | None, steps_cap: int | None, seed: int, progress: bool) -> Bundle:
    from dynaroute.training.text import TextTrainConfig, train_text
    from dynaroute.training.textdata import TextSplit

    if cfg is not None and not isinstance(cfg, TextTrainConfig):
        raise TypeError(f"text data trains with a TextTrainConfig, got {type(cfg).__name__}")
    cfg = cfg or TextTrainConfig(seed=seed)
    # The router learns from rows the supernet never trained on: a slice held out of train.
    dataset = dataset.hold_out("router", min(cfg.router_examples, len(dataset["train"]) // 5), seed)
    if cfg.max_examples is not None and cfg.max_examples < len(dataset["train"]):
        keep = np.sort(np.random.default_rng(seed).permutation(len(dataset["train"]))[: cfg.max_examples])
        dataset = replace(dataset, parts={**dataset.parts, "train": dataset["train"].take(keep)})
    splits = {k: TextSplit(list(p.x), p.y) for k, p in dataset.parts.items()}
    return train_text(splits, dataset.labels, out, cfg, base_model=base_model, name=name, data=dataset.manifest(),
                      run_dir=run_dir, steps_cap=steps_cap, progress=progress)
