"""Threshold policy: the cheapest subnet whose predicted correctness reaches the threshold."""

from __future__ import annotations

import numpy as np

from dynaroute.router.policy import Policy, Route


class ThresholdPolicy(Policy):
    """Pick the cheapest subnet with P(correct) >= threshold; when none reaches it, the subnet
    the router trusts most (so a threshold above every score still gets a sound answer).
    No early exit: the subnet runs to its last block."""

    name = "threshold"

    def __init__(self, subnet_names: list[str], subnet_flops: list[int], **options: float):
        super().__init__(subnet_names, subnet_flops, **options)
        # Stable sort: equal FLOPs keep the bundle's order.
        self.order = np.argsort(self.subnet_flops, kind="stable")

    def route(self, correct_prob: np.ndarray, gate: np.ndarray, threshold: float) -> Route:
        ok = np.flatnonzero(correct_prob[self.order] >= threshold)
        index = int(self.order[ok[0]]) if len(ok) else int(np.argmax(correct_prob))
        return Route((self.subnet_names[index],), (1.0,), policy=self.name)
