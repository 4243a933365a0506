"""The data `dynaroute eval` measures a bundle on: its validation and test splits, as model
inputs with class indices into the bundle's labels.

`--data FILE` (any CSV, TSV, JSON Lines or .npz file with labels) is read in the bundle's input
format, with the columns the manifest records unless told others, and is both the test split
and the source of the candidate thresholds the curve sweeps (the calibration itself is the
bundle's). Without it, the splits the manifest records are rebuilt: the rows of the user's
files, or a recipe's (digits, SST-2) own splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaroute.bundle import Bundle
from dynaroute.codec import Standardizer
from dynaroute.datasets.dataset import DataSpec, Part, read_part
from dynaroute.datasets.labels import LabelEncoder
from dynaroute.datasets.reading import FORMATS, read_table
from dynaroute.errors import BundleError, DataError
from dynaroute.experts.base import DynamicModel
from dynaroute.training.evaluate import text_subnet_probs
from dynaroute.training.textdata import TextSplit


def model_inputs(bundle: Bundle, x: Any) -> Any:
    """Raw inputs as the bundle's models take them: tabular features standardised with the
    bundle's statistics, texts tokenised, tensors as they are."""
    spec = bundle.manifest["input"]
    if spec["kind"] == "text":
        from dynaroute.text import TextEncoder

        return TextEncoder.from_bundle(bundle).encode(list(x))
    if spec["kind"] == "tabular":
        return torch.as_tensor(Standardizer(spec["mean"], spec["std"])(x))  # as the gateway's codec does
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def _reading(bundle: Bundle, path: str, options: dict[str, Any]) -> DataSpec:
    """How to read `path` for this bundle: `options` (the eval command's column flags) over the
    columns the manifest records, over the bundle's input spec."""
    m = bundle.manifest
    columns = m.get("data", {}).get("columns", {})
    kind = m["input"]["kind"]
    label = options.get("label_column") or columns.get("label")
    if kind == "text":
        text = options.get("text_column") or columns.get("text") or "text"
        return DataSpec(path, label_column=label, text_column=text)
    features = options.get("feature_columns") or m["input"].get("features") or columns.get("features")
    return DataSpec(path, label_column=label, feature_columns=tuple(features) if features else None)


def read_labelled_file(bundle: Bundle, path: str | Path, options: dict[str, Any] | None = None) -> Part:
    """Read a labelled file in `bundle`'s input format; its labels must be the bundle's."""
    path = str(path)
    spec = _reading(bundle, path, options or {})
    features = spec.feature_columns
    if spec.kind == "tabular" and features is None:
        table = read_table(path)
        features = tuple(n for n in table.names if n != spec.label_for(table))
    width = bundle.manifest["input"].get("shape", [None])[0]
    if spec.kind == "tabular" and width is not None and len(features or ()) != width:
        raise DataError(f"has {len(features or ())} feature columns {list(features or ())}; the bundle "
                        f"{bundle.name!r} takes {width} (pass --feature-columns)", file=path)
    return read_part(path, spec, LabelEncoder(tuple(bundle.labels)), features)


def _probs_fn(bundle: Bundle, parts: dict[str, Part]) -> Any:
    if bundle.manifest["input"]["kind"] != "text":
        return None
    from dynaroute.text import TextEncoder

    encoder = TextEncoder.from_bundle(bundle)

    def probs(model: DynamicModel, split: str) -> dict[str, np.ndarray]:
        return text_subnet_probs(model, TextSplit(list(parts[split].x), parts[split].y), encoder)

    return probs


def _as_eval(bundle: Bundle, parts: dict[str, Part]) -> dict[str, Any]:
    out: dict[str, Any] = {k: (model_inputs(bundle, p.x), p.y) for k, p in parts.items()}
    probs = _probs_fn(bundle, parts)
    if probs is not None:
        out["subnet_probs"] = probs
    return out


def _recorded_files(bundle: Bundle) -> dict[str, Any]:
    """The validation and test rows the manifest records, read again from their files."""
    rows = bundle.manifest["data"].get("rows", {})
    parts = {}
    for split in ("val", "test"):
        record = rows.get(split)
        if record is None:
            raise BundleError(f"bundle {bundle.name!r} records no {split} rows; pass --data FILE")
        file = record["file"]
        if not Path(file).is_file():
            raise DataError(f"the bundle's {split} data is no longer there; pass --data FILE", file=file)
        part = read_labelled_file(bundle, file)
        parts[split] = part.take(np.asarray(record["rows"], dtype=np.int64) - 1)
    return _as_eval(bundle, parts)


def eval_data(bundle: Bundle, data_path: str | Path | None = None, options: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """{"val": (inputs, labels), "test": (inputs, labels)}, and "subnet_probs" (model, split) ->
    {subnet or f"{subnet}@{exit}": softmax} for models whose early exits are not the shallower
    subnets (DynaBERT)."""
    data = bundle.manifest.get("data", {})
    if data_path is not None and Path(data_path).suffix.lower() in FORMATS:
        part = read_labelled_file(bundle, data_path, options)
        return _as_eval(bundle, {"val": part, "test": part})
    source = data.get("source")
    if source == "digits" or data.get("name") == "sklearn digits":
        from dynaroute.data import load_digits_splits

        s = load_digits_splits()
        return {k: (torch.as_tensor(getattr(s, k).x), getattr(s, k).y) for k in ("val", "test")}
    if source == "sst2" or data.get("name") == "SST-2 (GLUE)":
        from dynaroute.training.sst2 import sst2_eval_data

        return sst2_eval_data(bundle, Path(data_path) if data_path else None)
    if data_path is not None:
        raise DataError(f"unknown data format {Path(data_path).suffix!r}; expected a labelled file, one of "
                        f"{sorted(FORMATS)}", file=str(data_path))
    if source == "files":
        return _recorded_files(bundle)
    raise BundleError(f"bundle {bundle.name!r} records no data it can be evaluated on again "
                      f"({data.get('name')!r}); pass --data FILE")
