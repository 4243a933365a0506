"""CONTRACT between the API layer (servicers, client) and the engine (router, batching, Ray).

The servicers decode a wire request into an `InferRequest`, call `Engine.infer`, and encode
the `InferResult`. Keep these names and fields; add fields only with defaults.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dynaroute.router.budget import Budget
from dynaroute.router.calibration import OperatingPoint


@dataclass
class InferRequest:
    model: str
    id: str
    tensor: np.ndarray | None = None  # one example, the bundle's input dtype and shape
    text: str | None = None  # text models: one sentence, tokenised in the gateway
    budget: Budget = field(default_factory=Budget)
    deadline: float | None = None  # time.monotonic() by which the reply is due
    api: str = "native"  # which gRPC API it came in by ("native" or "kserve"), for metrics labels
    # Whether the engine counts it in dynaroute_requests_total (a KServe row is not: the servicer
    # counts the call); every row is counted in dynaroute_rows_total.
    count_request: bool = True
    # A row of a request admitted whole at the door (`RayEngine.admit`): the queues' size bound
    # does not refuse it, so a batch is served in full or refused in full, never in part.
    admitted: bool = False
    # The call this row belongs to, for the queues' fairness: the rows of one batch call share a
    # flow and take turns with other calls (None: the request is a flow of its own).
    flow: Hashable | None = None


@dataclass
class RouteTaken:
    subnets: list[str]  # subnets that produced the answer (k path branches for top-k)
    weights: list[float]
    escalations: int = 0  # cascade steps taken beyond the first subnet
    exit_depths: list[int] = field(default_factory=list)  # depth each subnet's answer left at
    fallbacks: list[str] = field(default_factory=list)  # "wanted->used" when an expert was down
    policy: str = ""
    budget_out_of_reach: bool = False  # no calibrated point met the budget; `budget_note` says what was used
    budget_note: str = ""
    # The operating point the budget asked for and the one served (the SLO controller lowers a
    # budget that has a floor under load); a pinned subnet is a point of policy "subnet".
    budget_asked: OperatingPoint | None = None
    budget_got: OperatingPoint | None = None

    @property
    def budget_lowered(self) -> bool:
        """Served at a cheaper point than asked."""
        asked, got = self.budget_asked, self.budget_got
        return asked is not None and got is not None and got.mean_flops < asked.mean_flops


@dataclass
class Cost:
    router_flops: int
    expert_flops: int
    full_flops: int  # the static full model's FLOPs for one example
    queue_s: float
    compute_s: float
    total_s: float

    @property
    def flops(self) -> int:
        return self.router_flops + self.expert_flops

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.full_flops


@dataclass
class InferResult:
    id: str
    logits: np.ndarray
    label: int
    label_name: str
    confidence: float
    route: RouteTaken
    cost: Cost


class Engine(Protocol):
    """What the servicers need. `infer` raises the exceptions of dynaroute.errors."""

    @property
    def model_name(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    def model_info(self) -> dict[str, Any]:
        """The bundle manifest's public part: input spec, labels, subnets (name, width, depth,
        path, flops, params, val_accuracy), router flops, calibration table."""
        ...

    def admit(self, rows: int) -> None:
        """Admit a request of `rows` rows whole (its rows then go with `admitted=True`) or raise
        InvalidInputError (it can never fit) / OverloadedError (not now)."""
        ...

    async def infer(self, request: InferRequest) -> InferResult: ...


def point_fields(point: OperatingPoint) -> dict[str, Any]:
    """An operating point (a reply's budget asked or served) as the fields of the native
    `CalibrationPoint`, which the KServe route JSON uses too."""
    return {"policy": point.policy, "quality": point.quality, "threshold": point.threshold,
            "expected_accuracy": point.accuracy, "mean_flops": point.mean_flops, "flops_ratio": point.flops_ratio}
