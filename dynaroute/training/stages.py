"""A training run's folder and its resumable stages.

The run folder holds what training needs to resume and nothing that serving reads: each
finished stage's weights, mid-stage progress (weights and optimiser state) and `state.json`
(which stages are done, their figures, the settings they ran with). It lives beside the
bundle (`run_dir_for`), so that the bundle itself holds only what serving needs.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dynaroute.bundle import save_weights
from dynaroute.progress import progress_bar

RUN_SUFFIX = ".run"


def run_dir_for(out: str | Path) -> Path:
    """The default run folder of bundle `out`: `<out>.run` beside it."""
    out = Path(out)
    return out.with_name(out.name + RUN_SUFFIX)


class Checkpoints:
    """Per-stage safetensors plus `state.json` (which stages are done, mid-stage progress)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.state_path = root / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.state_path)

    def done(self, stage: str) -> bool:
        return stage in self.state.get("done", [])

    def mark_done(self, stage: str, **info: Any) -> None:
        self.state.setdefault("done", []).append(stage)
        self.state.setdefault("info", {})[stage] = info
        self.state.pop("progress", None)
        self.save_state()

    def weights(self, stage: str) -> Path:
        return self.root / f"{stage}.safetensors"

    def check_resumable(self, settings: dict[str, Any], free: frozenset[str] | set[str] = frozenset()) -> None:
        """Refuse to resume checkpoints made with other settings (`free` ones may differ),
        then record `settings` as this run's."""
        settings = json.loads(json.dumps(settings))  # as state.json holds them (tuples as lists)
        old = self.state.get("config")
        if old is not None:
            changed = sorted(k for k, v in settings.items() if k not in free and old.get(k) != v)
            if changed:
                raise ValueError(f"{self.state_path}: checkpoints were made with other settings "
                                 f"({', '.join(changed)}); use another --run-dir (or remove this one)")
        self.state["config"] = settings
        self.save_state()


def _save_progress(ck: Checkpoints, stage: str, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    save_weights(model, ck.root / f"{stage}.partial.safetensors")
    tensors = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.contiguous()
    save_file(tensors, str(ck.root / f"{stage}.optimizer.safetensors"))
    ck.state["progress"] = {"stage": stage, "step": step}
    ck.save_state()


def _load_progress(ck: Checkpoints, stage: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    prog = ck.state.get("progress") or {}
    if prog.get("stage") != stage:
        return 0
    model.load_state_dict(load_file(str(ck.root / f"{stage}.partial.safetensors")))
    saved = load_file(str(ck.root / f"{stage}.optimizer.safetensors"))
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in saved.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)
    return int(prog["step"])


def stage_steps(cap: int | None, global_cap: int | None, epochs: float, n: int, batch_size: int) -> int:
    """Steps of a stage: `epochs` over `n` rows, at most `cap` and `global_cap`."""
    steps = max(1, math.ceil(epochs * n / batch_size))
    for c in (cap, global_cap):
        if c is not None:
            steps = min(steps, c)
    return steps


def run_stage(
    stage: str,
    model: torch.nn.Module,
    steps: int,
    lr: float,
    batches: Iterator[Any],
    step_loss: Callable[[Any, torch.Tensor, random.Random], torch.Tensor],
    ck: Checkpoints,
    seed: int,
    warmup_fraction: float,
    checkpoint_every: int,
    progress: bool,
) -> dict[str, Any]:
    """AdamW with linear warm-up and decay; resumes from the stage's last checkpoint."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, int(warmup_fraction * steps))

    def factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))

    start = _load_progress(ck, stage, model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor, last_epoch=-1)
    for _ in range(start):
        sched.step()
    for _ in range(start):  # replay the data stream so that a resumed run sees the same batches
        next(batches)
    rng = random.Random(seed * 7919 + start)
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    bar = progress_bar(range(start, steps), desc=stage, unit="step", enabled=progress, initial=start, total=steps)
    for step in bar:
        x, y = next(batches)
        loss = step_loss(x, y, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_progress(ck, stage, step + 1, model, opt)
    model.eval()
    return {"steps": steps, "resumed_at": start, "seconds": round(time.perf_counter() - started, 1),
            "final_loss": float(np.mean(losses[-20:])) if losses else None}
