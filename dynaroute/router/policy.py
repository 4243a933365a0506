"""Routing policies: router scores plus a threshold -> a Route.

CONTRACT (shared by the router and the gateway; keep these names and fields):
- `Route`: what to run for one input and how to combine it.
- `Policy.route(correct_prob, gate, threshold)`: one input's decision.
Policy implementations live beside this file, one class each, found by name through POLICIES.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dynaroute.errors import InvalidInputError
from dynaroute.registry import Registry, UnknownFamilyError


@dataclass(frozen=True)
class Route:
    """subnets: names run side by side (one, or k path branches for top-k);
    weights: aggregation weights over `subnets` (sum to 1; logits are combined by them);
    escalation: cascade only, the larger subnets to try next, in order, while the answer's
    confidence (max softmax) is below `confidence_bound`;
    confidence_bound: the cascade's bound, also the early-exit bound inside experts
    (None: no early exit, run the subnet to its last block);
    first_exit: the shallowest exit (1-based) a row may leave an expert at; the exits before it
    are passed by (a shallow exit can be confidently wrong on long inputs)."""

    subnets: tuple[str, ...]
    weights: tuple[float, ...]
    escalation: tuple[str, ...] = ()
    confidence_bound: float | None = None
    policy: str = ""
    first_exit: int = 1


class Policy(ABC):
    """Turns one input's router scores into a Route. `subnet_names` and `subnet_flops` are in
    the order of the router's outputs (the bundle's subnet order)."""

    name: ClassVar[str]

    def __init__(self, subnet_names: list[str], subnet_flops: list[int], **options: float):
        self.subnet_names = subnet_names
        self.subnet_flops = np.asarray(subnet_flops, dtype=np.float64)
        self.options = options

    @abstractmethod
    def route(self, correct_prob: np.ndarray, gate: np.ndarray, threshold: float) -> Route:
        """correct_prob: [S] predicted P(subnet answers correctly); gate: [K] path weights."""


# Policies by name (dynaroute.registry): the built-ins below, an import path, or an entry point
# of the `dynaroute.policies` group.
POLICIES: Registry[Policy] = Registry("routing policy", Policy, {
    "threshold": "dynaroute.router.threshold:ThresholdPolicy",
    "cascade": "dynaroute.router.cascade:CascadePolicy",
    "topk": "dynaroute.router.topk:TopKPolicy",
    "static": "dynaroute.router.static:StaticPolicy",
}, group="dynaroute.policies")


def make_policy(name: str, subnet_names: list[str], subnet_flops: list[int], **options: float) -> Policy:
    """Build a policy by name; an unknown name is the caller's input error."""
    try:
        cls = POLICIES.resolve(name)
    except UnknownFamilyError as e:
        raise InvalidInputError(f"unknown policy {name!r}; expected one of {POLICIES.names()} or an import "
                                f"path 'package.module:Class' ({e})") from None
    return cls(subnet_names, subnet_flops, **options)
