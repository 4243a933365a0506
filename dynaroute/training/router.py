"""Router training, two ways, both generic over the router module and its inputs.

1. `train_router_supervised`: from the trained, frozen supernet. For each training example
   and subnet the target is the subnet's softmax probability on the true class: 1 when the
   subnet is right and confident, lower when it hesitates or is wrong. A binary "was it
   right" target carries no signal where the supernet fits the training split (digits: every
   subnet is right on every training example); the confidence still ranks the inputs by
   difficulty. The gate learns which path has the least loss (soft targets).
2. `train_joint`: router and supernet fine-tuned together end to end. The router's correctness
   logits minus a FLOPs offset are the logits of a straight-through Gumbel-softmax choice of
   one subnet per example; the chosen subnet's logits answer, so the task loss trains the
   supernet for the inputs routed to each subnet and the router toward subnets that answer
   well; the expected FLOPs of the choice are penalised. A BCE term keeps the correctness
   head a probability, and a mean loss over all subnets keeps every static subnet usable.

Inputs are a tensor or a tuple of tensors (text: ids, mask), batch first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dynaroute.experts.base import DynamicModel
from dynaroute.experts.spec import SubnetSpec
from dynaroute.progress import progress_bar
from dynaroute.router.model import Router


def take(x: Any, idx: torch.Tensor | slice) -> Any:
    """Rows `idx` of a batch-first tensor or tuple of tensors."""
    return tuple(t[idx] for t in x) if isinstance(x, tuple) else x[idx]


def batch_len(x: Any) -> int:
    return len(x[0]) if isinstance(x, tuple) else len(x)


@dataclass(frozen=True)
class RouterTrainConfig:
    epochs: int = 150
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-4
    gate_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"RouterTrainConfig.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class JointTrainConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-4  # supernet: a gentle fine-tune of already trained weights
    router_lr: float = 3e-3
    flops_weight: float = 1.0  # penalty per unit of expected FLOPs ratio
    flops_offset: float = 4.0  # selection logit offset per unit of FLOPs ratio
    keep_weight: float = 0.5  # mean loss of all subnets, so static subnets stay usable
    tau: float = 1.0  # Gumbel-softmax temperature
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"JointTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "router_lr", "tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"JointTrainConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("flops_weight", "flops_offset", "keep_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"JointTrainConfig.{name} must be >= 0, got {getattr(self, name)}")


def correctness_targets(probs: dict[str, np.ndarray], labels: np.ndarray, names: list[str]) -> np.ndarray:
    """[N, S]: each subnet's softmax probability on the true class."""
    rows = np.arange(len(labels))
    return np.stack([probs[n][rows, labels] for n in names], axis=1).astype(np.float32)


def path_targets(probs: dict[str, np.ndarray], labels: np.ndarray, names: list[str]) -> np.ndarray:
    """[N, K]: softmax over paths of minus each path's mean cross-entropy over its subnets."""
    paths = np.array([SubnetSpec.parse(n).path for n in names])
    nll = -np.log(np.clip(correctness_targets(probs, labels, names), 1e-12, None))
    per_path = np.stack([nll[:, paths == p].mean(axis=1) for p in range(paths.max() + 1)], axis=1)
    z = np.exp(-(per_path - per_path.min(axis=1, keepdims=True)))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def router_loss(router: Router, x: Any, correct_target: torch.Tensor, path_target: torch.Tensor,
                gate_weight: float) -> torch.Tensor:
    correct_logits, gate_logits = router(x)
    loss = F.binary_cross_entropy_with_logits(correct_logits, correct_target)
    if gate_logits.shape[1] > 1:  # one path: the gate is a constant 1
        loss = loss + gate_weight * F.cross_entropy(gate_logits, path_target)
    return loss


def train_router_supervised(
    router: Router,
    inputs: Any,
    correct_target: np.ndarray,
    path_target: np.ndarray,
    cfg: RouterTrainConfig,
    progress: bool = True,
) -> list[float]:
    """Fit the router in place to the supernet's per-example targets; mean loss per epoch."""
    torch.manual_seed(cfg.seed)
    ct, pt = torch.as_tensor(correct_target), torch.as_tensor(path_target)
    n = batch_len(inputs)
    opt = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    router.train()
    for _ in progress_bar(range(cfg.epochs), desc="router", unit="epoch", enabled=progress):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = router_loss(router, take(inputs, idx), ct[idx], pt[idx], cfg.gate_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / n)
    router.eval()
    return history


def all_subnet_logits(model: DynamicModel, x: Any, names: list[str]) -> torch.Tensor:
    """[N, S, C] logits of every subnet, in `names` order; one pass per (width, path)."""
    specs = [SubnetSpec.parse(n) for n in names]
    # subnet_logits, not forward_exits: a DynaBERT subnet of depth d is not the prefix of a deeper one
    by_depth = {(w, p): model.subnet_logits(x, w, p) for w, p in sorted({(s.width, s.path) for s in specs})}
    return torch.stack([by_depth[(s.width, s.path)][s.depth] for s in specs], dim=1)


def train_joint(
    model: DynamicModel,
    router: Router,
    inputs: Any,
    labels: np.ndarray,
    names: list[str],
    flops_ratio: list[float],
    cfg: JointTrainConfig,
    progress: bool = True,
) -> list[float]:
    """Fine-tune supernet and router together, in place (see the module docstring)."""
    torch.manual_seed(cfg.seed)
    y_all = torch.as_tensor(labels)
    cost = torch.as_tensor(flops_ratio, dtype=torch.float32)
    n = batch_len(inputs)
    opt = torch.optim.AdamW([
        {"params": model.parameters(), "lr": cfg.lr},
        {"params": router.parameters(), "lr": cfg.router_lr},
    ])
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    model.train()
    router.train()
    for _ in progress_bar(range(cfg.epochs), desc="joint", unit="epoch", enabled=progress):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x, y = take(inputs, idx), y_all[idx]
            logits = all_subnet_logits(model, x, names)  # [B, S, C]
            correct_logits, gate_logits = router(x)
            select_logits = correct_logits - cfg.flops_offset * cost
            choice = F.gumbel_softmax(select_logits, tau=cfg.tau, hard=True)  # [B, S], one-hot, ST gradient
            answer = (choice.unsqueeze(-1) * logits).sum(dim=1)
            per_subnet = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(len(names)),
                                         reduction="none").view(len(idx), len(names))
            expected_flops = (F.softmax(select_logits, dim=-1) * cost).sum(dim=1).mean()
            with torch.no_grad():
                p_true = torch.exp(-per_subnet)
                path_loss = torch.stack(
                    [per_subnet[:, [SubnetSpec.parse(nm).path == p for nm in names]].mean(1)
                     for p in range(gate_logits.shape[1])], dim=1)
            loss = (
                F.cross_entropy(answer, y)
                + cfg.flops_weight * expected_flops
                + F.binary_cross_entropy_with_logits(correct_logits, p_true)
                + cfg.keep_weight * per_subnet.mean()
            )
            if gate_logits.shape[1] > 1:
                loss = loss + F.cross_entropy(gate_logits, F.softmax(-path_loss, dim=1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / n)
    model.eval()
    router.eval()
    return history
