"""Supernet training for tensor models: the sandwich rule with in-place distillation.

Each step trains, for every path, the largest width, the smallest width and `random_widths`
widths drawn at random; every exit of each is trained. The largest width learns from the
labels; the others learn from the labels and from the largest width's detached predictions
at the same exit (in-place distillation, as in slimmable / once-for-all networks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dynaroute.data import Split
from dynaroute.experts.base import DynamicModel
from dynaroute.progress import progress_bar


@dataclass(frozen=True)
class SupernetTrainConfig:
    epochs: int = 80
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    random_widths: int = 2
    distill_weight: float = 0.5
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SupernetTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"SupernetTrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"SupernetTrainConfig.distill_weight must be in [0, 1], got {self.distill_weight}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sandwich_loss(
    model: DynamicModel, x: torch.Tensor, y: torch.Tensor, widths: list[float], path: int, cfg: SupernetTrainConfig
) -> torch.Tensor:
    """Loss of one sandwich step on one path; `widths[0]` must be the largest."""
    teacher_exits = model.forward_exits(x, widths[0], path)
    loss = sum(F.cross_entropy(logits, y) for logits in teacher_exits) / len(teacher_exits)
    soft = [F.softmax(t.detach() / cfg.temperature, dim=-1) for t in teacher_exits]
    for w in widths[1:]:
        exits = model.forward_exits(x, w, path)
        for logits, target in zip(exits, soft, strict=True):
            ce = F.cross_entropy(logits, y)
            kd = F.kl_div(F.log_softmax(logits / cfg.temperature, dim=-1), target, reduction="batchmean")
            loss = loss + ((1 - cfg.distill_weight) * ce + cfg.distill_weight * kd) / len(exits)
    return loss


def train_supernet(model: DynamicModel, train: Split, cfg: SupernetTrainConfig, progress: bool = True) -> list[float]:
    """Train in place; returns the mean loss of each epoch."""
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    widths = sorted(model.config.widths)
    x_all = torch.as_tensor(train.x)
    y_all = torch.as_tensor(train.y)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    model.train()
    bar = progress_bar(range(cfg.epochs), desc="supernet", unit="epoch", enabled=progress)
    for _ in bar:
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for start in range(0, len(train), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x, y = x_all[idx], y_all[idx]
            middle = rng.choices(widths[1:-1] or widths, k=cfg.random_widths)
            step_widths = [widths[-1], widths[0], *middle]
            loss = sum(sandwich_loss(model, x, y, step_widths, p, cfg) for p in range(model.num_paths))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        history.append(total / steps_per_epoch)
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    model.eval()
    return history
