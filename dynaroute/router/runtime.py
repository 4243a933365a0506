"""RouterRuntime: the router of a bundle, scoring inputs and planning routes for budgets.

CONTRACT (used by the gateway's engine): `from_bundle`, `flops`, `subnet_names`, `score`, `plan`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dynaroute.bundle import Bundle, check_weights
from dynaroute.errors import BundleError, InvalidInputError
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import CalibrationTable, Resolution
from dynaroute.router.model import Router, build_router
from dynaroute.router.policy import Policy, Route, make_policy


class RouterRuntime:
    """Scores a batch with the router; plans one input's route through the calibration table."""

    def __init__(self, router: Router, flops: int, subnet_names: list[str], subnet_flops: list[int],
                 calibration: CalibrationTable, default_quality: float = 1.0):
        self.router = router.eval()
        self.flops = int(flops)
        self.subnet_names = list(subnet_names)
        self.subnet_flops = list(subnet_flops)
        self.calibration = calibration
        self.default_quality = default_quality
        self._policies: dict[str, Policy] = {
            name: make_policy(name, self.subnet_names, self.subnet_flops, **calibration.options.get(name, {}))
            for name in calibration.policies
        }

    @classmethod
    def from_bundle(cls, bundle: Bundle, default_quality: float = 1.0) -> RouterRuntime:
        m = bundle.manifest
        if "router" not in m or "calibration" not in m:
            raise BundleError(f"bundle {bundle.name!r} has no router or calibration; retrain it with `dynaroute train`")
        info = m["router"]
        router = build_router(info["family"], info["config"])
        path = bundle.root / info["weights"]
        check_weights(router, path, "router")
        router.load_state_dict(load_file(str(path)))
        calibration = CalibrationTable.from_dict(m["calibration"])
        rows = bundle.subnet_infos
        return cls(router, info["flops"], [r["name"] for r in rows], [r["flops"] for r in rows], calibration,
                   default_quality)

    @torch.no_grad()
    def score(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """x: a batch tensor (tensor models) or (ids, mask). Returns correct_prob [N, S] in 0..1
        (columns in `subnet_names` order) and gate [N, K] (rows sum to 1)."""
        correct_logits, gate_logits = self.router(x)
        return torch.sigmoid(correct_logits).numpy(), torch.softmax(gate_logits, -1).numpy()

    def resolve(self, budget: Budget) -> Resolution:
        """The calibrated operating point (policy, threshold, expected accuracy, mean FLOPs)."""
        return self.calibration.solve(budget, self.default_quality)

    def plan(self, budget: Budget, correct_prob: np.ndarray, gate: np.ndarray) -> Route:
        """One input's route. A pinned subnet runs alone; otherwise the budget resolves to a
        calibrated (policy, threshold) and the policy decides from this input's scores."""
        if budget.subnet is not None:
            if budget.subnet not in self.subnet_names:
                raise InvalidInputError(
                    f"unknown subnet {budget.subnet!r}; expected one of {', '.join(self.subnet_names)}"
                )
            return Route((budget.subnet,), (1.0,), policy="subnet")
        point = self.resolve(budget).point
        return self._policies[point.policy].route(np.asarray(correct_prob), np.asarray(gate), point.threshold)
