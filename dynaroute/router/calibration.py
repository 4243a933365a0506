"""Calibration: a table from budget to operating point, measured on the validation split.

For each policy, thresholds are swept; at each, every validation example is routed and its
answer and FLOPs replayed (router FLOPs included). Each point has two accuracies:

- `accuracy`: its accuracy on the calibration rows;
- `assured_accuracy`: the full model's accuracy plus a lower bound (ASSURANCE, by a paired
  bootstrap over the rows) of the point's mean difference to the full model: the smaller of
  the bounds on the difference in correctness and in the probability given to the true class
  (`assured_accuracy()`). A cheap point can tie the full model on a few hundred rows by luck;
  the probability difference sees a barely confident small subnet as the risk it is, and the
  bound makes a point that only matches the full model on the rows at hand pay for that doubt.
  The full model (the `static` policy) scores exactly its own accuracy, so the top of the
  quality range is never below it.

A policy's table keeps the points no cheaper point beats on both accuracies, cheapest first;
the `auto` table merges all policies' points, so a budget without a policy gets whichever
policy is best there. A budget is solved from a table:

- quality q in [0, 1]: the cheapest point whose assured accuracy reaches
  lo + q * (hi - lo), lo being the cheapest point's and hi the best assured accuracy
  (q = 0: the cheapest point; q = 1: at least the full model's accuracy, at the least cost);
- max_flops: the most accurate point whose mean FLOPs fit; target_accuracy: the cheapest point
  whose accuracy reaches it. When no point qualifies, the closest one (the cheapest, resp. the
  most accurate) is used and the `Resolution` says so (`reachable=False` and a note).

A budget with a floor may be served lower under load (`ladder`: the cheaper points of its
table that meet the floor), which the SLO controller of the gateway does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from dynaroute.errors import InvalidInputError
from dynaroute.router.budget import Budget
from dynaroute.router.policy import Policy, Route, make_policy
from dynaroute.router.replay import SubnetOutputs

AUTO = "auto"  # the merged table, used when a budget names no policy
# The confidence of `assured_accuracy`'s lower bound, and the bootstrap resamples it is taken over.
ASSURANCE = 0.9
RESAMPLES = 1000


@dataclass(frozen=True)
class OperatingPoint:
    policy: str
    threshold: float
    accuracy: float  # expected (validation) accuracy
    mean_flops: float  # per example, router included
    flops_ratio: float  # mean_flops / the full subnet's FLOPs
    quality: float = 0.0  # its place on the budget quality scale (0: the cheapest point's, 1: the best)
    assured_accuracy: float | None = None  # see the module docstring; None: not measured (= accuracy)

    @property
    def assured(self) -> float:
        return self.accuracy if self.assured_accuracy is None else self.assured_accuracy


@dataclass(frozen=True)
class Resolution:
    point: OperatingPoint
    reachable: bool = True
    note: str = ""


def route_all(policy: Policy, correct_prob: np.ndarray, gate: np.ndarray, threshold: float) -> list:
    return [policy.route(correct_prob[i], gate[i], threshold) for i in range(len(correct_prob))]


def group_by_route(routes: list[Route]) -> dict[Route, list[int]]:
    """route -> the examples that take it (most share one: a policy has few distinct decisions)."""
    groups: dict[Route, list[int]] = {}
    for i, route in enumerate(routes):
        groups.setdefault(route, []).append(i)
    return groups


@dataclass(frozen=True)
class RowOutcomes:
    """Per example of one split: answered correctly [N] bool, the probability the answer gives
    the true class [N], expert FLOPs [N]."""

    correct: np.ndarray
    true_prob: np.ndarray
    flops: np.ndarray


def replay_groups(groups: dict[Route, list[int]], outputs: SubnetOutputs, labels: np.ndarray) -> RowOutcomes:
    """Every example's outcome, each group of examples sharing a route replayed at once."""
    correct = np.zeros(len(labels), dtype=bool)
    true_prob = np.zeros(len(labels), dtype=np.float64)
    flops = np.zeros(len(labels), dtype=np.float64)
    for route, rows in groups.items():
        rows = np.asarray(rows)
        r = outputs.replay_rows(route, rows)
        correct[rows] = r.probs.argmax(-1) == labels[rows]
        true_prob[rows] = r.probs[np.arange(len(rows)), labels[rows]]
        flops[rows] = r.flops
    return RowOutcomes(correct, true_prob, flops)


