"""A slimmable MLP for tensor inputs, with an exit after every block and optional K paths.

Width slices the hidden neurons (the first `round(width * hidden)` of every layer), depth
picks how many blocks run, and path picks one of `num_paths` independent branch networks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dynaroute.experts.base import DynamicModel, StagedModule, State
from dynaroute.experts.spec import SubnetSpec


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 64
    num_classes: int = 10
    hidden: int = 256
    num_blocks: int = 3
    num_paths: int = 1
    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    # Inputs are scaled inside the model so that clients send the data set's raw values.
    input_scale: float = 1.0 / 16.0
    dropout: float = 0.1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("in_features", "hidden", "num_blocks", "num_paths"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLPConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"MLPConfig.num_classes must be >= 2, got {self.num_classes}")
        if not self.widths or any(not 0 < w <= 1 for w in self.widths):
            raise ValueError(f"MLPConfig.widths must be fractions in (0, 1], got {self.widths}")
        if max(self.widths) != 1.0:
            raise ValueError(f"MLPConfig.widths must include 1.0, got {self.widths}")
        object.__setattr__(self, "widths", tuple(sorted(float(w) for w in self.widths)))

    def active(self, width: float) -> int:
        """Neurons kept at this width (at least one)."""
        return max(1, round(width * self.hidden))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MLPConfig:
        d = dict(d)
        d["widths"] = tuple(d.get("widths", cls.widths))
        return cls(**d)


class _Branch(nn.Module):
    """One path: block 0 maps the input to hidden, blocks 1.. are residual, exits after each."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Linear(cfg.in_features if i == 0 else cfg.hidden, cfg.hidden) for i in range(cfg.num_blocks)]
        )
        self.exit_norms = nn.ModuleList([nn.LayerNorm(cfg.hidden) for _ in range(cfg.num_blocks)])
        self.exits = nn.ModuleList([nn.Linear(cfg.hidden, cfg.num_classes) for _ in range(cfg.num_blocks)])


class SlimmableMLP(DynamicModel):
    config_class = MLPConfig

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.paths = nn.ModuleList([_Branch(config) for _ in range(config.num_paths)])
        self.dropout = nn.Dropout(config.dropout)

    def subnets(self) -> list[SubnetSpec]:
        c = self.config
        return [
            SubnetSpec(w, d, p) for p in range(c.num_paths) for w in c.widths for d in range(1, c.num_blocks + 1)
        ]

    def forward_exits(self, x: torch.Tensor, width: float, path: int = 0) -> list[torch.Tensor]:
        c = self.config
        n = c.active(width)
        branch = self.paths[path]
        h = x.flatten(1) * c.input_scale
        out = []
        for i in range(c.num_blocks):
            lin = branch.blocks[i]
            w = lin.weight[:n] if i == 0 else lin.weight[:n, :n]
            z = F.relu(F.linear(h, w, lin.bias[:n]))
            h = z if i == 0 else h + z
            h = self.dropout(h)
            norm = branch.exit_norms[i]
            e = F.layer_norm(h, (n,), norm.weight[:n], norm.bias[:n], norm.eps)
            head = branch.exits[i]
            out.append(F.linear(e, head.weight[:, :n], head.bias))
        return out

    def extract(self, spec: SubnetSpec) -> ExtractedMLP:
        self.check_spec(spec)
        c = self.config
        n = c.active(spec.width)
        branch = self.paths[spec.path]
        m = ExtractedMLP(c.in_features, n, c.num_classes, spec.depth, c.input_scale)
        with torch.no_grad():
            for i in range(spec.depth):
                src = branch.blocks[i]
                m.blocks[i].weight.copy_(src.weight[:n] if i == 0 else src.weight[:n, :n])
                m.blocks[i].bias.copy_(src.bias[:n])
                m.exit_norms[i].weight.copy_(branch.exit_norms[i].weight[:n])
                m.exit_norms[i].bias.copy_(branch.exit_norms[i].bias[:n])
                m.exits[i].weight.copy_(branch.exits[i].weight[:, :n])
                m.exits[i].bias.copy_(branch.exits[i].bias)
        return m.eval()


class ExtractedMLP(StagedModule):
    """A physically sliced subnet of `SlimmableMLP`: `depth` blocks of `hidden` neurons."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, depth: int, input_scale: float):
        super().__init__()
        self.num_stages = depth
        self.input_scale = input_scale
        self.blocks = nn.ModuleList([nn.Linear(in_features if i == 0 else hidden, hidden) for i in range(depth)])
        self.exit_norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(depth)])
        self.exits = nn.ModuleList([nn.Linear(hidden, num_classes) for _ in range(depth)])

    def embed(self, x: torch.Tensor) -> State:
        return (x.flatten(1) * self.input_scale,)

    def stage(self, index: int, state: State) -> State:
        (h,) = state
        z = F.relu(self.blocks[index](h))
        return (z if index == 0 else h + z,)

    def exit_logits(self, index: int, state: State) -> torch.Tensor:
        return self.exits[index](self.exit_norms[index](state[0]))
