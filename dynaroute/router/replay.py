"""Replay a Route on precomputed subnet outputs: what the engine would answer and spend.

Calibration and the report use this instead of running experts: every subnet's softmax
output on a split is computed once, and a route's answer and FLOPs follow from them exactly,
with the engine's semantics (see `Route`): branches mix their logits by the route's weights;
with a confidence bound a sample leaves a subnet at its first exit whose max softmax reaches
it (paying that exit's measured cumulative `exit_flops`; exits before the route's `first_exit`
are passed by), and a cascade escalates while the answer's confidence is below the bound,
paying each escalation in full. Examples that share a route are replayed together (numpy over
rows), which is what makes sweeping a policy's thresholds over thousands of rows cheap.
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


@dataclass(frozen=True)
class ReplayedRows:
    """`Replayed` for many examples of one route: probs [n, C], flops [n], escalations [n],
    exit_depths [n, branches] (an escalated row answers from one subnet: column 0, others 0)."""

    probs: np.ndarray
    flops: np.ndarray
    escalations: np.ndarray
    exit_depths: np.ndarray


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

    def _run(self, s: int, rows: np.ndarray, bound: float | None, first_exit: int) -> tuple[np.ndarray, ...]:
        """One subnet on examples `rows`: (log-probs [n, C], FLOPs [n], exit depth [n])."""
        exits, n = self.exits[s], len(rows)
        last = len(exits) - 1
        logp = self.log_probs[exits[last], rows]
        if bound is None:
            return logp, np.full(n, self.flops[s], dtype=np.int64), np.full(n, last + 1, dtype=np.int64)
        logp = logp.copy()
        flops = np.full(n, self.exit_flops[s][last], dtype=np.int64)
        depth = np.full(n, last + 1, dtype=np.int64)
        running = np.ones(n, dtype=bool)
        for j in range(max(0, first_exit - 1), last):
            leave = running & (self.probs[exits[j], rows].max(-1) >= bound)
            logp[leave] = self.log_probs[exits[j], rows[leave]]
            flops[leave], depth[leave] = self.exit_flops[s][j], j + 1
            running &= ~leave
        return logp, flops, depth

    def replay_rows(self, route: Route, rows: np.ndarray) -> ReplayedRows:
        """The engine's answers and expert FLOPs for the same route on examples `rows`."""
        rows = np.asarray(rows, dtype=np.int64)
        bound, first = route.confidence_bound, route.first_exit
        logp = np.zeros((len(rows), self.probs.shape[2]))
        flops = np.zeros(len(rows), dtype=np.int64)
        depths = []
        for name, weight in zip(route.subnets, route.weights, strict=True):
            lp, f, d = self._run(self.index[name], rows, bound, first)
            logp, flops = logp + weight * lp, flops + f
            depths.append(d)
        probs = _softmax(logp)
        depth = np.stack(depths, axis=1)
        escalations = np.zeros(len(rows), dtype=np.int64)
        for name in route.escalation if bound is not None else ():
            unsure = np.flatnonzero(probs.max(-1) < bound)
            if not len(unsure):
                break
            lp, f, d = self._run(self.index[name], rows[unsure], bound, first)
            probs[unsure], flops[unsure] = _softmax(lp), flops[unsure] + f
            escalations[unsure] += 1
            depth[unsure] = 0  # one subnet answers an escalated row: its depth in column 0
            depth[unsure, 0] = d
        return ReplayedRows(probs, flops, escalations, depth)

    def replay(self, route: Route, i: int) -> Replayed:
        """The engine's answer and expert FLOPs for route `route` on example i."""
        r = self.replay_rows(route, np.array([i]))
        return Replayed(r.probs[0], int(r.flops[0]), int(r.escalations[0]),
                        tuple(int(d) for d in r.exit_depths[0] if d > 0))


def _softmax(logp: np.ndarray) -> np.ndarray:
    e = np.exp(logp - logp.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
