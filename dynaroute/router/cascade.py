"""Cascade policy: start where the router says, escalate while the answer is not confident."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dynaroute.experts.spec import SubnetSpec
from dynaroute.router.policy import Policy, Route


def pareto_ladder(names: Sequence[str], flops: Sequence[int], accuracy: Sequence[float]) -> list[str]:
    """The static subnets on the (validation) accuracy/FLOPs Pareto frontier, cheapest first,
    each rung strictly more accurate than the one below it. For a supernet whose shallow
    subnets keep other layers (DynaBERT), a shallower subnet can beat a deeper one of the
    same width at less cost (e.g. w1-d4 over w1-d6), which the deepest-per-width ladder misses."""
    ladder: list[str] = []
    best = -np.inf
    for i in sorted(range(len(names)), key=lambda i: (flops[i], -accuracy[i])):
        if accuracy[i] > best + 1e-12:
            ladder.append(names[i])
            best = accuracy[i]
    return ladder


class CascadePolicy(Policy):
    """By default the ladder of a path is its deepest subnet at each width, cheapest first:
    early exit inside an expert already covers the shallower depths of a width when exits are
    prefixes (the MLP), so escalating to them would recompute blocks. Option `ladder` (subnet
    names, cheapest first; e.g. `pareto_ladder` of the validation accuracies) replaces it, per
    path; early exit then applies along each rung's own exits.

    threshold: the confidence bound (max softmax). A sample leaves a subnet at its first exit
    whose confidence reaches it, and escalates to the next rung when even the last exit is
    below it.
    option start_threshold (default 0.5): start at the cheapest rung whose predicted
    correctness reaches it, so inputs the router expects the small subnets to fail skip them.
    option first_exit (default 1): the shallowest exit a row may leave a rung at (see `Route`);
    calibration chooses it with the ladder (`choose_cascade`).
    The path is the one the gate weighs most.
    """

    name = "cascade"

    def __init__(self, subnet_names: list[str], subnet_flops: list[int], **options: Any):
        super().__init__(subnet_names, subnet_flops, **options)
        self.start_threshold = float(options.get("start_threshold", 0.5))
        self.first_exit = int(options.get("first_exit", 1))
        if self.first_exit < 1:
            raise ValueError(f"cascade option first_exit must be >= 1, got {self.first_exit}")
        specs = [SubnetSpec.parse(n) for n in subnet_names]
        self.ladders: dict[int, list[int]] = {}
        given = options.get("ladder")
        if given is not None:
            unknown = [n for n in given if n not in subnet_names]
            if unknown or not given:
                raise ValueError(f"cascade option ladder must name this bundle's subnets; unknown: {unknown}")
            for i in (subnet_names.index(n) for n in given):
                self.ladders.setdefault(specs[i].path, []).append(i)
            return
        for path in sorted({s.path for s in specs}):
            deepest: dict[float, int] = {}
            for i, s in enumerate(specs):
                if s.path == path and (s.width not in deepest or s.depth > specs[deepest[s.width]].depth):
                    deepest[s.width] = i
            self.ladders[path] = sorted(deepest.values(), key=lambda i: (self.subnet_flops[i], i))

    def route(self, correct_prob: np.ndarray, gate: np.ndarray, threshold: float) -> Route:
        path = int(np.argmax(gate)) if len(gate) > 1 else 0
        ladder = self.ladders.get(path) or next(iter(self.ladders.values()))
        ok = [j for j, i in enumerate(ladder) if correct_prob[i] >= self.start_threshold]
        start = ok[0] if ok else len(ladder) - 1
        names = [self.subnet_names[i] for i in ladder[start:]]
        return Route((names[0],), (1.0,), escalation=tuple(names[1:]), confidence_bound=float(threshold),
                     policy=self.name, first_exit=self.first_exit)
