"""The two interfaces every model family implements.

`DynamicModel` is the trained supernet: it runs at any `SubnetSpec` and extracts standalone
subnets. `StagedModule` is what extraction returns: a plain module with physically smaller
weights that can also be run block by block, which is what batched early exit needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from dynaroute.experts.spec import SubnetSpec
from dynaroute.registry import FamilyName, Registry

# The state carried between stages: batch-first tensors, so that compacting a batch (samples
# leaving at an early exit) is `tuple(t[keep] for t in state)`.
State = tuple[torch.Tensor, ...]


class StagedModule(nn.Module, ABC):
    """An extracted subnet: embed, then `num_stages` blocks, with an exit head after each."""

    num_stages: int

    @abstractmethod
    def embed(self, x: Any) -> State:
        """Turn a model input (tensor, or token ids and mask) into the first state."""

    @abstractmethod
    def stage(self, index: int, state: State) -> State:
        """Run block `index` (0-based)."""

    @abstractmethod
    def exit_logits(self, index: int, state: State) -> torch.Tensor:
        """Classifier logits of the exit after block `index`."""

    def forward(self, x: Any) -> torch.Tensor:
        """Logits at the last exit, as the supernet gives them at this subnet's spec."""
        state = self.embed(x)
        for i in range(self.num_stages):
            state = self.stage(i, state)
        return self.exit_logits(self.num_stages - 1, state)

    def forward_exits(self, x: Any) -> list[torch.Tensor]:
        """Logits at every exit, shallowest first."""
        state = self.embed(x)
        out = []
        for i in range(self.num_stages):
            state = self.stage(i, state)
            out.append(self.exit_logits(i, state))
        return out


def select_rows(state: State, keep: torch.Tensor) -> State:
    """Compact a batch: keep the rows named by the index tensor `keep`."""
    return tuple(t[keep] for t in state)


class DynamicModel(nn.Module, ABC):
    """A supernet: one set of weights, many subnets.

    A family is a subclass driven by one config dataclass (`config_class`, with `from_dict`
    and `to_dict`); the manifest records `family` (the class's import path) and the config's
    dict, and `SUPERNET_FAMILIES.build(family, config)` builds it again in any process."""

    config: Any
    config_class: ClassVar[type]
    family: ClassVar[str] = FamilyName()  # type: ignore[assignment]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DynamicModel:
        """An untrained supernet from its manifest config (override for another config form)."""
        return cls(cls.config_class.from_dict(config))

    @abstractmethod
    def subnets(self) -> list[SubnetSpec]:
        """Every static subnet this supernet offers, cheapest first within each path."""

    @abstractmethod
    def forward_exits(self, x: Any, width: float, path: int = 0) -> list[torch.Tensor]:
        """Logits at every exit at this width and path; exit i is the subnet of depth i + 1."""

    @abstractmethod
    def extract(self, spec: SubnetSpec) -> StagedModule:
        """A standalone module with sliced weights whose logits equal `forward(x, spec)`."""

    def subnet_logits(self, x: Any, width: float, path: int = 0) -> dict[int, torch.Tensor]:
        """Each static subnet's logits at this width and path, by depth. The default reads them
        off the exits; families whose shallow subnets are not prefixes (DynaBERT) override it."""
        return dict(enumerate(self.forward_exits(x, width, path), start=1))

    def forward(self, x: Any, spec: SubnetSpec) -> torch.Tensor:
        self.check_spec(spec)
        return self.forward_exits(x, spec.width, spec.path)[spec.depth - 1]

    def check_spec(self, spec: SubnetSpec) -> None:
        if spec not in set(self.subnets()):
            names = ", ".join(s.name for s in self.subnets())
            raise ValueError(f"subnet {spec.name} is not offered by this model; expected one of {names}")

    @property
    def full_spec(self) -> SubnetSpec:
        """The largest subnet of path 0: the static full model every cost is compared with."""
        return max((s for s in self.subnets() if s.path == 0), key=lambda s: (s.width, s.depth))

    @property
    def num_paths(self) -> int:
        return 1 + max(s.path for s in self.subnets())


# Supernet families by name. The short names are those that manifests written before families
# were recorded by import path carry.
SUPERNET_FAMILIES: Registry[DynamicModel] = Registry("supernet family", DynamicModel, {
    "slimmable_mlp": "dynaroute.experts.mlp:SlimmableMLP",
    "dynabert": "dynaroute.experts.bert:DynaBert",
})
