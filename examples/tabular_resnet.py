"""A supernet family dynaroute does not ship: a slimmable ResNet for tabular data.

The architecture is the tabular ResNet of Gorishniy et al. (2021, "Revisiting Deep Learning
Models for Tabular Data"): a linear stem to `d_main` features, then residual blocks
`h + W2 · dropout(relu(W1 · norm(h)))` whose inner layer has `d_hidden` neurons. Made dynamic:

- width keeps the first `round(width * d_hidden)` inner neurons of every block (W1's rows, W2's
  columns); the residual stream keeps its `d_main` features, so every width shares the stem
  and the exits;
- depth is the number of blocks run; an exit (norm + linear) follows every block;
- one path.

What makes it a dynaroute family is only the `DynamicModel` interface (dynaroute/experts/base.py):
`config_class` (a frozen config dataclass with `to_dict` / `from_dict`), `subnets()`,
`forward_exits()` and `extract()`, which returns a `StagedModule` with physically smaller
weights that runs block by block (for batched early exit in the experts). The manifest names
the family by import path, `SlimmableTabularResNet.family` ==
"examples.tabular_resnet:SlimmableTabularResNet", and the gateway, `dynaroute eval` and every
Ray expert actor find it by that name: this module must be importable wherever the bundle is
loaded (installed, or on PYTHONPATH / in the Ray job's `runtime_env` on every node).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynaroute.experts.base import DynamicModel, StagedModule, State
from dynaroute.experts.spec import SubnetSpec


@dataclass(frozen=True)
class TabularResNetConfig:
    in_features: int
    num_classes: int
    d_main: int = 64
    d_hidden: int = 128
    num_blocks: int = 3
    widths: tuple[float, ...] = (0.25, 0.5, 1.0)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("in_features", "d_main", "d_hidden", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"TabularResNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"TabularResNetConfig.num_classes must be >= 2, got {self.num_classes}")
        if not self.widths or any(not 0 < w <= 1 for w in self.widths) or max(self.widths) != 1.0:
            raise ValueError(f"TabularResNetConfig.widths must be fractions in (0, 1] including 1.0, got {self.widths}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"TabularResNetConfig.dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "widths", tuple(sorted(float(w) for w in self.widths)))

    def active(self, width: float) -> int:
        """Inner neurons kept at this width (at least one)."""
        return max(1, round(width * self.d_hidden))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TabularResNetConfig:
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        return cls(**d)


class _Block(nn.Module):
    def __init__(self, d_main: int, d_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_main)
        self.inner = nn.Linear(d_main, d_hidden)
        self.outer = nn.Linear(d_hidden, d_main)


class _Exit(nn.Module):
    def __init__(self, d_main: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_main)
        self.head = nn.Linear(d_main, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))


class SlimmableTabularResNet(DynamicModel):
    """The supernet: every (width, depth) subnet shares these weights. Inputs are standardised
    feature vectors [N, F] (the gateway standardises the raw values clients send)."""

    config_class = TabularResNetConfig

    def __init__(self, config: TabularResNetConfig):
        super().__init__()
        self.config = c = config
        self.stem = nn.Linear(c.in_features, c.d_main)
        self.blocks = nn.ModuleList([_Block(c.d_main, c.d_hidden) for _ in range(c.num_blocks)])
        self.exits = nn.ModuleList([_Exit(c.d_main, c.num_classes) for _ in range(c.num_blocks)])
        self.dropout = nn.Dropout(c.dropout)

    def subnets(self) -> list[SubnetSpec]:
        c = self.config
        return [SubnetSpec(w, d, 0) for w in c.widths for d in range(1, c.num_blocks + 1)]

    def forward_exits(self, x: torch.Tensor, width: float, path: int = 0) -> list[torch.Tensor]:
        if path != 0:
            raise ValueError(f"SlimmableTabularResNet has one path; got path {path}")
        n = self.config.active(width)
        h = self.stem(x.flatten(1).float())
        out = []
        for block, exit_ in zip(self.blocks, self.exits, strict=True):
            z = F.relu(F.linear(block.norm(h), block.inner.weight[:n], block.inner.bias[:n]))
            h = h + F.linear(self.dropout(z), block.outer.weight[:, :n], block.outer.bias)
            out.append(exit_(h))
        return out

    def extract(self, spec: SubnetSpec) -> ExtractedTabularResNet:
        self.check_spec(spec)
        c = self.config
        n = c.active(spec.width)
        m = ExtractedTabularResNet(c, n, spec.depth)
        with torch.no_grad():
            m.stem.load_state_dict(self.stem.state_dict())
            for i in range(spec.depth):
                src, dst = self.blocks[i], m.blocks[i]
                dst.norm.load_state_dict(src.norm.state_dict())
                dst.inner.weight.copy_(src.inner.weight[:n])
                dst.inner.bias.copy_(src.inner.bias[:n])
                dst.outer.weight.copy_(src.outer.weight[:, :n])
                dst.outer.bias.copy_(src.outer.bias)
                m.exits[i].load_state_dict(self.exits[i].state_dict())
        return m.eval()


class ExtractedTabularResNet(StagedModule):
    """One subnet with physically sliced weights: `depth` blocks of `hidden` inner neurons.
    State between stages: (h [N, d_main],)."""

    def __init__(self, c: TabularResNetConfig, hidden: int, depth: int):
        super().__init__()
        self.num_stages = depth
        self.stem = nn.Linear(c.in_features, c.d_main)
        self.blocks = nn.ModuleList([_Block(c.d_main, hidden) for _ in range(depth)])
        self.exits = nn.ModuleList([_Exit(c.d_main, c.num_classes) for _ in range(depth)])

    def embed(self, x: torch.Tensor) -> State:
        return (self.stem(x.flatten(1).float()),)

    def stage(self, index: int, state: State) -> State:
        (h,) = state
        block = self.blocks[index]
        return (h + block.outer(F.relu(block.inner(block.norm(h)))),)

    def exit_logits(self, index: int, state: State) -> torch.Tensor:
        return self.exits[index](state[0])
