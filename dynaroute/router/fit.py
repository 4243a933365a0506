"""Train the router, calibrate it on the validation split, and describe it for the manifest.

`fit_router` is generic over the router module and its inputs (a tensor, or an (ids, mask)
tuple per split); `fit_router_and_calibrate` is the digits pipeline's call. Both ways of
training are run and compared (see dynaroute/training/router.py): the joint fine-tune starts, on
copies, from the supervised router and the trained supernet and is calibrated the same way,
so the two differ only by the joint step. The bundle keeps the supervised router on the
supernet as trained: keeping the joint one would also replace the shared weights and so every
static subnet's measured accuracy, and on digits it saves no more compute at the same
accuracy (router.training.comparison in the manifest, printed by `dynaroute eval`).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaroute.bundle import save_weights
from dynaroute.data import Splits
from dynaroute.experts.base import DynamicModel
from dynaroute.experts.flops import count_flops
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import CalibrationTable, calibrate, choose_cascade, measure
from dynaroute.router.cascade import pareto_ladder
from dynaroute.router.model import MLPRouter, MLPRouterConfig, Router
from dynaroute.router.policy import make_policy
from dynaroute.router.replay import SubnetOutputs
from dynaroute.training.evaluate import subnet_probs
from dynaroute.training.router import (
    JointTrainConfig,
    RouterTrainConfig,
    correctness_targets,
    path_targets,
    take,
    train_joint,
    train_router_supervised,
)

ROUTER_WEIGHTS = "router.safetensors"
# What the bundle calibrates; the cascade's start_threshold and top-k's k are its options.
DEFAULT_POLICIES: dict[str, dict[str, float]] = {"threshold": {}, "cascade": {"start_threshold": 0.5}, "topk": {"k": 2}}
# "Close to the full model": the accuracy gap the comparison reports FLOPs at.
NEAR_FULL_GAP = 0.003


@torch.no_grad()
def router_scores(router: Router, x: Any, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(correct_prob [N, S], gate [N, K]) of a whole split."""
    router.eval()
    n = len(x[0]) if isinstance(x, tuple) else len(x)
    cs, gs = [], []
    for start in range(0, n, batch_size):
        c, g = router(take(x, slice(start, start + batch_size)))
        cs.append(torch.sigmoid(c).numpy())
        gs.append(torch.softmax(g, -1).numpy())
    return np.concatenate(cs), np.concatenate(gs)


def summarize(table: CalibrationTable, scores: tuple[np.ndarray, np.ndarray], outputs: SubnetOutputs,
              labels: np.ndarray, full_val_accuracy: float) -> dict[str, Any]:
    """Test-split figures of a calibrated router: the five reference budgets and the point
    chosen on validation to be within NEAR_FULL_GAP of the full model's accuracy."""
    def at(budget: Budget) -> dict[str, Any]:
        p = table.solve(budget).point
        policy = make_policy(p.policy, outputs.names, outputs.flops, **table.options.get(p.policy, {}))
        m = measure(p, policy, *scores, outputs, labels, table.router_flops, table.full_flops)
        return {"policy": p.policy, "threshold": p.threshold, "val_accuracy": p.accuracy, **m}

    return {
        "budgets": [{"budget": q, **at(Budget(quality=q))} for q in (0.0, 0.25, 0.5, 0.75, 1.0)],
        "near_full": at(Budget(target_accuracy=max(0.0, full_val_accuracy - NEAR_FULL_GAP))),
    }


