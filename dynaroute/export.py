"""`dynaroute export BUNDLE --backend onnx|int8`: a bundle's subnets as ONNX graphs, checked.

Each subnet is exported as its stages (see dynaroute/experts/backends.py) into
`backends/<backend>/<subnet>/<graph>.onnx`; a graph byte-identical to one already written
(DynaBERT's embedding is the same in every subnet) is stored once and named by every subnet
that uses it. Before anything is written into the bundle, every exit's logits of every subnet
are compared with torch's on real rows (the bundle's validation split when its data can be read,
else inputs made from the input spec):

- onnx (fp32): the largest absolute difference must be <= FP32_TOLERANCE, or nothing is written;
- int8: the difference is recorded, and every subnet's accuracy is re-measured on the bundle's
  validation and test splits (`dynaroute eval`'s data; `--data` as for eval) and recorded.

The manifest gains `backends.<backend>`: the graphs per subnet, a sha256 per file (checked by
the expert that loads them), the comparison, and the measured latency per subnet at batch 1 and
32 of both torch and the backend, measured in the same run. `default_backend` becomes this
backend, which `dynaroute serve` then uses unless `--backend` says otherwise.

int8 also redoes the router's calibration on the int8 outputs where the rows it was measured on
can be read back (`recalibrate`); the served router then resolves budgets through that table.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaroute.bundle import Bundle, write_manifest
from dynaroute.errors import BundleError
from dynaroute.experts.backends import BACKENDS, make_backend
from dynaroute.experts.base import StagedModule
from dynaroute.experts.spec import SubnetSpec
from dynaroute.training.evaluate import median_latency_ms

FP32_TOLERANCE = 1e-4
LATENCY_BATCHES = (1, 32)
# Sentences for text bundles whose data cannot be read: varied lengths, so that the sequence axis
# is exported as dynamic and checked at several lengths.
SENTENCES = (
    "a gripping, beautifully acted film.",
    "dull.",
    "the plot meanders for two hours and the jokes never land, though the lead does what she can with it.",
    "not bad at all",
    "an uneven but often funny look at growing up in a small town where nothing ever happens",
    "i have rarely been so bored in a cinema",
    "it is a masterpiece of quiet observation , and one of the year 's best .",
    "worst sequel ever",
)


def rows_of(x: Any, idx: Any) -> Any:
    """Rows `idx` of a model input; text inputs are cut to the longest real sentence among them
    (dynamic padding, as the gateway pads a batch)."""
    if isinstance(x, tuple | list):
        ids, mask = (torch.as_tensor(t)[idx] for t in x)
        length = max(1, int(mask.sum(1).max()))
        return ids[:, :length].contiguous(), mask[:, :length].contiguous()
    return torch.as_tensor(x)[idx]


def batch_size_of(x: Any) -> int:
    return len(x[0]) if isinstance(x, tuple | list) else len(x)


def made_inputs(bundle: Bundle, n: int, seed: int = 0) -> Any:
    """`n` inputs built from the bundle's input spec, for bundles whose data is not at hand."""
    spec = bundle.manifest["input"]
    if spec.get("kind") not in ("text", "tensor"):
        raise BundleError(f"exporting a bundle of {spec.get('kind')!r} input needs its evaluation data; pass --data")
    if spec.get("kind") == "text":
        from dynaroute.text import TextEncoder

        encoder = TextEncoder.from_bundle(bundle)
        return encoder.encode([SENTENCES[i % len(SENTENCES)] for i in range(n)])
    rng = np.random.default_rng(seed)
    shape = [n, *spec["shape"]]
    return torch.from_numpy(rng.uniform(0, 16, shape).astype(spec.get("dtype", "float32")))


