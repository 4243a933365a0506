"""RouterRuntime: the router of a bundle, scoring inputs and planning routes for budgets.

CONTRACT (used by the gateway's engine): `from_bundle`, `flops`, `subnet_names`, `score`, `plan`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dynaroute.bundle import Bundle, check_weights
from dynaroute.errors import BundleError, InvalidInputError, shown
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import CalibrationTable, OperatingPoint, Resolution
from dynaroute.router.model import ROUTER_FAMILIES, Router
from dynaroute.router.policy import Policy, Route, make_policy

# Distinct budgets whose calibration resolution is kept (clients choose budgets freely, so the
# cache is bounded; it is cleared when full).
_RESOLVE_CACHE_SIZE = 1024


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow for large |z|


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


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
        # Routers with a numpy forward (the MLP) score numpy batches without torch: a few
        # microseconds instead of tens for the gateway's small batches.
        self._numpy_forward = self.router.numpy_forward()
        self._resolved: dict[Budget, Resolution] = {}
        self._policies: dict[str, Policy] = {
            name: make_policy(name, self.subnet_names, self.subnet_flops, **calibration.options.get(name, {}))
            for name in calibration.policies
        }

    @classmethod
    def from_bundle(cls, bundle: Bundle, default_quality: float = 1.0, backend: str | None = None) -> RouterRuntime:
        """The bundle's router, resolving budgets through the calibration measured for the
        experts' `backend` (default: the bundle's default backend; see `Bundle.calibration`)."""
        m = bundle.manifest
        if "router" not in m or "calibration" not in m:
            raise BundleError(f"bundle {bundle.name!r} has no router or calibration; retrain it with `dynaroute train`")
        info = m["router"]
        try:
            router = ROUTER_FAMILIES.build(info["family"], info["config"])
        except BundleError as e:
            raise BundleError(f"bundle {bundle.name!r}: {e}") from e
        path = bundle.root / info["weights"]
        check_weights(router, path, "router")
        router.load_state_dict(load_file(str(path)))
        calibration = CalibrationTable.from_dict(bundle.calibration(backend))
        rows = bundle.subnet_infos
        return cls(router, info["flops"], [r["name"] for r in rows], [r["flops"] for r in rows], calibration,
                   default_quality)

    def score(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """x: a batch tensor or numpy array (tensor models) or (ids, mask) as tensors or arrays.
        Returns correct_prob [N, S] in 0..1 (columns in `subnet_names` order) and gate [N, K]
        (rows sum to 1)."""
        if isinstance(x, np.ndarray):
            if self._numpy_forward is not None:
                correct_logits, gate_logits = self._numpy_forward(x)
                return _sigmoid(correct_logits), _softmax(gate_logits)
            x = torch.from_numpy(x)
        elif isinstance(x, tuple):
            x = tuple(torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in x)
        with torch.inference_mode():
            correct_logits, gate_logits = self.router(x)
            return torch.sigmoid(correct_logits).numpy(), torch.softmax(gate_logits, -1).numpy()

    def resolve(self, budget: Budget) -> Resolution:
        """The calibrated operating point (policy, threshold, expected accuracy, mean FLOPs);
        remembered per budget, since most traffic repeats a few budgets."""
        r = self._resolved.get(budget)
        if r is None:
            r = self.calibration.solve(budget, self.default_quality)
            if len(self._resolved) >= _RESOLVE_CACHE_SIZE:
                self._resolved.clear()
            self._resolved[budget] = r
        return r

    def plan(self, budget: Budget | OperatingPoint, correct_prob: np.ndarray, gate: np.ndarray) -> Route:
        """One input's route. A pinned subnet runs alone; otherwise the budget resolves to a
        calibrated (policy, threshold), or is one already (a point the SLO controller chose),
        and the policy decides from this input's scores."""
        if isinstance(budget, OperatingPoint):
            return self._policies[budget.policy].route(np.asarray(correct_prob), np.asarray(gate), budget.threshold)
        if budget.subnet is not None:
            if budget.subnet not in self.subnet_names:
                raise InvalidInputError(
                    f"unknown subnet {shown(budget.subnet)}; expected one of {', '.join(self.subnet_names)}"
                )
            return Route((budget.subnet,), (1.0,), policy="subnet")
        point = self.resolve(budget).point
        return self._policies[point.policy].route(np.asarray(correct_prob), np.asarray(gate), point.threshold)
