"""Replay a Route on precomputed subnet outputs: what the engine would answer and spend.

Calibration and the report use this instead of running experts: every subnet's softmax
output on a split is computed once, and a route's answer and FLOPs follow from them exactly,
with the engine's semantics (see `Route`): branches mix their logits by the route's weights;
with a confidence bound a sample leaves a subnet at its first exit whose max softmax reaches
it (paying that exit's measured cumulative `exit_flops`), and a cascade escalates while the
answer's confidence is below the bound, paying each escalation in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dynaroute.experts.spec import SubnetSpec
from dynaroute.router.policy import Route


@dataclass(frozen=True)
class Replayed:
    probs: np.ndarray  # [C] the answer's softmax
    flops: int  # experts only; add the router's
    escalations: int
    exit_depths: tuple[int, ...]


class SubnetOutputs:
    """Softmax outputs of every subnet on one split, plus the measured costs from the manifest.

    probs: name -> [N, C]; rows: the manifest's subnet entries (name, width, depth, path,
    flops, exit_flops), whose order is the router's column order.
    """

    def __init__(self, probs: dict[str, np.ndarray], rows: list[dict[str, Any]]):
        self.names = [r["name"] for r in rows]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.flops = [int(r["flops"]) for r in rows]
        self.exit_flops = [[int(f) for f in r["exit_flops"]] for r in rows]
        # [S, N, C] in subnet order; log-probs mix like logits (softmax is shift-invariant).
        stacked = [np.asarray(probs[n], dtype=np.float64) for n in self.names]
        specs = [SubnetSpec.parse(n) for n in self.names]
        by_shape = {(s.width, s.depth, s.path): i for i, s in enumerate(specs)}
        # exits[s]: indices of the outputs that answer at exit 1..depth of subnet s: the shallower
        # subnets where exits are prefixes (MLP); else the outputs given as probs[f"{name}@{j}"]
        # for exit j < depth (DynaBERT, whose shallow subnets keep other layers), appended after S.
        self.exits = []
        for name, s in zip(self.names, specs, strict=True):
            own = [f"{name}@{d}" for d in range(1, s.depth)]
            if all(k in probs for k in own):
                idx = []
                for k in own:
                    stacked.append(np.asarray(probs[k], dtype=np.float64))
                    idx.append(len(stacked) - 1)
                self.exits.append([*idx, self.index[name]])
            else:
                self.exits.append([by_shape[(s.width, d, s.path)] for d in range(1, s.depth + 1)])
        self.probs = np.stack(stacked)
        self.log_probs = np.log(np.clip(self.probs, 1e-30, None))

    def __len__(self) -> int:
        return self.probs.shape[1]

    def _run(self, s: int, i: int, bound: float | None) -> tuple[np.ndarray, int, int]:
        """One subnet on example i: (log-probs, FLOPs, exit depth)."""
        if bound is None:
            return self.log_probs[s, i], self.flops[s], len(self.exits[s])
        for j, e in enumerate(self.exits[s]):
            if self.probs[e, i].max() >= bound or j == len(self.exits[s]) - 1:
                return self.log_probs[e, i], self.exit_flops[s][j], j + 1
        raise AssertionError("unreachable")

    def replay(self, route: Route, i: int) -> Replayed:
        """The engine's answer and expert FLOPs for route `route` on example i."""
        bound = route.confidence_bound
        logp = np.zeros(self.probs.shape[2])
        flops = 0
        depths = []
        for name, weight in zip(route.subnets, route.weights, strict=True):
            lp, f, d = self._run(self.index[name], i, bound)
            logp = logp + weight * lp
            flops += f
            depths.append(d)
        probs = _softmax(logp)
        escalations = 0
        for name in route.escalation:
            if bound is None or probs.max() >= bound:
                break
            lp, f, d = self._run(self.index[name], i, bound)
            probs, flops, escalations, depths = _softmax(lp), flops + f, escalations + 1, [d]
        return Replayed(probs, flops, escalations, tuple(depths))


def _softmax(logp: np.ndarray) -> np.ndarray:
    e = np.exp(logp - logp.max())
    return e / e.sum()