def eval_data(bundle: Bundle, data_path: str | Path | None) -> dict[str, Any] | None:
    """The validation and test splits `dynaroute eval` reads (`--data` as for eval), or None when
    the bundle's data cannot be read (say, the SST-2 folder is elsewhere and --data was not given)."""
    from dynaroute.errors import DataError
    from dynaroute.training.evaldata import eval_data as read_eval_data

    try:
        return read_eval_data(bundle, data_path)
    except (BundleError, DataError):
        return None


@torch.no_grad()
def max_abs_diff(reference: StagedModule, module: StagedModule, x: Any) -> float:
    """The largest absolute difference between two modules' logits at every exit."""
    return max(float((a.float() - b.float()).abs().max())
               for a, b in zip(reference.forward_exits(x), module.forward_exits(x), strict=True))


@torch.no_grad()
def accuracy(module: StagedModule, x: Any, y: np.ndarray, batch_size: int = 64) -> float:
    n = batch_size_of(x)
    # Text: similar lengths batched together, as training's evaluation does (less padding).
    order = np.argsort(np.asarray(x[1]).sum(1), kind="stable") if isinstance(x, tuple | list) else np.arange(n)
    correct = 0
    for start in range(0, n, batch_size):
        idx = torch.as_tensor(order[start : start + batch_size])
        pred = module(rows_of(x, idx)).argmax(-1).numpy()
        correct += int((pred == np.asarray(y)[idx.numpy()]).sum())
    return correct / n


