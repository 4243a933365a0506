"""Static policy: one subnet for every input, whatever the router says.

Calibrated beside the adaptive policies so that the full model itself is an operating point
of every bundle: the top of the budget range can then always be "the full model", and an
adaptive point takes its place only where it is expected to be at least as accurate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynaroute.router.policy import Policy, Route


class StaticPolicy(Policy):
    """option subnet (default: the subnet with the most FLOPs, the full model): the subnet
    every input runs, to its last block. The threshold is ignored."""

    name = "static"

    def __init__(self, subnet_names: list[str], subnet_flops: list[int], **options: Any):
        super().__init__(subnet_names, subnet_flops, **options)
        subnet = options.get("subnet") or subnet_names[int(np.argmax(subnet_flops))]
        if subnet not in subnet_names:
            raise ValueError(f"static option subnet must name one of this bundle's subnets, got {subnet!r}")
        self.subnet = str(subnet)

    def route(self, correct_prob: np.ndarray, gate: np.ndarray, threshold: float) -> Route:
        return Route((self.subnet,), (1.0,), policy=self.name)
