"""Router models: input -> per-subnet P(correct) logits and gate logits over path branches.

A router family is a config dataclass plus an `nn.Module` subclass of `Router`, registered by
name so that a bundle's manifest can say which to build (as `experts/registry.py` does for
supernets). Text routers take the same (ids, mask) tuple the experts take.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dynaroute.errors import BundleError


class Router(nn.Module, ABC):
    """Every router returns `(correct_logits [N, num_subnets], gate_logits [N, num_paths])`.

    sigmoid(correct_logits) is the predicted probability that each subnet (in the bundle's
    subnet order) answers correctly; softmax(gate_logits) weighs the path branches.
    """

    num_subnets: int
    num_paths: int

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
    family = "mlp"

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


# family -> (config from dict, router from config)
_ROUTER_FAMILIES: dict[str, tuple[Callable[[dict], Any], Callable[[Any], Router]]] = {
    MLPRouter.family: (MLPRouterConfig.from_dict, MLPRouter),
}


def register_router_family(name: str, config_from_dict: Callable[[dict], Any], build: Callable[[Any], Router]) -> None:
    """Make `build_router(name, config)` work; call it where the family's module is imported
    (text families: in the module that `experts/registry.py` imports for the text supernet)."""
    _ROUTER_FAMILIES[name] = (config_from_dict, build)


def build_router(family: str, config: dict) -> Router:
    """An untrained router of `family` from its manifest config."""
    from dynaroute.experts.registry import _load_optional_families

    _load_optional_families()
    if family not in _ROUTER_FAMILIES:
        raise BundleError(f"unknown router family {family!r}; expected one of {sorted(_ROUTER_FAMILIES)}")
    from_dict, build = _ROUTER_FAMILIES[family]
    try:
        return build(from_dict(config))
    except (TypeError, ValueError) as e:
        raise BundleError(f"bad router config for family {family!r}: {e}") from e
