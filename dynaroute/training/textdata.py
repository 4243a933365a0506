"""Text batches for training: a split's sentences and labels, length-bucketed batches with
dynamic padding (a batch costs what its own sentences need, not `max_length`)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dynaroute.text import TextEncoder


@dataclass
class TextSplit:
    texts: list[str]
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

def length_batches(lengths: list[int], batch_size: int, rng: random.Random, shuffle: bool = True) -> list[list[int]]:
    """Batches of indices with similar lengths (dynamic padding wastes little), in random order."""
    idx = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(idx)
    chunk = batch_size * 50  # sort within chunks: similar lengths, still random across chunks
    batches = []
    for start in range(0, len(idx), chunk):
        part = sorted(idx[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def batch_stream(
    split: TextSplit, encoder: TextEncoder, lengths: list[int], batch_size: int, seed: int
) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Endless ((ids, mask), labels) batches, epoch after epoch, deterministic for a seed."""
    epoch = 0
    while True:
        for b in length_batches(lengths, batch_size, random.Random(seed * 1000 + epoch)):
            yield encoder.encode([split.texts[i] for i in b]), torch.as_tensor(split.y[b])
        epoch += 1


