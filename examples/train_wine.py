"""Train the example tabular ResNet family on sklearn's wine data into a servable bundle.

    PYTHONPATH=. python -m examples.train_wine bundles/wine

The steps are dynaroute's own building blocks, as `dynaroute train digits` runs them:
supernet training (sandwich rule, in-place distillation), every subnet measured (accuracy,
FLOPs, latency), a router trained and calibrated on the validation split, and the bundle
written (manifest + safetensors). The manifest's input is tabular: clients send the raw 13
feature values and the gateway standardises them with the statistics recorded here.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaroute.bundle import Bundle, save_weights, write_manifest
from dynaroute.codec import Standardizer
from dynaroute.data import Split
from dynaroute.router.fit import fit_router, router_scores, summarize
from dynaroute.router.model import MLPRouter, MLPRouterConfig
from dynaroute.router.replay import SubnetOutputs
from dynaroute.router.runtime import RouterRuntime
from dynaroute.train.evaluate import describe_subnets, subnet_probs
from dynaroute.train.router import RouterTrainConfig
from dynaroute.train.supernet import SupernetTrainConfig, seed_everything, train_supernet
from examples.tabular_resnet import SlimmableTabularResNet, TabularResNetConfig

SEED = 0


def wine_splits() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str], list[str]]:
    """Raw float32 features and labels of a stratified 60 / 20 / 20 split, the feature names
    and the class names."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    data = load_wine()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=SEED)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=SEED)
    splits = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
    return splits, list(data.feature_names), [str(n) for n in data.target_names]


def train_wine(out: str | Path, config: TabularResNetConfig | None = None,
               train_config: SupernetTrainConfig | None = None, progress: bool = False) -> Bundle:
    """Train, measure, route, calibrate, and write the bundle into `out`."""
    out = Path(out)
    started = time.perf_counter()
    raw, features, labels = wine_splits()
    standardize = Standardizer.fit(raw["train"][0])  # the statistics the gateway applies
    x = {k: torch.as_tensor(standardize(v[0])) for k, v in raw.items()}
    y = {k: v[1] for k, v in raw.items()}
    config = config or TabularResNetConfig(in_features=len(features), num_classes=len(labels))
    train_config = train_config or SupernetTrainConfig(epochs=60, batch_size=32, seed=SEED)

    seed_everything(SEED)
    model = SlimmableTabularResNet(config)
    train_supernet(model, Split(x["train"].numpy(), y["train"]), train_config, progress=progress)
    probs = {k: subnet_probs(model, x[k]) for k in raw}
    subnets = describe_subnets(model, x["test"][:1], {k: probs[k] for k in ("val", "test")}, y)

    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "supernet.safetensors")
    router_config = MLPRouterConfig(config.in_features, len(subnets), 1, input_scale=1.0)  # inputs standardised
    torch.manual_seed(SEED)
    routing = fit_router(model, x, probs, y, subnets, out, MLPRouter(router_config), MLPRouter.family,
                         router_config.to_dict(), train_config=RouterTrainConfig(epochs=100, seed=SEED),
                         progress=progress)
    x_train = raw["train"][0]
    write_manifest(out, {
        "name": "wine-resnet",
        "task": {"kind": "classification", "labels": labels},
        "input": {"kind": "tabular", "dtype": "float32", "shape": [len(features)], "features": features,
                  **standardize.to_dict(), "value_range": [float(x_train.min()), float(x_train.max())]},
        "supernet": {"family": SlimmableTabularResNet.family, "config": config.to_dict(),
                     "weights": "supernet.safetensors", "training": asdict(train_config)},
        "subnets": subnets,
        "full_subnet": model.full_spec.name,
        "data": {"name": "sklearn wine", "split_sizes": {k: len(v[1]) for k, v in raw.items()}},
        **routing,
        "train_seconds": round(time.perf_counter() - started, 1),
    })
    return Bundle.load(out)


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
    raw, _, _ = wine_splits()
    report = evaluate(bundle, *raw["test"])
    for name, acc in report["subnets"].items():
        print(f"{name:12s} test accuracy {acc:.3f}  flops {bundle.subnet_info(name)['flops']}")
    for b in report["dynamic"]["budgets"]:
        print(f"quality {b['budget']:.2f}: {b['policy']:9s} accuracy {b['accuracy']:.3f} "
              f"flops ratio {b['flops_ratio']:.3f}")


if __name__ == "__main__":
    main()
