"""Budget: the per-request trade-off between accuracy and compute.

CONTRACT: at most one of quality, max_flops, target_accuracy, subnet is set; none set means
the server's default quality. `policy` optionally names a policy ("threshold", "cascade",
"topk"); None uses the bundle's default.
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

    def __post_init__(self) -> None:
        set_fields = [
            n for n in ("quality", "max_flops", "target_accuracy", "subnet") if getattr(self, n) is not None
        ]
        if len(set_fields) > 1:
            raise InvalidInputError(
                f"budget: set at most one of quality, max_flops, target_accuracy, subnet; got {set_fields}"
            )
        for name in ("quality", "target_accuracy"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or not 0.0 <= v <= 1.0):
                raise InvalidInputError(f"budget.{name} must be in [0, 1], got {v}")
        if self.max_flops is not None and (not math.isfinite(self.max_flops) or self.max_flops <= 0):
            raise InvalidInputError(f"budget.max_flops must be a positive number of FLOPs, got {self.max_flops}")
        if self.subnet is not None and not self.subnet:
            raise InvalidInputError("budget.subnet must name a subnet, got an empty string")
