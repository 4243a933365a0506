"""The SST-2 recipe: GLUE's train.tsv and dev.tsv through the text pipeline.

train.tsv is shuffled once (seeded) into validation, router and training slices; dev.tsv is
the test split. Its training rows are phrases cut from the treebank's sentences, while what is
served (and dev.tsv) are whole sentences, so calibration uses sentence-like rows
(`sentence_calibration`, see dynaroute/training/text.py).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaroute.bundle import Bundle
from dynaroute.data import read_sst2
from dynaroute.errors import BundleError
from dynaroute.experts.base import DynamicModel
from dynaroute.text import TextEncoder
from dynaroute.training.evaluate import text_subnet_probs
from dynaroute.training.text import TextTrainConfig, train_text
from dynaroute.training.textdata import TextSplit

LABELS = ["negative", "positive"]
SST2_DATA_NAME = "SST-2 (GLUE)"  # the manifest's data name, by which `dynaroute eval` knows the recipe

# The SST-2 recipe's settings are the text pipeline's; val_examples and test_examples are read here.
SST2TrainConfig = TextTrainConfig


def load_sst2_splits(data: Path, cfg: TextTrainConfig) -> dict[str, TextSplit]:
    """train.tsv shuffled once (seeded) into val / router / train slices; dev.tsv is the test split."""
    texts, y = read_sst2(data / "train.tsv")
    order = np.random.default_rng(cfg.seed).permutation(len(texts))
    n_val = min(cfg.val_examples, len(texts) // 5)
    n_router = min(cfg.router_examples, len(texts) // 5)
    pick = {
        "val": order[:n_val],
        "router": order[n_val : n_val + n_router],
        "train": order[n_val + n_router :][: cfg.max_examples],
    }
    splits = {k: TextSplit([texts[i] for i in idx], y[idx]) for k, idx in pick.items()}
    test_texts, test_y = read_sst2(data / "dev.tsv", limit=cfg.test_examples)
    splits["test"] = TextSplit(test_texts, test_y)
    return splits


def train_sst2(
    data: str | Path,
    out: str | Path,
    cfg: TextTrainConfig | None = None,
    base_model: str | Path | None = None,
    name: str = "sst2",
    steps_cap: int | None = None,
    progress: bool = True,
    run_dir: str | Path | None = None,
) -> Bundle:
    """Run (or resume) the SST-2 recipe: bundle to `out`, checkpoints to `run_dir` (`<out>.run`)."""
    cfg = cfg or TextTrainConfig()
    data = Path(data)
    splits = load_sst2_splits(data, cfg)
    record = {"name": SST2_DATA_NAME, "source": "sst2", "kind": "text", "path": str(data.resolve()), "test": "dev.tsv"}
    return train_text(splits, LABELS, out, cfg, base_model=base_model, name=name, data=record, run_dir=run_dir,
                      steps_cap=steps_cap, sentence_calibration=True, progress=progress)


def config_from_args(args: argparse.Namespace) -> TextTrainConfig:
    """The text settings `dynaroute train` was given (its defaults where a flag is absent)."""
    cfg = TextTrainConfig(max_length=args.max_length or TextTrainConfig.max_length, max_examples=args.max_examples,
                          seed=args.seed)
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["epochs"] = float(args.epochs)
    for key in ("teacher_epochs", "teacher_steps", "width_steps", "depth_steps", "val_examples", "router_examples",
                "test_examples", "batch_size"):
        v = getattr(args, key, None)
        if v is not None:
            overrides[key] = v
    return replace(cfg, **overrides)


def main_sst2(args: argparse.Namespace) -> int:
    if not args.data:
        raise SystemExit("dynaroute train sst2 needs --data PATH (a folder with train.tsv and dev.tsv)")
    torch.set_num_threads(max(1, int(getattr(args, "threads", None) or torch.get_num_threads())))
    bundle = train_sst2(
        args.data, args.out, config_from_args(args), base_model=args.base_model, name=args.name or "sst2",
        steps_cap=args.steps, run_dir=args.run_dir,
    )
    full = bundle.subnet_info(bundle.full_subnet)
    print(f"wrote bundle {bundle.name!r} to {args.out} in {bundle.manifest['train_seconds']} s; "
          f"full model test accuracy {full['test_accuracy']:.4f}")
    return 0


def sst2_eval_data(bundle: Bundle, data_path: Path | None = None) -> dict[str, Any]:
    """The bundle's validation slice of train.tsv and its test split (dev.tsv), rebuilt from the
    training settings in the manifest, read from `data_path` (`dynaroute eval --data`) or else
    the folder the manifest records. Subnet outputs include every early exit (DynaBERT's
    shallower subnets keep other layers, so they are not its exits)."""
    recorded = bundle.manifest.get("data", {}).get("path")
    folder = data_path or (Path(recorded) if recorded else None)
    if folder is None or not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
        raise BundleError(f"evaluating SST-2 bundle {bundle.name!r} needs the SST-2 folder (train.tsv and dev.tsv); "
                          f"{'got ' + repr(str(folder)) if folder else 'the manifest records none'}: "
                          "pass --data PATH")
    training = bundle.manifest["supernet"]["training"]
    known = set(TextTrainConfig.__dataclass_fields__)
    cfg = TextTrainConfig(**{k: v for k, v in training.items() if k in known})
    splits = load_sst2_splits(folder, cfg)
    encoder = TextEncoder.from_bundle(bundle)

    def probs(model: DynamicModel, split: str) -> dict[str, np.ndarray]:
        return text_subnet_probs(model, splits[split], encoder)

    return {
        **{k: (encoder.encode(splits[k].texts), splits[k].y) for k in ("val", "test")},
        "subnet_probs": probs,
    }
