"""Executing a Route: one subnet, top-k path branches combined by weight, or a cascade.

The expert calls are passed in (`run`), so the combination logic is plain code that tests
can drive without Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dynaroute.router.policy import Route


@dataclass(frozen=True)
class SubnetAnswer:
    """One subnet's answer for one input, and what it cost."""

    subnet: str  # the subnet that ran (after any fallback)
    logits: np.ndarray  # [C]
    depth: int  # exit the answer left at (1-based)
    flops: int
    queue_s: float = 0.0
    compute_s: float = 0.0
    fallback: str | None = None  # "wanted->used" when the wanted subnet's expert was down
    fallback_reason: str | None = None  # why: expert_unavailable or expert_error


@dataclass(frozen=True)
class Outcome:
    logits: np.ndarray  # the combined answer, [C]
    answers: tuple[SubnetAnswer, ...]  # the answers combined into `logits` (the last step)
    steps: tuple[SubnetAnswer, ...]  # every subnet run, escalations included, in order
    escalations: int
    queue_s: float
    compute_s: float

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.steps)


# run(subnet, exit_bound, first_exit) -> that subnet's answer for this input.
RunSubnet = Callable[[str, float | None, int], Awaitable[SubnetAnswer]]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def confidence(logits: np.ndarray) -> float:
    """Max softmax: the confidence that early exit and the cascade compare with their bound."""
    return float(softmax(logits).max(-1))


def combine(logits: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of logits (top-k over path branches); one subnet passes through unchanged."""
    if len(logits) != len(weights):
        raise ValueError(f"combine: {len(logits)} logits but {len(weights)} weights")
    if len(logits) == 1:
        return logits[0]
    return np.sum([w * lg for lg, w in zip(logits, weights, strict=True)], axis=0, dtype=np.float32)


async def _step(subnets: Sequence[str], weights: Sequence[float], bound: float | None, first_exit: int,
                run: RunSubnet):
    if len(subnets) == 1:
        a = await run(subnets[0], bound, first_exit)
        return a.logits, (a,), a.queue_s, a.compute_s
    answers = tuple(await asyncio.gather(*(run(s, bound, first_exit) for s in subnets)))
    # Branches run side by side: the request waited as long as the slowest of them.
    return (
        combine([a.logits for a in answers], weights),
        answers,
        max(a.queue_s for a in answers),
        max(a.compute_s for a in answers),
    )


async def execute(route: Route, run: RunSubnet) -> Outcome:
    """Run `route.subnets` (combined by `route.weights`) with early exit at the route's bound
    (from exit `route.first_exit` on); for a cascade, escalate through `route.escalation` while
    the confidence is below it."""
    bound, first = route.confidence_bound, route.first_exit
    logits, answers, queue_s, compute_s = await _step(route.subnets, route.weights, bound, first, run)
    steps = list(answers)
    escalations = 0
    if bound is not None:
        for nxt in route.escalation:
            if confidence(logits) >= bound:
                break
            logits, answers, q, c = await _step((nxt,), (1.0,), bound, first, run)
            steps.extend(answers)
            queue_s, compute_s = queue_s + q, compute_s + c
            escalations += 1
    return Outcome(logits, answers, tuple(steps), escalations, queue_s, compute_s)
