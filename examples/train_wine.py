"""Train the example tabular ResNet family on sklearn's wine data into a servable bundle.

    PYTHONPATH=. python -m examples.train_wine bundles/wine
    PYTHONPATH=. dynaroute eval bundles/wine

The wine table is written as a CSV (13 named features, a `label` column of class names) and
trained by `dynaroute.train`, the same pipeline as `dynaroute train --data FILE`, with the
example's family passed as a class (a manifest records it by import path, so the gateway, `eval`
and every Ray expert find it the same way, given the package on their PYTHONPATH): supernet
training (sandwich rule, in-place distillation), every subnet measured (accuracy, FLOPs,
latency), the router trained and calibrated on the validation split, the bundle written. The
manifest's input is tabular: clients send the 13 raw feature values and the gateway
standardises them with the statistics recorded here.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dynaroute
from dynaroute.bundle import Bundle
from dynaroute.datasets.dataset import DataSpec, load_dataset
from dynaroute.router.fit import router_scores, summarize
from dynaroute.router.replay import SubnetOutputs
from dynaroute.router.runtime import RouterRuntime
from dynaroute.training.evaluate import subnet_probs
from dynaroute.training.supernet import SupernetTrainConfig
from examples.tabular_resnet import SlimmableTabularResNet, TabularResNetConfig

SEED = 0


def write_wine_csv(path: str | Path) -> Path:
    """sklearn's wine data as a CSV: the 13 features by name, then `label` (the class name)."""
    from sklearn.datasets import load_wine

    data = load_wine()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*data.feature_names, "label"])
        for row, target in zip(data.data, data.target, strict=True):
            w.writerow([*(repr(float(v)) for v in row), data.target_names[target]])
    return path


def held_out_rows(csv_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The raw test rows and labels of the seeded split `train_wine` trained with."""
    part = load_dataset(DataSpec(str(csv_path), seed=SEED))["test"]
    return np.asarray(part.x, dtype=np.float32), np.asarray(part.y)


def train_wine(out: str | Path, config: TabularResNetConfig | None = None,
               train_config: SupernetTrainConfig | None = None, progress: bool = False) -> Bundle:
    """Write wine.csv beside `out`, train the family on it, and return the bundle."""
    out = Path(out)
    data = write_wine_csv(out.parent / "wine.csv")
    return dynaroute.train(
        data, out, family=SlimmableTabularResNet, model_config=config, name="wine-resnet", seed=SEED,
        train_config=train_config or SupernetTrainConfig(epochs=60, batch_size=32, seed=SEED), progress=progress,
    )


def evaluate(bundle: Bundle, x_raw: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Each subnet's accuracy on raw rows (encoded by the bundle's codec, as the gateway does),
    and the dynamic model at the reference budgets (router FLOPs included)."""
    x = torch.as_tensor(bundle.codec().encode(list(x_raw)).batch)
    probs = subnet_probs(bundle.supernet(), x)
    runtime = RouterRuntime.from_bundle(bundle)
    outputs = SubnetOutputs(probs, bundle.subnet_infos)
    full_val = float(bundle.manifest["calibration"]["full_accuracy"])
    return {
        "subnets": {name: float((p.argmax(-1) == y).mean()) for name, p in probs.items()},
        "dynamic": summarize(runtime.calibration, router_scores(runtime.router, x), outputs, y, full_val),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="bundle directory to write")
    args = parser.parse_args()
    bundle = train_wine(args.out, progress=True)
    report = evaluate(bundle, *held_out_rows(args.out.parent / "wine.csv"))
    for name, acc in report["subnets"].items():
        print(f"{name:12s} test accuracy {acc:.3f}  flops {bundle.subnet_info(name)['flops']}")
    for b in report["dynamic"]["budgets"]:
        print(f"quality {b['budget']:.2f}: {b['policy']:9s} accuracy {b['accuracy']:.3f} "
              f"flops ratio {b['flops_ratio']:.3f}")


if __name__ == "__main__":
    main()
