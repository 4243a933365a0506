"""The tabular pipeline: the slimmable MLP sized from the data, trained as a supernet (the
sandwich rule, dynaroute/training/supernet.py), every subnet evaluated, the router fitted and
calibrated, into a bundle; the trained supernet is checkpointed in the run folder.

Features are standardised with the training split's statistics (`standardize=True`, any
user's table): the bundle's `input` is `{"kind": "tabular", "features", "mean", "std",
"value_range", ...}`, the model and router see standardised values and clients send raw ones.
A recipe whose inputs are already on one scale (digits) keeps raw tensors instead, scaled
inside the model by `MLPConfig.input_scale`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dynaroute.bundle import Bundle, save_weights, write_manifest
from dynaroute.codec import Standardizer
from dynaroute.data import Split, Splits
from dynaroute.datasets.dataset import Dataset
from dynaroute.experts.base import DynamicModel
from dynaroute.experts.mlp import SlimmableMLP
from dynaroute.router.fit import fit_router_and_calibrate
from dynaroute.training.evaluate import describe_subnets, subnet_probs
from dynaroute.training.stages import Checkpoints, run_dir_for
from dynaroute.training.supernet import SupernetTrainConfig, seed_everything, train_supernet


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore. These models are so small that a second
    thread only adds synchronisation, and on a busy 2-core machine OpenMP's spinning threads
    made an epoch 20x slower than with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sized_config(dataset: Dataset, model_config: Any, standardized: bool,
                 family: type[DynamicModel] = SlimmableMLP) -> Any:
    """`model_config` (the family's config dataclass; its defaults when None) with the data's
    input width and classes (and, for a family that scales its inputs, no scaling when they
    arrive standardised)."""
    width, classes = int(dataset["train"].x.shape[1]), dataset.num_classes
    cfg = model_config or family.config_class(in_features=width, num_classes=classes)
    scale = {"input_scale": 1.0} if standardized and hasattr(cfg, "input_scale") else {}
    return replace(cfg, in_features=width, num_classes=classes, **scale)


def config_dict(config: Any) -> dict[str, Any]:
    """A family config as the manifest stores it."""
    return config.to_dict() if hasattr(config, "to_dict") else asdict(config)


def train_tabular(
    dataset: Dataset,
    out: str | Path,
    model_config: Any = None,
    train_config: SupernetTrainConfig | None = None,
    name: str = "tabular",
    run_dir: str | Path | None = None,
    standardized: bool = True,
    progress: bool = True,
    family: type[DynamicModel] = SlimmableMLP,
) -> Bundle:
    """Train the supernet (resuming from the run folder when it holds it) and its router,
    evaluate every subnet, write the bundle to `out` and its checkpoint to `run_dir`
    (default `<out>.run`)."""
    with torch_threads(1):
        return _train_tabular(dataset, Path(out), model_config, train_config or SupernetTrainConfig(), name,
                              Path(run_dir) if run_dir else run_dir_for(out), standardized, progress, family)


def _train_tabular(dataset: Dataset, out: Path, model_config: Any, train_config: SupernetTrainConfig,
                   name: str, run_dir: Path, standardized: bool, progress: bool, family: type[DynamicModel]) -> Bundle:
    started = time.perf_counter()
    config = sized_config(dataset, model_config, standardized, family)
    raw = {k: dataset[k] for k in ("train", "val", "test")}
    standardizer = Standardizer.fit(raw["train"].x)  # the gateway applies the same, from the manifest
    x = {k: standardizer(p.x) if standardized else p.x.astype(np.float32) for k, p in raw.items()}
    splits = Splits(*(Split(x[k], raw[k].y) for k in ("train", "val", "test")))

    ck = Checkpoints(run_dir)
    ck.check_resumable({"family": family.family, "model": config_dict(config), "training": asdict(train_config),
                        "standardized": standardized})
    seed_everything(train_config.seed)
    model = family(config)
    if ck.done("supernet"):
        model.load_state_dict(load_file(str(ck.weights("supernet"))))
        model.eval()
    else:
        t0 = time.perf_counter()
        history = train_supernet(model, splits.train, train_config, progress=progress)
        save_weights(model, ck.weights("supernet"))
        ck.mark_done("supernet", epochs=train_config.epochs, final_loss=history[-1],
                     seconds=round(time.perf_counter() - t0, 1))

    split_map = {"train": splits.train, "val": splits.val, "test": splits.test}
    probs = {k: subnet_probs(model, torch.as_tensor(s.x)) for k, s in split_map.items()}
    labels = {k: s.y for k, s in split_map.items()}
    example = torch.as_tensor(splits.test.x[:1])
    subnets = describe_subnets(model, example, {k: probs[k] for k in ("val", "test")}, labels)

    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "supernet.safetensors")
    features = int(config.in_features)
    # value_range: raw training values; the gateway refuses inputs far outside them.
    value_range = [float(raw["train"].x.min()), float(raw["train"].x.max())]
    spec: dict[str, Any] = {"kind": "tensor", "dtype": "float32", "shape": [features], "value_range": value_range}
    if standardized:
        spec = {"kind": "tabular", "dtype": "float32", "shape": [features],
                "features": list(dataset.features or [f"x{j}" for j in range(features)]),
                **standardizer.to_dict(), "value_range": value_range}
    manifest = {
        "name": name,
        "task": {"kind": "classification", "labels": list(dataset.labels)},
        "input": spec,
        "supernet": {
            "family": family.family,
            "config": config_dict(config),
            "weights": "supernet.safetensors",
            "training": asdict(train_config),
        },
        "subnets": subnets,
        "full_subnet": model.full_spec.name,
        "data": dataset.manifest(),
    }
    manifest.update(fit_router_and_calibrate(model, splits, probs, labels, subnets, out, progress=progress))
    manifest["train_seconds"] = round(time.perf_counter() - started, 1)
    write_manifest(out, manifest)
    return Bundle.load(out)