def export_bundle(
    root: str | Path,
    backend_name: str,
    subnets: list[str] | None = None,
    data_path: str | Path | None = None,
    exporter: str = "torchscript",
    threads: int = 1,
    latency_repeats: int = 10,
    log: Any = None,
) -> dict[str, Any]:
    """Export, check and record one backend's graphs in the bundle at `root`; returns the
    manifest's `backends.<backend>` entry. Raises BundleError (writing nothing) when a graph's
    outputs are not within tolerance, or int8 accuracy cannot be measured."""
    say = log or (lambda _msg: None)
    bundle = Bundle.load(root)
    backend = make_backend(backend_name)
    if not backend.exported:
        raise BundleError(f"backend {backend_name!r} runs the torch modules and has nothing to export; "
                          f"expected one of {[b for b in BACKENDS if make_backend(b).exported]}")
    names = subnets or [s["name"] for s in bundle.subnet_infos]
    for name in names:
        bundle.subnet_info(name)  # KeyError naming the bundle's subnets
    torch.set_num_threads(threads)
    data = eval_data(bundle, data_path)
    if backend_name == "int8" and data is None:
        raise BundleError(f"int8 export re-measures every subnet's accuracy and needs bundle {bundle.name!r}'s "
                          "evaluation data; pass --data PATH (as for `dynaroute eval`)")
    # Real rows where the data can be read (the validation split), else inputs made from the spec.
    pool = data["val"][0] if data else made_inputs(bundle, max(LATENCY_BATCHES))
    n = batch_size_of(pool)
    check_x = rows_of(pool, torch.arange(min(16, n)))
    example, other = rows_of(check_x, torch.arange(1)), rows_of(check_x, torch.arange(1, 4))
    if isinstance(check_x, tuple) and example[0].shape[1] == other[0].shape[1]:  # lengths must differ
        other = made_inputs(bundle, 3)
    timing = {b: rows_of(pool, torch.arange(b) % n) for b in LATENCY_BATCHES}

    final = bundle.root / "backends" / backend_name
    staging = bundle.root / "backends" / f".{backend_name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    by_digest: dict[str, str] = {}  # sha256 -> path relative to the bundle (graphs stored once)
    entry: dict[str, Any] = {"exporter": exporter, "subnets": {}, "files": {}}
    supernet = bundle.supernet()
    modules: dict[str, StagedModule] = {}  # int8: kept to recalibrate on their outputs
    try:
        for name in names:
            started = time.perf_counter()
            reference = supernet.extract(SubnetSpec.parse(name)).eval()
            graphs: dict[str, str] = {}
            for graph, blob in backend.export(reference, example, other, exporter).items():
                digest = _digest(blob)
                if digest not in by_digest:
                    rel = f"backends/{backend_name}/{name}/{graph}.onnx"
                    path = staging / name / f"{graph}.onnx"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(blob)
                    by_digest[digest] = rel
                    entry["files"][rel] = digest
                graphs[graph] = by_digest[digest]
            module = backend.load(reference, {g: _staged(staging, rel, backend_name) for g, rel in graphs.items()},
                                  threads)
            diff = max_abs_diff(reference, module, check_x)
            if backend_name == "onnx" and not diff <= FP32_TOLERANCE:
                raise BundleError(f"subnet {name}: the onnx graphs' logits differ from torch's by up to {diff:.3g}, "
                                  f"more than the {FP32_TOLERANCE:g} allowed; nothing was written")
            row: dict[str, Any] = {"graphs": graphs, "max_abs_diff": diff, "latency_ms": {}, "torch_latency_ms": {}}
            for b, x in timing.items():
                row["latency_ms"][str(b)] = median_latency_ms(module, x, latency_repeats)
                row["torch_latency_ms"][str(b)] = median_latency_ms(reference, x, latency_repeats)
            if backend_name == "int8":
                for split in ("val", "test"):
                    row[f"{split}_accuracy"] = accuracy(module, *data[split])
                    row[f"torch_{split}_accuracy"] = accuracy(reference, *data[split])
            entry["subnets"][name] = row
            if backend_name == "int8":
                modules[name] = module
            say(f"{name}: {len(graphs)} graphs, max |diff| {diff:.2g}, "
                + ", ".join(f"batch {b}: {row['latency_ms'][str(b)]:.2f} ms "
                            f"(torch {row['torch_latency_ms'][str(b)]:.2f})" for b in LATENCY_BATCHES)
                + (f", test accuracy {row['test_accuracy']:.4f} (torch {row['torch_test_accuracy']:.4f})"
                   if "test_accuracy" in row else "")
                + f" [{time.perf_counter() - started:.1f} s]")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    import onnxruntime

    entry["onnxruntime"] = onnxruntime.__version__
    entry["torch"] = torch.__version__
    entry["threads"] = threads
    if backend_name == "int8":
        calibration = recalibrate(bundle, modules, data) if set(modules) == set(bundle_names(bundle)) else \
            "not redone: only some subnets were exported"
        entry["calibration" if isinstance(calibration, dict) else "calibration_note"] = calibration
        say(f"calibration on int8 outputs: {'redone' if isinstance(calibration, dict) else calibration}")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    manifest = dict(bundle.manifest)
    manifest.pop("schema_version", None)
    manifest["backends"] = {**manifest.get("backends", {}), backend_name: entry}
    manifest["default_backend"] = backend_name
    write_manifest(bundle.root, manifest)
    return entry


def bundle_names(bundle: Bundle) -> list[str]:
    return [s["name"] for s in bundle.subnet_infos]


@torch.no_grad()
def exit_probs(module: StagedModule, x: Any, batch_size: int = 64) -> list[np.ndarray]:
    """Softmax at every exit of `module` on all rows of `x`, shallowest first."""
    parts = [[torch.softmax(e.float(), -1).numpy() for e in module.forward_exits(rows_of(x, torch.arange(i, min(
        i + batch_size, batch_size_of(x)))))] for i in range(0, batch_size_of(x), batch_size)]
    return [np.concatenate(per_exit) for per_exit in zip(*parts, strict=True)]


