"""`dynaroute train digits`: the embedded default, end to end, into a bundle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from dynaroute.bundle import Bundle, save_weights, write_manifest
from dynaroute.data import load_digits_splits
from dynaroute.experts.mlp import MLPConfig, SlimmableMLP
from dynaroute.train.evaluate import describe_subnets, subnet_probs
from dynaroute.train.supernet import SupernetTrainConfig, seed_everything, train_supernet


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore. The digits model is so small that a second
    thread only adds synchronisation, and on a busy 2-core machine OpenMP's spinning threads
    made an epoch 20x slower than with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_digits(
    out: str | Path,
    model_config: MLPConfig | None = None,
    train_config: SupernetTrainConfig | None = None,
    name: str = "digits",
    progress: bool = True,
) -> Bundle:
    """Train the digits supernet (and its router), evaluate every subnet, write a bundle."""
    with torch_threads(1):
        return _train_digits(out, model_config, train_config, name, progress)


def _train_digits(
    out: str | Path,
    model_config: MLPConfig | None,
    train_config: SupernetTrainConfig | None,
    name: str,
    progress: bool,
) -> Bundle:
    out = Path(out)
    model_config = model_config or MLPConfig()
    train_config = train_config or SupernetTrainConfig()
    started = time.perf_counter()
    seed_everything(train_config.seed)
    splits = load_digits_splits()
    model = SlimmableMLP(model_config)
    train_supernet(model, splits.train, train_config, progress=progress)

    split_map = {"train": splits.train, "val": splits.val, "test": splits.test}
    probs = {k: subnet_probs(model, torch.as_tensor(s.x)) for k, s in split_map.items()}
    labels = {k: s.y for k, s in split_map.items()}
    example = torch.as_tensor(splits.test.x[:1])
    subnets = describe_subnets(model, example, {k: probs[k] for k in ("val", "test")}, labels)

    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "supernet.safetensors")
    manifest = {
        "name": name,
        "task": {"kind": "classification", "labels": [str(i) for i in range(model_config.num_classes)]},
        # value_range: what the gateway refuses inputs far outside of (their logits overflow).
        "input": {"kind": "tensor", "dtype": "float32", "shape": [model_config.in_features],
                  "value_range": [float(splits.train.x.min()), float(splits.train.x.max())]},
        "supernet": {
            "family": SlimmableMLP.family,
            "config": model_config.to_dict(),
            "weights": "supernet.safetensors",
            "training": asdict(train_config),
        },
        "subnets": subnets,
        "full_subnet": model.full_spec.name,
        "data": {"name": "sklearn digits", "split_sizes": {k: len(s) for k, s in split_map.items()}},
    }
    from dynaroute.router.fit import fit_router_and_calibrate

    manifest.update(
        fit_router_and_calibrate(
            model, splits, probs, labels, subnets, out, progress=progress
        )
    )
    manifest["train_seconds"] = round(time.perf_counter() - started, 1)
    write_manifest(out, manifest)
    return Bundle.load(out)
