"""DynaBERT's distillation losses: the sandwich rule's widths per step, logit distillation
from the teacher's exit at the same layer, and hidden-state matching."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def sandwich_widths(widths: list[float], per_step: int, rng: random.Random) -> list[float]:
    """The widths one training step runs (the sandwich rule): the largest and the smallest every
    step, and random middle ones up to `per_step`, so every width is trained, the middle ones
    (a cascade's first rungs) included. `widths` ascending."""
    middle = widths[1:-1]
    k = min(len(middle), max(0, per_step - 2))
    return ([widths[-1], widths[0]] + rng.sample(middle, k))[:per_step]


def _kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean")


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(a.dtype)[..., None]
    return ((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1])


def distill_loss(
    student: tuple[list[torch.Tensor], list[torch.Tensor]],
    teacher: tuple[list[torch.Tensor], list[torch.Tensor]],
    kept: tuple[int, ...],
    num_layers: int,
    y: torch.Tensor,
    mask: torch.Tensor,
    distill_weight: float,
    hidden_weight: float,
) -> torch.Tensor:
    """DynaBERT's distillation for one student subnet: its exit after kept layer k learns from
    the teacher's exit after layer k (its last exit from the teacher's last), and its hidden
    state after kept layer k matches the teacher's after layer k (the last matches the last).
    `distill_weight` weighs the KD term against the label term per exit; `hidden_weight` the
    hidden-state MSE."""
    s_hidden, s_logits = student
    t_hidden, t_logits = teacher
    targets = [k for k in kept[:-1]] + [num_layers - 1]
    loss = torch.zeros(())
    for logits, k in zip(s_logits, targets, strict=True):
        ce = F.cross_entropy(logits, y)
        loss = loss + ((1 - distill_weight) * ce + distill_weight * _kd(logits, t_logits[k])) / len(targets)
    hid = sum(_masked_mse(h, t_hidden[k + 1], mask) for h, k in zip(s_hidden[1:], targets, strict=True))
    return loss + hidden_weight * hid / len(targets)
