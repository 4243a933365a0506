"""Budget: the per-request trade-off between accuracy and compute.

CONTRACT: at most one of quality, max_flops, target_accuracy, subnet is set; none set means
the server's default quality. `policy` optionally names a policy ("threshold", "cascade",
"topk"); None uses the bundle's default.

A floor (`min_quality` or `min_accuracy`, at most one) says how far the server may lower the
budget to hold its latency objective under load (dynaroute/gateway/slo.py): never to a
calibrated point below the floor. No floor (the default): the budget is never lowered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynaroute.errors import InvalidInputError


@dataclass(frozen=True)
class Budget:
    quality: float | None = None  # 0 = cheapest, 1 = most accurate calibrated operating point
    max_flops: float | None = None  # mean FLOPs per example, router included
    target_accuracy: float | None = None  # expected accuracy in [0, 1]
    subnet: str | None = None  # pin one subnet by name, no routing
    policy: str | None = None
    min_quality: float | None = None  # floor: the server may lower the budget to points of at least this quality
    min_accuracy: float | None = None  # floor: ... to points whose expected accuracy reaches this

    def __post_init__(self) -> None:
        set_fields = [
            n for n in ("quality", "max_flops", "target_accuracy", "subnet") if getattr(self, n) is not None
        ]
        if len(set_fields) > 1:
            raise InvalidInputError(
                f"budget: set at most one of quality, max_flops, target_accuracy, subnet; got {set_fields}"
            )
        floors = [n for n in ("min_quality", "min_accuracy") if getattr(self, n) is not None]
        if len(floors) > 1:
            raise InvalidInputError(f"budget: set at most one floor, min_quality or min_accuracy; got {floors}")
        if floors and self.subnet is not None:
            raise InvalidInputError(f"budget.{floors[0]}: a pinned subnet is never lowered; a floor applies to "
                                    "quality, max_flops and target_accuracy budgets")
        for name in ("quality", "target_accuracy", "min_quality", "min_accuracy"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or not 0.0 <= v <= 1.0):
                raise InvalidInputError(f"budget.{name} must be in [0, 1], got {v}")
        if self.max_flops is not None and (not math.isfinite(self.max_flops) or self.max_flops <= 0):
            raise InvalidInputError(f"budget.max_flops must be a positive number of FLOPs, got {self.max_flops}")
        if self.subnet is not None and not self.subnet:
            raise InvalidInputError("budget.subnet must name a subnet, got an empty string")