def recalibrate(bundle: Bundle, modules: dict[str, StagedModule], data: dict[str, Any]) -> dict[str, Any] | str:
    """The router's calibration table measured again on these modules' outputs (int8), so that
    budgets resolve to what the int8 experts answer; or why it cannot be: the table must be
    re-measured on the rows it was measured on, and those must be the evaluation data's
    validation rows (an SST-2 bundle also calibrates on unused training rows, which only
    training knows)."""
    from dynaroute.router.calibration import CalibrationTable, calibrate
    from dynaroute.router.fit import router_scores
    from dynaroute.router.replay import SubnetOutputs
    from dynaroute.router.runtime import RouterRuntime

    recorded = bundle.manifest.get("calibration")
    if recorded is None or "router" not in bundle.manifest:
        return "not redone: the bundle has no router"
    val_x, val_y = data["val"]
    val_y = np.asarray(val_y)
    rows = calibration_rows(recorded, val_x, len(val_y))
    if rows is None:
        return (f"not redone: the bundle was calibrated on {recorded.get('rows')} rows "
                f"({recorded.get('rows_note', '')}), not the {len(val_y)} validation rows that can be read back")
    val_x, val_y = rows_of(val_x, rows), val_y[rows]
    # The same count could be other rows: torch's full model must also score what the table recorded.
    torch_full = accuracy(bundle.supernet().extract(SubnetSpec.parse(bundle.full_subnet)).eval(), val_x, val_y)
    if "full_accuracy" in recorded and abs(torch_full - float(recorded["full_accuracy"])) > 1e-9:
        return (f"not redone: torch's full model scores {torch_full:.4f} on the validation rows read back, not the "
                f"{float(recorded['full_accuracy']):.4f} the calibration recorded: they are other rows")
    probs: dict[str, np.ndarray] = {}
    for name, module in modules.items():
        exits = exit_probs(module, val_x)
        probs[name] = exits[-1]
        probs.update({f"{name}@{j}": p for j, p in enumerate(exits[:-1], start=1)})
    runtime = RouterRuntime.from_bundle(bundle)
    table = CalibrationTable.from_dict(recorded)
    policies = {k: v for k, v in table.options.items() if k != "static"}
    new = calibrate(*router_scores(runtime.router, val_x), SubnetOutputs(probs, bundle.subnet_infos), val_y,
                    runtime.flops, bundle.full_flops, policies, reference=bundle.full_subnet)
    full = float((probs[bundle.full_subnet].argmax(-1) == val_y).mean())
    return {**new.to_dict(), "rows": len(val_y), "full_accuracy": full}


def calibration_rows(recorded: dict[str, Any], val_x: Any, n: int) -> np.ndarray | None:
    """The validation rows the recorded table was measured on, where they can be told: all of them,
    or (SST-2: text calibrated on sentence-like rows only) the rows of sentence length, when their
    count is the one recorded. None when the table also used rows only training knows."""
    wanted = int(recorded.get("rows", n))
    if wanted == n:
        return np.arange(n)
    if isinstance(val_x, tuple) and "sentence-like" in recorded.get("rows_note", ""):
        from dynaroute.training.text import sentence_like_rows

        rows, _ = sentence_like_rows(np.asarray(val_x[1]).sum(1).tolist())
        if len(rows) == wanted:
            return rows
    return None


def _digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _staged(staging: Path, rel: str, backend_name: str) -> Path:
    """Where a graph named `rel` (its final place) lies while the export is in progress."""
    return staging / Path(rel).relative_to(f"backends/{backend_name}")


def main_export(args: argparse.Namespace) -> int:
    try:
        entry = export_bundle(args.bundle, args.backend, args.subnets, args.data, args.exporter,
                              threads=args.threads,
                              latency_repeats=args.repeats, log=print)
    except (BundleError, KeyError, ValueError) as e:
        print(f"dynaroute export: {e}", file=sys.stderr)
        return 2
    size = sum((Path(args.bundle) / rel).stat().st_size for rel in entry["files"])
    print(f"exported {len(entry['subnets'])} subnets for backend {args.backend!r}: {len(entry['files'])} graphs, "
          f"{size / 2**20:.1f} MiB, in {Path(args.bundle) / 'backends' / args.backend}")
    return 0

