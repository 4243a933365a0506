"""The text router: mean-pooled token embeddings and a small MLP, on the (ids, mask) the experts take.

Its embedding table starts as the supernet's word embeddings projected onto their top principal
directions (a few dimensions carry most of their variance) and stays frozen: looking a token up
costs no FLOPs, and a few thousand routing examples could not train 30k rows. Only the MLP
learns, so the router costs a few ten thousand FLOPs, far under 2% of even the smallest subnet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dynaroute.router.model import Router


@dataclass(frozen=True)
class TextRouterConfig:
    vocab_size: int
    num_subnets: int
    num_paths: int = 1
    embed_dim: int = 64
    hidden: int = 64

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_subnets", "num_paths", "embed_dim", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextRouterConfig.{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TextRouterConfig:
        return cls(**d)


class TextRouter(Router):
    config_class = TextRouterConfig

    def __init__(self, config: TextRouterConfig):
        super().__init__()
        self.config = config
        self.num_subnets = config.num_subnets
        self.num_paths = config.num_paths
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.embed.weight.requires_grad_(False)
        self.norm = nn.LayerNorm(config.embed_dim + 1)
        self.hidden = nn.Linear(config.embed_dim + 1, config.hidden)
        self.head = nn.Linear(config.hidden, config.num_subnets + config.num_paths)

    @torch.no_grad()
    def init_from_word_embeddings(self, word: torch.Tensor) -> None:
        """Project the supernet's [vocab, H] word embeddings onto their top `embed_dim` principal axes."""
        centred = word - word.mean(0, keepdim=True)
        _, _, v = torch.pca_lowrank(centred, q=self.config.embed_dim, center=False, niter=4)
        self.embed.weight.copy_(centred @ v)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = x
        m = mask.to(torch.float32)[..., None]
        count = m.sum(1).clamp_min(1.0)
        pooled = (self.embed(ids) * m).sum(1) / count
        # sentence length is a cheap, strong hint of difficulty
        features = torch.cat([pooled, torch.log(count) / 4.0], dim=-1)
        out = self.head(torch.relu(self.hidden(self.norm(features))))
        return out[:, : self.num_subnets], out[:, self.num_subnets :]