def bootstrap_counts(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, n]: how often each of n rows is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]).astype(np.float64)


def assured_accuracy(outcome: RowOutcomes, reference: RowOutcomes, counts: np.ndarray,
                     assurance: float = ASSURANCE) -> float:
    """The reference's (full model's) accuracy plus the `assurance` lower bound, over the
    bootstrap resamples `counts`, of the paired mean difference to it: the smaller of the bounds
    on the difference in correctness and in the true class's probability. Either alone misleads:
    correctness cannot tell a lucky tie from a sure one, and probabilities reward a point for
    being surer of answers the full model also gets right."""
    n = counts.shape[1]
    correct = counts @ (outcome.correct.astype(np.float64) - reference.correct) / n
    prob = counts @ (outcome.true_prob - reference.true_prob) / n
    low = 1.0 - assurance
    return float(reference.correct.mean() + min(np.quantile(correct, low), np.quantile(prob, low)))


def evaluate_routes(routes: list[Route], outputs: SubnetOutputs, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean expert FLOPs) of one route per example."""
    o = replay_groups(group_by_route(routes), outputs, labels)
    return float(o.correct.mean()), float(o.flops.mean())


def default_thresholds(policy: str, correct_prob: np.ndarray) -> np.ndarray:
    """P(correct) thresholds at the router's score quantiles; confidence bounds for the
    cascade, dense near 1 where softmax confidences crowd."""
    grid = np.linspace(0.0, 1.0, 21)
    if policy == "cascade":
        return np.unique(np.concatenate([grid, 1.0 - np.logspace(-6, -1, 21)]))
    quantiles = np.quantile(correct_prob, np.linspace(0.0, 1.0, 41))
    return np.unique(np.concatenate([grid, quantiles, [1.0 + 1e-9]]))


def pareto(points: list[OperatingPoint]) -> list[OperatingPoint]:
    """Points where accuracy strictly rises with mean FLOPs, cheapest first (the report's curves)."""
    kept: list[OperatingPoint] = []
    for p in sorted(points, key=lambda p: (p.mean_flops, -p.accuracy)):
        if not kept or p.accuracy > kept[-1].accuracy + 1e-12:
            kept.append(p)
    return kept


def frontier(points: list[OperatingPoint]) -> list[OperatingPoint]:
    """The points no cheaper (or equally cheap, earlier) point beats on both accuracy and assured
    accuracy, cheapest first, each with its place on the quality scale."""
    kept: list[OperatingPoint] = []
    for p in sorted(points, key=lambda p: (p.mean_flops, -p.assured, -p.accuracy)):
        if not any(k.accuracy >= p.accuracy - 1e-12 and k.assured >= p.assured - 1e-12 for k in kept):
            kept.append(p)
    lo, hi = kept[0].assured, max(p.assured for p in kept)
    span = hi - lo
    return [replace(p, quality=float(np.clip((p.assured - lo) / span, 0.0, 1.0)) if span > 0 else 1.0)
            for p in kept]


class CalibrationTable:
    """Per-policy Pareto tables plus the merged `auto` table. Serialises into the manifest."""

    def __init__(self, tables: dict[str, list[OperatingPoint]], options: dict[str, dict[str, float]],
                 full_flops: int, router_flops: int, default_policy: str = AUTO):
        if not tables or any(not t for t in tables.values()):
            raise ValueError("CalibrationTable.tables must hold at least one point per policy")
        self.tables = {name: frontier(points) for name, points in tables.items()}
        self.tables[AUTO] = frontier([p for name, t in self.tables.items() if name != AUTO for p in t])
        self.options = options
        self.full_flops = full_flops
        self.router_flops = router_flops
        if default_policy not in self.tables:
            raise ValueError(f"CalibrationTable.default_policy {default_policy!r} has no table")
        self.default_policy = default_policy

    @property
    def policies(self) -> list[str]:
        return [name for name in self.tables if name != AUTO]

    def table(self, policy: str | None) -> list[OperatingPoint]:
        name = policy or self.default_policy
        if name not in self.tables:
            raise InvalidInputError(f"unknown policy {name!r}; this bundle is calibrated for {sorted(self.tables)}")
        return self.tables[name]

    def solve(self, budget: Budget, default_quality: float = 1.0) -> Resolution:
        """The operating point for a budget (see the module docstring)."""
        if budget.subnet is not None:
            raise InvalidInputError("a budget that pins a subnet is not solved through calibration")
        points = self.table(budget.policy)
        cheapest = points[0]
        if budget.max_flops is not None:
            fit = [p for p in points if p.mean_flops <= budget.max_flops]
            if fit:
                return Resolution(max(fit, key=lambda p: (p.accuracy, -p.mean_flops)))
            return Resolution(cheapest, False, f"max_flops {budget.max_flops:g} is below the cheapest calibrated "
                              f"point ({cheapest.mean_flops:g} FLOPs); using that point")
        if budget.target_accuracy is not None:
            fit = [p for p in points if p.accuracy >= budget.target_accuracy - 1e-12]
            if fit:
                return Resolution(fit[0])
            best = max(points, key=lambda p: (p.accuracy, -p.mean_flops))
            return Resolution(best, False, f"target_accuracy {budget.target_accuracy:g} is above the best "
                              f"calibrated accuracy ({best.accuracy:.4f}); using the most accurate point")
        q = default_quality if budget.quality is None else budget.quality
        hi = max(p.assured for p in points)
        target = cheapest.assured + q * (hi - cheapest.assured)
        return Resolution(next(p for p in points if p.assured >= target - 1e-12))

    def ladder(self, budget: Budget, asked: OperatingPoint) -> list[OperatingPoint]:
        """The points a budget may be lowered to, cheapest first, ending with `asked` (its own
        point, `solve(budget).point`): the points of its table cheaper than `asked` that meet
        its floor (`min_quality`: a quality at least that, as `solve` reads quality;
        `min_accuracy`: an expected accuracy at least that). No floor: `[asked]` alone."""
        if budget.min_quality is not None:
            def meets(p: OperatingPoint) -> bool:
                return p.quality >= budget.min_quality - 1e-12
        elif budget.min_accuracy is not None:
            def meets(p: OperatingPoint) -> bool:
                return p.accuracy >= budget.min_accuracy - 1e-12
        else:
            return [asked]
        return [p for p in self.table(budget.policy) if p.mean_flops < asked.mean_flops and meets(p)] + [asked]

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": "val",
            "full_flops": self.full_flops,
            "router_flops": self.router_flops,
            "default_policy": self.default_policy,
            "options": self.options,
            "tables": {name: [asdict(p) for p in t] for name, t in self.tables.items()},
            # For a reader: what the five reference qualities resolve to with the default policy.
            "budgets": [{**asdict(self.solve(Budget(quality=q)).point), "budget": q} for q in (0, .25, .5, .75, 1)],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationTable:
        # Bundles calibrated before assured accuracy was measured: it reads as the accuracy.
        tables = {name: [OperatingPoint(**{"assured_accuracy": p["accuracy"], **p}) for p in points]
                  for name, points in d["tables"].items() if name != AUTO}
        return cls(tables, d.get("options", {}), int(d["full_flops"]), int(d["router_flops"]),
                   d.get("default_policy", AUTO))


def calibrate(
    correct_prob: np.ndarray,
    gate: np.ndarray,
    outputs: SubnetOutputs,
    labels: np.ndarray,
    router_flops: int,
    full_flops: int,
    policies: dict[str, dict[str, Any]],
    thresholds: dict[str, np.ndarray] | None = None,
    reference: str | None = None,
    assurance: float = ASSURANCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> CalibrationTable:
    """Sweep each policy's thresholds on one split (validation) and build the table.

    correct_prob [N, S] and gate [N, K] are the router's scores on that split; `policies` maps
    policy name -> its options. Works for any router and input kind: only scores are needed.
    reference: the full model, which assured accuracies are measured against (default: the
    subnet with the most FLOPs); it is always calibrated as the `static` policy's point, so
    that quality 1 can resolve to it.
    """
    reference = reference or outputs.names[int(np.argmax(outputs.flops))]
    policies = {**policies, "static": {"subnet": reference}}
    counts = bootstrap_counts(len(labels), resamples, seed)
    ref = replay_groups({Route((reference,), (1.0,)): list(range(len(labels)))}, outputs, labels)
    tables: dict[str, list[OperatingPoint]] = {}
    for name, opts in policies.items():
        policy = make_policy(name, outputs.names, outputs.flops, **opts)
        sweep = (thresholds or {}).get(name)
        sweep = default_thresholds(name, correct_prob) if sweep is None else sweep
        points = []
        for t in sweep:
            o = replay_groups(group_by_route(route_all(policy, correct_prob, gate, float(t))), outputs, labels)
            mean = float(o.flops.mean()) + router_flops
            points.append(OperatingPoint(name, float(t), float(o.correct.mean()), mean, mean / full_flops,
                                         assured_accuracy=assured_accuracy(o, ref, counts, assurance)))
        tables[name] = points
    return CalibrationTable(tables, policies, full_flops, router_flops)


def measure(
    point: OperatingPoint,
    policy: Policy,
    correct_prob: np.ndarray,
    gate: np.ndarray,
    outputs: SubnetOutputs,
    labels: np.ndarray,
    router_flops: int,
    full_flops: int,
) -> dict[str, float]:
    """An operating point replayed on another split (test): accuracy, mean FLOPs (router
    included) and their ratio to the full subnet."""
    acc, mean = accuracy_and_cost(policy, correct_prob, gate, point.threshold, outputs, labels, router_flops)
    return {"accuracy": acc, "mean_flops": mean, "flops_ratio": mean / full_flops}


def accuracy_and_cost(policy: Policy, correct_prob: np.ndarray, gate: np.ndarray, threshold: float,
                       outputs: SubnetOutputs, labels: np.ndarray, router_flops: int) -> tuple[float, float]:
    """A policy at one threshold on one split: (accuracy, mean FLOPs with the router's)."""
    acc, flops = evaluate_routes(route_all(policy, correct_prob, gate, threshold), outputs, labels)
    return acc, flops + router_flops


def cascade_outcomes(
    policy: Policy,
    correct_prob: np.ndarray,
    gate: np.ndarray,
    outputs: SubnetOutputs,
    labels: np.ndarray,
    thresholds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold and example: (answered correctly [T, N] bool, expert FLOPs [T, N]) of a
    cascade. Its route depends on the threshold only through the bound, so the rows are grouped
    by route once and each group replayed at every bound."""
    groups = group_by_route(route_all(policy, correct_prob, gate, 0.0))
    per_bound = [replay_groups({replace(route, confidence_bound=float(bound)): rows for route, rows in groups.items()},
                               outputs, labels) for bound in thresholds]
    return np.stack([o.correct for o in per_bound]), np.stack([o.flops for o in per_bound])


def expected_cost(correct: np.ndarray, flops: np.ndarray, reference: np.ndarray, gap: float, fallback: float,
                  resamples: np.ndarray) -> float:
    """The mean FLOPs at which a policy reaches `reference`'s accuracy less `gap`, expected over
    bootstrap resamples of the calibration rows (resamples [B, N]: how often each row is drawn).

    correct / flops [T, N] are per threshold and row; reference [N] says whether the reference
    subnet (the full model) is right. In each resample the cheapest threshold reaching that
    resample's target counts; a resample no threshold reaches costs `fallback` (the full model,
    which meets its own target). A policy whose curve only just touches the target on the rows
    at hand is charged for the resamples where it misses: the choice is robust to which rows
    happened to be held out, not tuned to them."""
    n = correct.shape[1]
    accuracy = correct.astype(np.float64) @ resamples.T / n  # [T, B]
    mean_flops = flops @ resamples.T / n
    target = resamples @ reference.astype(np.float64) / n - gap  # [B]
    cost = np.where(accuracy >= target - 1e-12, mean_flops, np.inf).min(axis=0)
    return float(np.where(np.isfinite(cost), cost, fallback).mean())


def choose_cascade(
    correct_prob: np.ndarray,
    gate: np.ndarray,
    outputs: SubnetOutputs,
    labels: np.ndarray,
    frontier: list[str],
    reference: str,
    gap: float,
    thresholds: np.ndarray | None = None,
    options: dict[str, Any] | None = None,
    max_rungs: int = 3,
    resamples: int = 200,
    seed: int = 0,
    start_thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The cascade's ladder and first exit, chosen on the calibration split: among the
    sub-ladders of `frontier` (the validation Pareto frontier of static subnets, cheapest first)
    with 2..max_rungs rungs, and each first exit up to the ladder's shallowest rung's depth, the
    pair with the least `expected_cost` of reaching subnet `reference`'s accuracy less `gap`;
    returned as cascade options ({"ladder": [...], "first_exit": k}). `thresholds`: the
    bounds swept (default: `default_thresholds`). `start_thresholds`, when given, are searched
    too (the router's predicted correctness a row needs to start at a rung; 0: every row starts
    at the cheapest) and the one chosen is returned as "start_threshold": where the router cannot
    tell which rows the first rung fails, skipping it for some rows only pays the next rung.

    Every rung is paid in full when escalated past, so the whole frontier as a ladder
    overspends; and a shallow exit that is confidently wrong on long inputs forces the bound up
    for every row, so passing it by can be cheaper. When nothing ever reaches the target: the
    whole frontier, every exit."""
    from itertools import combinations, product

    thresholds = default_thresholds("cascade", correct_prob) if thresholds is None else thresholds
    draws = bootstrap_counts(len(labels), resamples, seed)
    ref = outputs.probs[outputs.index[reference]].argmax(-1) == labels
    fallback = float(outputs.flops[outputs.index[reference]])
    searched_start = start_thresholds is not None
    starts = list(start_thresholds) if searched_start else [None]
    best: tuple[float, dict[str, Any]] | None = None
    for k in range(2, min(max_rungs, len(frontier)) + 1):
        for ladder in combinations(frontier, k):
            depth = min(len(outputs.exits[outputs.index[name]]) for name in ladder)
            for first_exit, start in product(range(1, depth + 1), starts):
                chosen: dict[str, Any] = {"ladder": list(ladder), "first_exit": first_exit}
                if searched_start:
                    chosen["start_threshold"] = float(start)
                policy = make_policy("cascade", outputs.names, outputs.flops, **{**(options or {}), **chosen})
                correct, flops = cascade_outcomes(policy, correct_prob, gate, outputs, labels, thresholds)
                cost = expected_cost(correct, flops, ref, gap, fallback, draws)
                if cost < fallback and (best is None or cost < best[0]):
                    best = (cost, chosen)
    if best:
        return best[1]
    fallback_options: dict[str, Any] = {"ladder": list(frontier), "first_exit": 1}
    if searched_start:
        fallback_options["start_threshold"] = float(starts[0])
    return fallback_options
