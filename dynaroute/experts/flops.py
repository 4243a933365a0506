"""FLOPs and parameter counts, measured with torch.utils.flop_counter, never by formula."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynaroute.experts.base import StagedModule


def count_flops(fn: Any, *args: Any) -> int:
    """FLOPs of one call `fn(*args)`, as FlopCounterMode counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def exit_flops(module: StagedModule, example: Any) -> list[int]:
    """Cumulative FLOPs of leaving at exit i when every exit up to i is evaluated on the way.

    This is what a sample costs inside an early-exit expert: the blocks it ran plus the exit
    heads that were checked. `example` is a batch of one.
    """
    result: list[int] = []
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        state = module.embed(example)
        for i in range(module.num_stages):
            state = module.stage(i, state)
            module.exit_logits(i, state)
            result.append(int(counter.get_total_flops()))
    return result
