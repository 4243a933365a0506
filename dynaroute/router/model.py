"""Router models: input -> per-subnet P(correct) logits and gate logits over path branches.

A router family is a config dataclass plus an `nn.Module` subclass of `Router`, found by name
through `ROUTER_FAMILIES` (dynaroute.registry), so that a bundle's manifest can say which to
build, as for supernets. Text routers take the same (ids, mask) tuple the experts take.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dynaroute.registry import FamilyName, Registry


class Router(nn.Module, ABC):
    """Every router returns `(correct_logits [N, num_subnets], gate_logits [N, num_paths])`.

    sigmoid(correct_logits) is the predicted probability that each subnet (in the bundle's
    subnet order) answers correctly; softmax(gate_logits) weighs the path branches.
    """

    num_subnets: int
    num_paths: int
    config_class: ClassVar[type]
    family: ClassVar[str] = FamilyName()  # type: ignore[assignment]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Router:
        """An untrained router from its manifest config (override for another config form)."""
        return cls(cls.config_class.from_dict(config))

    @abstractmethod
    def forward(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]: ...

    def numpy_forward(self) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
        """`forward` in numpy over a snapshot of the current weights, or None when the family has
        none. The gateway scores one or a few rows at a time, where torch's per-op dispatch costs
        far more than the arithmetic of a small router."""
        return None


@dataclass(frozen=True)
class MLPRouterConfig:
    """A one-hidden-layer MLP on the flattened input: a few thousand FLOPs for digits."""

    in_features: int
    num_subnets: int
    num_paths: int = 1
    hidden: int = 16
    # Same scaling as the supernet's, so that clients send the raw input to both.
    input_scale: float = 1.0 / 16.0

    def __post_init__(self) -> None:
        for name in ("in_features", "num_subnets", "num_paths", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLPRouterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.input_scale <= 0:
            raise ValueError(f"MLPRouterConfig.input_scale must be > 0, got {self.input_scale}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MLPRouterConfig:
        return cls(**d)


class MLPRouter(Router):
    config_class = MLPRouterConfig

    def __init__(self, config: MLPRouterConfig):
        super().__init__()
        self.config = config
        self.num_subnets = config.num_subnets
        self.num_paths = config.num_paths
        self.hidden = nn.Linear(config.in_features, config.hidden)
        # One head for both outputs: one matmul instead of two.
        self.head = nn.Linear(config.hidden, config.num_subnets + config.num_paths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.hidden(x.flatten(1).float() * self.config.input_scale))
        out = self.head(h)
        return out[:, : self.num_subnets], out[:, self.num_subnets :]

    def numpy_forward(self) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        w1 = self.hidden.weight.detach().cpu().numpy().T.copy()  # [in, hidden], x @ w1 as F.linear
        b1 = self.hidden.bias.detach().cpu().numpy().copy()
        w2 = self.head.weight.detach().cpu().numpy().T.copy()
        b2 = self.head.bias.detach().cpu().numpy().copy()
        scale = np.float32(self.config.input_scale)
        s = self.num_subnets

        def forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            h = (x.reshape(len(x), -1).astype(np.float32, copy=False) * scale) @ w1
            h += b1
            np.maximum(h, 0.0, out=h)
            out = h @ w2
            out += b2
            return out[:, :s], out[:, s:]

        return forward


# Router families by name; the short names are those older manifests carry.
ROUTER_FAMILIES: Registry[Router] = Registry("router family", Router, {
    "mlp": "dynaroute.router.model:MLPRouter",
    "text_mean_pool": "dynaroute.router.text:TextRouter",
})
