"""`dynaroute eval DIR`: every subnet, the dynamic model, the static frontier and the oracle.

All figures are on the test split and include the router's FLOPs for the dynamic model. The
dynamic model is shown at the reference budgets (qualities 0, .25, .5, .75, 1, resolved
through the bundle's validation calibration) and as a curve: every calibration threshold of
every policy replayed on test. The oracle picks, per example, the cheapest subnet that
answers correctly (no router cost): the bound no router can beat.

The static frontier is what a user choosing one static subnet would get: the subnets on the
validation accuracy/FLOPs frontier, measured on test. The frontier check compares it with the
dynamic model the same way: the calibrated operating points (chosen on validation), measured
on test. Picking either on the test split itself would reward whichever happened to be lucky
on its few hundred rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dynaroute.bundle import Bundle
from dynaroute.errors import DynarouteError
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import AUTO, OperatingPoint, accuracy_and_cost, default_thresholds, pareto
from dynaroute.router.fit import NEAR_FULL_GAP, router_scores
from dynaroute.router.policy import make_policy
from dynaroute.router.replay import SubnetOutputs
from dynaroute.router.runtime import RouterRuntime
from dynaroute.training.evaldata import eval_data
from dynaroute.training.evaluate import subnet_probs

BUDGETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def static_frontier(rows: list[dict[str, Any]], key: str = "val_accuracy") -> list[dict[str, Any]]:
    """Static subnets where accuracy `key` strictly rises with FLOPs, cheapest first."""
    out: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: (r["flops"], -r[key])):
        if not out or r[key] > out[-1][key] + 1e-12:
            out.append(r)
    return out


def best_at(points: list[dict[str, Any]], flops: float, key: str = "accuracy", cost: str = "mean_flops") -> float:
    """Best accuracy among points spending at most `flops` (-inf when none fits)."""
    return max((p[key] for p in points if p[cost] <= flops + 1e-9), default=-np.inf)


def frontier_check(dynamic: list[dict[str, Any]], static: list[dict[str, Any]], lo: float, hi: float,
                   tolerance: float = 0.0) -> dict:
    """Is the dynamic curve at or above the static frontier for FLOPs in [lo, hi]?

    Both are step functions (best accuracy at most f FLOPs), so they are compared at every
    breakpoint. The dynamic model starts at its cheapest point (router cost), so the check
    runs from max(lo, that point). `ok` allows `tolerance` (the report passes one test
    example, the resolution of a test accuracy); `strict_ok` allows nothing."""
    start = max(lo, min(p["mean_flops"] for p in dynamic))
    levels = sorted({p["mean_flops"] for p in dynamic} | {r["flops"] for r in static} | {start, hi})
    levels = [f for f in levels if start <= f <= hi]
    gaps = [(best_at(dynamic, f) - best_at(static, f, "test_accuracy", "flops"), f) for f in levels]
    worst, at = min(gaps)
    return {"ok": bool(worst >= -tolerance - 1e-12), "strict_ok": bool(worst >= -1e-12), "tolerance": tolerance,
            "worst_gap": float(worst), "worst_at_flops": float(at),
            "from_flops": float(start), "to_flops": float(hi)}


def oracle(outputs: SubnetOutputs, labels: np.ndarray, full_flops: int) -> dict[str, float]:
    """Per example the cheapest correct subnet; the cheapest subnet when none is right (it is
    wrong anyway), so no router spends less at this accuracy."""
    order = np.argsort(outputs.flops, kind="stable")
    correct = outputs.probs[order].argmax(-1) == labels[None, :]  # [S, N]
    flops = np.asarray(outputs.flops, dtype=np.float64)[order]
    any_right = correct.any(axis=0)
    spent = np.where(any_right, flops[correct.argmax(axis=0)], flops[0])
    return {"accuracy": float(any_right.mean()), "mean_flops": float(spent.mean()),
            "flops_ratio": float(spent.mean() / full_flops)}


def build_report(bundle: Bundle, data_path: str | Path | None = None,
                 reading: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of `dynaroute eval`. The test split is the bundle's own, or the labelled file
    `data_path` (read with the `reading` column options over the manifest's); subnet test
    accuracies are measured on it, validation accuracies are the bundle's."""
    m = bundle.manifest
    full_flops = bundle.full_flops
    subnets = [
        {k: r[k] for k in ("name", "width", "depth", "path", "params", "flops", "val_accuracy", "test_accuracy")}
        | {"flops_ratio": r["flops"] / full_flops}
        # measured in-process latency per backend at batch 1 and 32 (`dynaroute export` measures them)
        | {"latency_ms": {b: {n: bundle.latency_ms(r["name"], b, n) for n in (1, 32)} for b in bundle.backends}}
        for r in bundle.subnet_infos
    ]
    report: dict[str, Any] = {"model": bundle.name, "labels": list(bundle.labels), "full_subnet": bundle.full_subnet,
                              "full_flops": full_flops, "subnets": subnets}
    if "router" not in m:
        return report
    data = eval_data(bundle, data_path, reading)
    model = bundle.supernet()
    runtime = RouterRuntime.from_bundle(bundle, backend="torch")  # the outputs evaluated here are torch's
    table = runtime.calibration
    test_x, test_y = data["test"]
    probs_of = data.get("subnet_probs")
    test_probs = probs_of(model, "test") if probs_of else subnet_probs(model, test_x)
    for s in subnets:  # measured here: the test split may be another file than the bundle's
        s["test_accuracy"] = float((test_probs[s["name"]].argmax(-1) == test_y).mean())
    report["test_data"] = {"file": str(data_path) if data_path else None, "rows": int(len(test_y))}
    outputs = SubnetOutputs(test_probs, bundle.subnet_infos)
    scores = router_scores(runtime.router, test_x)
    val_scores = router_scores(runtime.router, data["val"][0])
    policies = {name: make_policy(name, outputs.names, outputs.flops, **table.options.get(name, {}))
                for name in table.policies}
    orc = oracle(outputs, test_y, full_flops)

    def on_test(policy: str, threshold: float) -> dict[str, float]:
        accuracy, mean = accuracy_and_cost(policies[policy], *scores, threshold, outputs, test_y, runtime.flops)
        return {"accuracy": accuracy, "mean_flops": mean, "flops_ratio": mean / full_flops,
                "savings_share": (1 - mean / full_flops) / (1 - orc["flops_ratio"]) if orc["flops_ratio"] < 1 else 0.0}

    dynamic = []
    for q in BUDGETS:
        p = runtime.resolve(Budget(quality=q)).point
        dynamic.append({"budget": q, "policy": p.policy, "threshold": p.threshold, "expected_accuracy": p.accuracy,
                        **on_test(p.policy, p.threshold)})
    curve = {name: [{"threshold": float(t), **on_test(name, float(t))}
                    for t in default_thresholds(name, val_scores[0])] for name in table.policies}
    envelope = pareto([OperatingPoint(name, p["threshold"], p["accuracy"], p["mean_flops"], p["flops_ratio"])
                       for name, pts in curve.items() for p in pts])
    envelope_rows = [{"policy": p.policy, "threshold": p.threshold, "accuracy": p.accuracy,
                      "mean_flops": p.mean_flops, "flops_ratio": p.flops_ratio} for p in envelope]
    calibrated = [{"policy": p.policy, "threshold": p.threshold, **on_test(p.policy, p.threshold)}
                  for p in table.table(AUTO)]
    frontier = static_frontier(subnets)
    full_acc = next(s["test_accuracy"] for s in subnets if s["name"] == bundle.full_subnet)
    near = [p for p in envelope_rows if p["accuracy"] >= full_acc - NEAR_FULL_GAP - 1e-12]
    near_budget = [d for d in dynamic if d["accuracy"] >= full_acc - NEAR_FULL_GAP - 1e-12]
    smallest = min(r["flops"] for r in subnets)
    best = max(near_budget, key=lambda d: d["savings_share"]) if near_budget else None
    orc["savings_share_reached"] = best["savings_share"] if best else 0.0
    report.update({
        "router": {"flops": runtime.flops, "flops_ratio": runtime.flops / full_flops,
                   "training": m["router"].get("training", {})},
        "dynamic": dynamic,
        "oracle": orc,
        "static_frontier": [{"name": r["name"], "flops": r["flops"], "flops_ratio": r["flops_ratio"],
                             "test_accuracy": r["test_accuracy"]} for r in frontier],
        "dynamic_curve": curve,
        "dynamic_envelope": envelope_rows,
        "near_full": {
            "gap": NEAR_FULL_GAP, "full_test_accuracy": full_acc,
            "cheapest_on_curve": near[0] if near else None,
            "cheapest_at_budget": min(near_budget, key=lambda d: d["mean_flops"]) if near_budget else None,
        },
        "calibrated_points": calibrated,
        "frontier_check": frontier_check(calibrated, frontier, smallest, full_flops, 1 / len(test_y)),
    })
    return report


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    subs = report["subnets"]
    ax.scatter([s["flops_ratio"] for s in subs], [s["test_accuracy"] for s in subs], c="grey", label="static subnets")
    for s in subs:
        ax.annotate(s["name"], (s["flops_ratio"], s["test_accuracy"]), fontsize=6, alpha=0.7)
    # Step functions (best accuracy within a FLOPs budget), drawn out to the full model's cost.
    fr = report["static_frontier"]
    ax.step([s["flops_ratio"] for s in fr] + [1.0], [s["test_accuracy"] for s in fr] + [fr[-1]["test_accuracy"]],
            where="post", c="grey", ls="--", label="static frontier (chosen on validation)")
    env = report["dynamic_envelope"]
    ax.step([p["flops_ratio"] for p in env] + [1.0], [p["accuracy"] for p in env] + [env[-1]["accuracy"]],
            where="post", c="C0", label="dynamic curve (router included)")
    dyn = report["dynamic"]
    ax.scatter([d["flops_ratio"] for d in dyn], [d["accuracy"] for d in dyn], c="C0", marker="s",
               label="dynamic at budgets 0..1")
    o = report["oracle"]
    ax.scatter([o["flops_ratio"]], [o["accuracy"]], c="C3", marker="*", s=120, label="oracle")
    ax.set_xscale("log")
    ax.set_xlabel("mean FLOPs / full model (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{report['model']}: accuracy against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(report: dict[str, Any]) -> str:
    backends = list(report["subnets"][0].get("latency_ms", {})) if report["subnets"] else []
    # one latency column per backend: "ms b1/b32", "-" where not measured
    lines = [f"{'subnet':<14}{'params':>9}{'FLOPs':>11}{'ratio':>8}{'val acc':>9}{'test acc':>10}"
             + "".join(f"{b + ' ms b1/b32':>20}" for b in backends)]
    for s in report["subnets"]:
        ms = ["/".join("-" if v is None else f"{v:.2f}" for v in s["latency_ms"][b].values()) for b in backends]
        lines.append(f"{s['name']:<14}{s['params']:>9}{s['flops']:>11}{s['flops_ratio']:>8.3f}"
                     f"{s['val_accuracy']:>9.4f}{s['test_accuracy']:>10.4f}" + "".join(f"{m:>20}" for m in ms))
    if "dynamic" not in report:
        return "\n".join(lines)
    r = report["router"]
    lines += ["", f"router: {r['flops']} FLOPs ({r['flops_ratio']:.2%} of full), trained "
              f"{r['training'].get('method', '?')}", "",
              f"{'budget':<8}{'policy':<11}{'threshold':>11}{'test acc':>10}{'mean FLOPs':>12}{'ratio':>8}"
              f"{'of oracle savings':>19}"]
    for d in report["dynamic"]:
        lines.append(f"{d['budget']:<8g}{d['policy']:<11}{d['threshold']:>11.4g}{d['accuracy']:>10.4f}"
                     f"{d['mean_flops']:>12.0f}{d['flops_ratio']:>8.3f}{d['savings_share']:>19.1%}")
    o = report["oracle"]
    lines.append(f"{'oracle':<19}{'':>11}{o['accuracy']:>10.4f}{o['mean_flops']:>12.0f}{o['flops_ratio']:>8.3f}")
    nf = report["near_full"]["cheapest_on_curve"]
    if nf:
        lines.append(f"\nwithin {NEAR_FULL_GAP:.1%} of the full model's accuracy: {nf['accuracy']:.4f} at "
                     f"{nf['flops_ratio']:.1%} of its FLOPs ({nf['policy']}, threshold {nf['threshold']:.4g})")
    fc = report["frontier_check"]
    verdict = "yes" if fc["strict_ok"] else f"within one test example ({fc['tolerance']:.4f})" if fc["ok"] else "no"
    lines.append(f"dynamic curve at or above the static frontier from {fc['from_flops']:.0f} to {fc['to_flops']:.0f} "
                 f"FLOPs: {verdict} (worst gap {fc['worst_gap']:+.4f} at {fc['worst_at_flops']:.0f})")
    comparison = r["training"].get("comparison", {})
    if comparison:
        lines += ["", "router training compared (test split; the point chosen on validation to be near full):"]
        for method, c in comparison.items():
            p = c["near_full"]
            lines.append(f"  {method:<11} {p['accuracy']:.4f} at {p['flops_ratio']:.1%} of full FLOPs "
                         f"({p['policy']}); budget 1: {c['budgets'][-1]['accuracy']:.4f} at "
                         f"{c['budgets'][-1]['flops_ratio']:.1%}; {c['seconds']} s")
    return "\n".join(lines)


def main_eval(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle)
    reading = {"label_column": getattr(args, "label_column", None), "text_column": getattr(args, "text_column", None),
               "feature_columns": [c.strip() for c in args.feature_columns.split(",")]
               if getattr(args, "feature_columns", None) else None}
    try:
        report = build_report(bundle, getattr(args, "data", None), reading)
    except DynarouteError as e:  # the evaluation data is missing or bad: say what is needed, no traceback
        print(f"dynaroute eval: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else bundle.root
    out.mkdir(parents=True, exist_ok=True)
    if "dynamic" in report:
        plot_pareto(report, out / "pareto.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