def fit_router(
    model: DynamicModel,
    inputs: dict[str, Any],
    probs: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    subnets: list[dict[str, Any]],
    out: Path,
    router: Router,
    family: str,
    config: dict[str, Any],
    train_config: RouterTrainConfig | None = None,
    joint_config: JointTrainConfig | None = None,
    policies: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    calibration_rows: np.ndarray | None = None,
    calibration_note: str = "",
    ladder_gap: float | None = None,
    thresholds: dict[str, np.ndarray] | None = None,
    cascade_start_thresholds: list[float] | None = None,
) -> dict[str, Any]:
    """Train `router` (supervised; and, given `joint_config`, the joint fine-tune on copies for
    comparison), calibrate on "val", write router.safetensors into `out`, and return the
    manifest's {"router": ..., "calibration": ...}.

    inputs / probs / labels are keyed by split ("train", "val", "test"); probs[split][name] is
    a subnet's softmax output; `subnets` are the manifest rows (name, flops, exit_flops, ...).
    calibration_rows: indices of the "val" rows to calibrate on (all when None), e.g. the rows
    that look like the inputs served (described by `calibration_note` in the manifest).
    ladder_gap: when set, the cascade's ladder and first exit are chosen on those rows, the
    ladder from the validation Pareto frontier of static subnets (`choose_cascade`), to reach
    the full model's calibration accuracy minus this gap most cheaply (robustly: in expectation
    over bootstrap resamples of the rows).
    thresholds: policy name -> the thresholds to sweep (default: `default_thresholds`).
    cascade_start_thresholds: with `ladder_gap`, the cascade's start thresholds searched with its
    ladder (default: the policy's own start_threshold only).
    """
    train_config = train_config or RouterTrainConfig()
    policies = policies or DEFAULT_POLICIES
    names = [r["name"] for r in subnets]
    full = model.full_spec.name
    full_flops = int(next(r["flops"] for r in subnets if r["name"] == full))
    router_flops = count_flops(router, take(inputs["val"], slice(0, 1)))
    rows = np.arange(len(labels["val"])) if calibration_rows is None else np.asarray(calibration_rows)
    cal_probs = {k: v[rows] for k, v in probs["val"].items()}
    cal_labels = labels["val"][rows]
    full_val = float((cal_probs[full].argmax(-1) == cal_labels).mean())

    started = time.perf_counter()
    history = train_router_supervised(
        router, inputs["train"], correctness_targets(probs["train"], labels["train"], names),
        path_targets(probs["train"], labels["train"], names), train_config, progress=progress,
    )
    val_out, test_out = SubnetOutputs(cal_probs, subnets), SubnetOutputs(probs["test"], subnets)
    val_scores = tuple(s[rows] for s in router_scores(router, inputs["val"]))
    policies = copy.deepcopy(policies)
    if ladder_gap is not None and "cascade" in policies:
        val_acc = [float((probs["val"][n].argmax(-1) == labels["val"]).mean()) for n in names]
        frontier = pareto_ladder(names, [int(r["flops"]) for r in subnets], val_acc)
        policies["cascade"].update(choose_cascade(
            *val_scores, val_out, cal_labels, frontier, full, ladder_gap, (thresholds or {}).get("cascade"),
            policies["cascade"], start_thresholds=cascade_start_thresholds))
    table = calibrate(*val_scores, val_out, cal_labels, router_flops, full_flops, policies, thresholds, reference=full)
    supervised_s = time.perf_counter() - started
    comparison = {"supervised": {
        "seconds": round(supervised_s, 1),
        **summarize(table, router_scores(router, inputs["test"]), test_out, labels["test"], full_val),
    }}

    if joint_config is not None:
        started = time.perf_counter()
        tuned, joint_router = copy.deepcopy(model), copy.deepcopy(router)
        flops_ratio = [int(r["flops"]) / full_flops for r in subnets]
        train_joint(tuned, joint_router, inputs["train"], labels["train"], names, flops_ratio, joint_config,
                    progress=progress)
        jp = {k: subnet_probs(tuned, inputs[k]) for k in ("val", "test")}
        joint_table = calibrate(*router_scores(joint_router, inputs["val"]), SubnetOutputs(jp["val"], subnets),
                                labels["val"], router_flops, full_flops, policies, reference=full)
        comparison["joint"] = {
            "seconds": round(time.perf_counter() - started, 1),
            "full_test_accuracy": float((jp["test"][full].argmax(-1) == labels["test"]).mean()),
            **summarize(joint_table, router_scores(joint_router, inputs["test"]), SubnetOutputs(jp["test"], subnets),
                        labels["test"], float((jp["val"][full].argmax(-1) == labels["val"]).mean())),
        }

    save_weights(router, out / ROUTER_WEIGHTS)
    return {
        "router": {
            "family": family,
            "config": config,
            "weights": ROUTER_WEIGHTS,
            "flops": router_flops,
            "flops_ratio": router_flops / full_flops,
            "training": {
                "method": "supervised",
                "kept_because": "the joint fine-tune changes the supernet's shared weights; the bundle keeps the "
                "supernet as trained so that the static subnets' measured accuracies stay true",
                "config": vars(train_config).copy(),
                "joint_config": vars(joint_config).copy() if joint_config else None,
                "final_loss": history[-1],
                "comparison": comparison,
            },
        },
        "calibration": {**table.to_dict(), "rows": int(len(rows)), "rows_note": calibration_note,
                        "full_accuracy": full_val},
    }


def fit_router_and_calibrate(
    model: DynamicModel,
    splits: Splits,
    probs: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    subnets: list[dict[str, Any]],
    out: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Tabular (digits too): an MLP router on the model's input, both trainings compared, the
    supervised kept. Any tabular family: its config's `in_features` and, when it scales its
    inputs (the slimmable MLP on digits), `input_scale`."""
    cfg = model.config
    router_config = MLPRouterConfig(cfg.in_features, len(subnets), model.num_paths,
                                    input_scale=getattr(cfg, "input_scale", 1.0))
    torch.manual_seed(0)
    inputs = {k: torch.as_tensor(getattr(splits, k).x) for k in ("train", "val", "test")}
    return fit_router(
        model, inputs, probs, labels, subnets, Path(out), MLPRouter(router_config), MLPRouter.family,
        router_config.to_dict(), joint_config=JointTrainConfig(), progress=progress,
    )
