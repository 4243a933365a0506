"""Evaluation of every subnet: accuracy per split, measured FLOPs, parameters and latency."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dynaroute.experts.base import DynamicModel
from dynaroute.experts.flops import count_flops, count_params, exit_flops
from dynaroute.experts.spec import SubnetSpec
from dynaroute.progress import progress_bar
from dynaroute.text import TextEncoder
from dynaroute.training.textdata import TextSplit


@torch.no_grad()
def subnet_probs(model: DynamicModel, x: Any, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Softmax outputs of every subnet on `x`: name -> [N, classes]. One pass per width and
    path gives all depths at once (`DynamicModel.subnet_logits`)."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {}
    n = len(x) if not isinstance(x, tuple) else len(x[0])
    by_width_path = sorted({(s.width, s.path) for s in model.subnets()})
    for start in range(0, n, batch_size):
        if isinstance(x, tuple):  # text models: (token ids, attention mask)
            xb = tuple(t[start : start + batch_size] for t in x)
        else:
            xb = torch.as_tensor(x[start : start + batch_size])
        for width, path in by_width_path:
            for depth, logits in model.subnet_logits(xb, width, path).items():
                spec = SubnetSpec(width, depth, path)
                out.setdefault(spec.name, []).append(torch.softmax(logits, -1).numpy())
    names = {s.name for s in model.subnets()}
    return {k: np.concatenate(v) for k, v in out.items() if k in names}


def median_latency_ms(module: torch.nn.Module, example: Any, repeats: int = 30) -> float:
    """Median wall-clock of one in-process forward at batch 1 (after warm-up)."""
    with torch.no_grad():
        for _ in range(3):
            module(example)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(example)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def describe_subnets(
    model: DynamicModel,
    example: Any,
    probs: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    measure_latency: bool = True,
) -> list[dict[str, Any]]:
    """Manifest entries: each subnet's FLOPs, parameters, accuracy per split and latency.

    `probs[split][name]` are the subnet's softmax outputs and `labels[split]` the truth.
    """
    rows = []
    for spec in model.subnets():
        sub = model.extract(spec)
        row: dict[str, Any] = {
            "name": spec.name,
            **spec.to_dict(),
            "params": count_params(sub),
            "flops": count_flops(sub, example),
            "exit_flops": exit_flops(sub, example),
        }
        for split, split_probs in probs.items():
            row[f"{split}_accuracy"] = float((split_probs[spec.name].argmax(-1) == labels[split]).mean())
        row["latency_ms"] = median_latency_ms(sub, example) if measure_latency else None
        rows.append(row)
    return rows


@torch.no_grad()
def text_subnet_probs(
    model: DynamicModel, split: TextSplit, encoder: TextEncoder, batch_size: int = 64, progress: bool = False
) -> dict[str, np.ndarray]:
    """Softmax outputs of every subnet on a split, length-bucketed: name -> [N, classes], and
    f"{name}@{j}" -> the output at its exit j < depth (early exit inside an expert; DynaBERT's
    shallow subnets keep other layers, so these are not the shallower subnets' outputs)."""
    model.eval()
    lengths = encoder.lengths(split.texts)
    order = sorted(range(len(split)), key=lambda i: lengths[i])
    out: dict[str, np.ndarray] = {}
    for start in progress_bar(range(0, len(order), batch_size), desc="evaluate", unit="batch", enabled=progress):
        idx = order[start : start + batch_size]
        x = encoder.encode([split.texts[i] for i in idx])
        for spec in model.subnets():
            exits = model.forward_exits(x, spec.width, depth=spec.depth)
            for j, logits in enumerate(exits, start=1):
                key = spec.name if j == len(exits) else f"{spec.name}@{j}"
                if key not in out:
                    out[key] = np.zeros((len(split), model.config.num_classes), np.float32)
                out[key][idx] = torch.softmax(logits, -1).numpy()
    return out


@torch.no_grad()
def full_accuracy(model: DynamicModel, split: TextSplit, encoder: TextEncoder, batch_size: int = 64) -> float:
    """Accuracy of the full-width, full-depth model (progress reports between stages)."""
    model.eval()
    lengths = encoder.lengths(split.texts)
    order = sorted(range(len(split)), key=lambda i: lengths[i])
    correct = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        logits = model.forward_exits(encoder.encode([split.texts[i] for i in idx]), 1.0)[-1]
        correct += int((logits.argmax(-1).numpy() == split.y[idx]).sum())
    return correct / len(split)
