"""Top-k paths policy: run the k branches the gate weighs most and mix their outputs."""

from __future__ import annotations

import numpy as np

from dynaroute.experts.spec import SubnetSpec
from dynaroute.router.policy import Policy, Route


class TopKPolicy(Policy):
    """option k (default 2, at most the number of paths): the branches run side by side.

    Their weights are the gate's, renormalised over the k. The (width, depth) they run at is
    the cheapest whose gate-weighted predicted correctness reaches the threshold, or the best
    scored one when none does. Single-path bundles get k = 1. No early exit.
    """

    name = "topk"

    def __init__(self, subnet_names: list[str], subnet_flops: list[int], **options: float):
        super().__init__(subnet_names, subnet_flops, **options)
        self.k = int(options.get("k", 2))
        if self.k < 1:
            raise ValueError(f"topk option k must be >= 1, got {self.k}")
        specs = [SubnetSpec.parse(n) for n in subnet_names]
        self.num_paths = 1 + max(s.path for s in specs)
        index = {(s.width, s.depth, s.path): i for i, s in enumerate(specs)}
        shapes = sorted({(s.width, s.depth) for s in specs})
        # table[c, p]: subnet index of shape c on path p (-1 when a path lacks that shape)
        self.table = np.array([[index.get((w, d, p), -1) for p in range(self.num_paths)] for w, d in shapes])

    def route(self, correct_prob: np.ndarray, gate: np.ndarray, threshold: float) -> Route:
        k = min(self.k, self.num_paths, len(gate))
        paths = np.argsort(-np.asarray(gate, dtype=np.float64), kind="stable")[:k]
        rows = self.table[:, paths]
        valid = (rows >= 0).all(axis=1)
        weights = np.asarray(gate, dtype=np.float64)[paths]
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(k, 1.0 / k)
        score = np.where(valid, (correct_prob[np.maximum(rows, 0)] * weights).sum(axis=1), -np.inf)
        cost = np.where(valid, self.subnet_flops[np.maximum(rows, 0)].sum(axis=1), np.inf)
        order = np.argsort(cost, kind="stable")
        ok = [c for c in order if score[c] >= threshold]
        chosen = ok[0] if ok else int(np.argmax(score))
        names = tuple(self.subnet_names[i] for i in rows[chosen])
        return Route(names, tuple(float(w) for w in weights), policy=self.name)
