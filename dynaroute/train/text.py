"""`dynaroute train sst2`: DynaBERT's procedure on SST-2, then the router, into a bundle.

Stages (each checkpointed under `<out>/checkpoints/`, so that a rerun resumes where it stopped):
1. teacher: fine-tune the full model (full width and depth, every exit trained).
2. rewire: reorder heads and FFN neurons by gradient importance (the function is unchanged).
3. width: width-adaptive training, distilling the teacher's logits and hidden states.
4. depth: width and depth together, the width-adaptive model (at the same width, full depth)
   as the teacher; every exit of every sampled subnet is trained.
5. evaluate every subnet, fit the router and its calibration, write the bundle.

Batches use dynamic padding with length bucketing: SST-2 phrases are ~10 tokens, so a batch
costs what its own sentences need, not `max_length`. Word embeddings stay frozen (they are the
largest tensor; freezing them keeps CPU steps cheap and the extracted subnets' shared table valid).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from dynaroute.bundle import Bundle, save_weights, write_manifest
from dynaroute.data import read_sst2
from dynaroute.experts.bert import DynaBert, default_checkpoint
from dynaroute.progress import progress_bar
from dynaroute.text import TextEncoder
from dynaroute.train.evaluate import describe_subnets
from dynaroute.train.supernet import seed_everything

LABELS = ["negative", "positive"]
SST2_DATA_NAME = "SST-2 (GLUE)"  # the manifest's data name, under which `dynaroute eval` finds its loader
STAGES = ("teacher", "rewire", "width", "depth", "evaluate", "bundle")


@dataclass(frozen=True)
class SST2TrainConfig:
    max_length: int = 64
    max_examples: int | None = None  # supernet training examples (after the held-out slices)
    val_examples: int = 2000  # held out of train.tsv: calibration and validation
    router_examples: int = 4000  # held out of train.tsv: the router's training set
    test_examples: int | None = None  # dev.tsv rows (None: all)
    batch_size: int = 32
    epochs: float = 1.0
    teacher_epochs: float | None = None  # default: epochs
    teacher_steps: int | None = None  # caps; None: epochs over the training examples
    width_steps: int | None = None
    depth_steps: int | None = None
    lr_teacher: float = 1e-4
    lr_width: float = 5e-5
    lr_depth: float = 5e-5
    warmup_fraction: float = 0.1
    widths_per_step: int = 3  # width stage: largest, smallest, and random others
    depth_widths_per_step: int = 3  # depth stage: widths per step (largest, smallest, random), each at every depth
    distill_weight: float = 0.5  # weight of the KD term against the label term, per exit
    hidden_weight: float = 1.0  # weight of the hidden-state MSE
    importance_batches: int = 8
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "val_examples", "router_examples", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"SST2TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 4:
            raise ValueError(f"SST2TrainConfig.max_length must be >= 4, got {self.max_length}")
        if self.epochs <= 0:
            raise ValueError(f"SST2TrainConfig.epochs must be > 0, got {self.epochs}")
        for name in ("teacher_steps", "width_steps", "depth_steps", "max_examples", "test_examples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"SST2TrainConfig.{name} must be >= 1 or None, got {v}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"SST2TrainConfig.distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.widths_per_step < 1 or self.depth_widths_per_step < 1:
            raise ValueError("SST2TrainConfig.widths_per_step and depth_widths_per_step must be >= 1")


# --- data --------------------------------------------------------------------------------------

@dataclass
class TextSplit:
    texts: list[str]
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def load_sst2_splits(data: Path, cfg: SST2TrainConfig) -> dict[str, TextSplit]:
    """train.tsv shuffled once (seeded) into val / router / train slices; dev.tsv is the test split."""
    texts, y = read_sst2(data / "train.tsv")
    order = np.random.default_rng(cfg.seed).permutation(len(texts))
    n_val = min(cfg.val_examples, len(texts) // 5)
    n_router = min(cfg.router_examples, len(texts) // 5)
    pick = {
        "val": order[:n_val],
        "router": order[n_val : n_val + n_router],
        "train": order[n_val + n_router :][: cfg.max_examples],
    }
    splits = {k: TextSplit([texts[i] for i in idx], y[idx]) for k, idx in pick.items()}
    test_texts, test_y = read_sst2(data / "dev.tsv", limit=cfg.test_examples)
    splits["test"] = TextSplit(test_texts, test_y)
    return splits


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


# --- losses ------------------------------------------------------------------------------------

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
    cfg: SST2TrainConfig,
) -> torch.Tensor:
    """DynaBERT's distillation for one student subnet: its exit after kept layer k learns from
    the teacher's exit after layer k (its last exit from the teacher's last), and its hidden
    state after kept layer k matches the teacher's after layer k (the last matches the last)."""
    s_hidden, s_logits = student
    t_hidden, t_logits = teacher
    targets = [k for k in kept[:-1]] + [num_layers - 1]
    loss = torch.zeros(())
    for logits, k in zip(s_logits, targets, strict=True):
        ce = F.cross_entropy(logits, y)
        loss = loss + ((1 - cfg.distill_weight) * ce + cfg.distill_weight * _kd(logits, t_logits[k])) / len(targets)
    hid = sum(_masked_mse(h, t_hidden[k + 1], mask) for h, k in zip(s_hidden[1:], targets, strict=True))
    return loss + cfg.hidden_weight * hid / len(targets)


# --- a resumable training stage ---------------------------------------------------------------

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


def _save_progress(ck: Checkpoints, stage: str, step: int, model: DynaBert, opt: torch.optim.Optimizer) -> None:
    save_weights(model, ck.root / f"{stage}.partial.safetensors")
    tensors = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.contiguous()
    save_file(tensors, str(ck.root / f"{stage}.optimizer.safetensors"))
    ck.state["progress"] = {"stage": stage, "step": step}
    ck.save_state()


def _load_progress(ck: Checkpoints, stage: str, model: DynaBert, opt: torch.optim.Optimizer) -> int:
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


def run_stage(
    stage: str,
    model: DynaBert,
    steps: int,
    lr: float,
    batches: Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]],
    step_loss: Callable[[tuple[torch.Tensor, torch.Tensor], torch.Tensor, random.Random], torch.Tensor],
    ck: Checkpoints,
    cfg: SST2TrainConfig,
    progress: bool,
) -> dict[str, Any]:
    """AdamW with linear warm-up and decay; resumes from the stage's last checkpoint."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, int(cfg.warmup_fraction * steps))

    def factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))

    start = _load_progress(ck, stage, model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor, last_epoch=-1)
    for _ in range(start):
        sched.step()
    for _ in range(start):  # replay the data stream so that a resumed run sees the same batches
        next(batches)
    rng = random.Random(cfg.seed * 7919 + start)
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
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            _save_progress(ck, stage, step + 1, model, opt)
    model.eval()
    return {"steps": steps, "resumed_at": start, "seconds": round(time.perf_counter() - started, 1),
            "final_loss": float(np.mean(losses[-20:])) if losses else None}


# --- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def text_subnet_probs(
    model: DynaBert, split: TextSplit, encoder: TextEncoder, batch_size: int = 64, progress: bool = False
) -> dict[str, np.ndarray]:
    """Softmax outputs of every subnet on a split, length-bucketed: name -> [N, classes], and
    f"{name}@{j}" -> the output at its exit j < depth (early exit inside an expert; DynaBERT's
    shallow subnets keep other layers, so these are not the shallower subnets' outputs)."""
    model.eval()
    lengths = encoder.lengths(split.texts)
    order = sorted(range(len(split)), key=lambda i: lengths[i])
    out: dict[str, np.ndarray] = {}
    for start in progress_bar(range(0, len(order), batch_size), desc="evaluate", unit="batch", enabled=progress):
        idx = order[start : start + batch_size]
        x = encoder.encode([split.texts[i] for i in idx])
        for spec in model.subnets():
            exits = model.forward_exits(x, spec.width, depth=spec.depth)
            for j, logits in enumerate(exits, start=1):
                key = spec.name if j == len(exits) else f"{spec.name}@{j}"
                if key not in out:
                    out[key] = np.zeros((len(split), model.config.num_classes), np.float32)
                out[key][idx] = torch.softmax(logits, -1).numpy()
    return out


@torch.no_grad()
def full_accuracy(model: DynaBert, split: TextSplit, encoder: TextEncoder, batch_size: int = 64) -> float:
    """Accuracy of the full-width, full-depth model (progress reports between stages)."""
    model.eval()
    lengths = encoder.lengths(split.texts)
    order = sorted(range(len(split)), key=lambda i: lengths[i])
    correct = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        logits = model.forward_exits(encoder.encode([split.texts[i] for i in idx]), 1.0)[-1]
        correct += int((logits.argmax(-1).numpy() == split.y[idx]).sum())
    return correct / len(split)


def _accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(-1) == y).mean())


# --- the pipeline -----------------------------------------------------------------------------

def _steps(cap: int | None, global_cap: int | None, epochs: float, n: int, batch_size: int) -> int:
    steps = max(1, math.ceil(epochs * n / batch_size))
    for c in (cap, global_cap):
        if c is not None:
            steps = min(steps, c)
    return steps


# A stage's step cap may change until that stage is done (e.g. to fit a run into the time left;
# a stage resumed with another cap continues its learning-rate schedule towards the new end).
_STAGE_CAPS = {"teacher": ("teacher_steps", "teacher_epochs"), "width": ("width_steps",), "depth": ("depth_steps",)}


def _check_resumable(ck: Checkpoints, cfg: SST2TrainConfig) -> None:
    old = ck.state.get("config")
    if old is None:
        return
    done = set(ck.state.get("done", []))
    free = {"checkpoint_every"} | {k for stage, keys in _STAGE_CAPS.items() if stage not in done for k in keys}
    changed = sorted(k for k, v in asdict(cfg).items() if k not in free and old.get(k) != v)
    if changed:
        raise ValueError(f"{ck.state_path}: checkpoints were made with other settings ({', '.join(changed)}); "
                         "use another --out")


def train_sst2(
    data: str | Path,
    out: str | Path,
    cfg: SST2TrainConfig | None = None,
    base_model: str | Path | None = None,
    name: str = "sst2",
    steps_cap: int | None = None,
    progress: bool = True,
) -> Bundle:
    """Run (or resume) every stage and write the bundle to `out`."""
    cfg = cfg or SST2TrainConfig()
    data, out = Path(data), Path(out)
    base = Path(base_model) if base_model else default_checkpoint()
    ck = Checkpoints(out / "checkpoints")
    _check_resumable(ck, cfg)
    ck.state["config"] = asdict(cfg)
    ck.save_state()
    started = time.perf_counter() - float(ck.state.get("seconds", 0.0))
    seed_everything(cfg.seed)
    encoder = TextEncoder.from_file(base / "tokenizer.json", cfg.max_length)
    splits = load_sst2_splits(data, cfg)
    train = splits["train"]
    lengths = encoder.lengths(train.texts)

    model = DynaBert.from_pretrained(base)
    model.embeddings.word.weight.requires_grad_(False)
    c = model.config
    full = c.num_layers

    def stream(stage_seed: int) -> Iterator:
        return batch_stream(train, encoder, lengths, cfg.batch_size, cfg.seed * 100 + stage_seed)

    def checkpoint_time() -> None:
        ck.state["seconds"] = round(time.perf_counter() - started, 1)
        ck.save_state()

    # 1. the teacher: full model, every full-depth exit learns from the labels
    if not ck.done("teacher"):
        def teacher_loss(x, y, rng):
            logits = model.forward_exits(x, 1.0)
            return sum(F.cross_entropy(z, y) for z in logits) / len(logits)

        steps = _steps(cfg.teacher_steps, steps_cap, cfg.teacher_epochs or cfg.epochs, len(train), cfg.batch_size)
        info = run_stage("teacher", model, steps, cfg.lr_teacher, stream(1), teacher_loss, ck, cfg, progress)
        save_weights(model, ck.weights("teacher"))
        info["test_accuracy"] = full_accuracy(model, splits["test"], encoder)
        checkpoint_time()
        ck.mark_done("teacher", **info)

    # 2. rewiring by gradient importance on a few batches of the fine-tuned teacher
    if not ck.done("rewire"):
        model.load_state_dict(load_file(str(ck.weights("teacher"))))
        model.eval()  # deterministic gradients; dropout off
        model.zero_grad(set_to_none=True)
        batches = stream(2)
        for _ in range(cfg.importance_batches):
            x, y = next(batches)
            F.cross_entropy(model.forward_exits(x, 1.0)[-1], y).backward()
        head_imp, neuron_imp = model.importance_from_grads()
        model.zero_grad(set_to_none=True)
        model.rewire(head_imp, neuron_imp)
        save_weights(model, ck.weights("rewire"))
        checkpoint_time()
        ck.mark_done("rewire", head_importance=head_imp.tolist())

    # 3. width-adaptive training, the rewired teacher distilled into every width
    widths = list(c.widths)
    if not ck.done("width"):
        model.load_state_dict(load_file(str(ck.weights("rewire"))))
        teacher = copy.deepcopy(model).eval().requires_grad_(False)

        def width_loss(x, y, rng):
            with torch.no_grad():
                t = teacher.run(x, 1.0)
            chosen = sandwich_widths(widths, cfg.widths_per_step, rng)
            loss = sum(distill_loss(model.run(x, w), t, c.kept_layers(full), full, y, x[1], cfg) for w in chosen)
            return loss / len(chosen)

        steps = _steps(cfg.width_steps, steps_cap, cfg.epochs, len(train), cfg.batch_size)
        info = run_stage("width", model, steps, cfg.lr_width, stream(3), width_loss, ck, cfg, progress)
        del teacher
        save_weights(model, ck.weights("width"))
        info["test_accuracy"] = full_accuracy(model, splits["test"], encoder)
        checkpoint_time()
        ck.mark_done("width", **info)

    # 4. width and depth together, the width-adaptive model as the teacher
    if not ck.done("depth"):
        model.load_state_dict(load_file(str(ck.weights("width"))))
        teacher = copy.deepcopy(model).eval().requires_grad_(False)

        def depth_loss(x, y, rng):
            chosen = sandwich_widths(widths, cfg.depth_widths_per_step, rng)
            loss = torch.zeros(())
            for w in chosen:
                with torch.no_grad():
                    t = teacher.run(x, w)
                for d in c.depths:
                    loss = loss + distill_loss(model.run(x, w, d), t, c.kept_layers(d), full, y, x[1], cfg)
            return loss / (len(chosen) * len(c.depths))

        steps = _steps(cfg.depth_steps, steps_cap, cfg.epochs, len(train), cfg.batch_size)
        info = run_stage("depth", model, steps, cfg.lr_depth, stream(4), depth_loss, ck, cfg, progress)
        del teacher
        save_weights(model, ck.weights("depth"))
        checkpoint_time()
        ck.mark_done("depth", **info)

    model.load_state_dict(load_file(str(ck.weights("depth"))))
    model.eval()

    # 5. every subnet's outputs on the held-out splits and the test split
    eval_splits = ("router", "val", "test")
    probs_path = ck.root / "probs.safetensors"
    if not ck.done("evaluate"):
        flat = {}
        for split in eval_splits:
            for sub, p in text_subnet_probs(model, splits[split], encoder, progress=progress).items():
                flat[f"{split}/{sub}"] = p
        save_numpy(flat, str(probs_path))
        checkpoint_time()
        ck.mark_done("evaluate")
    flat = load_numpy(str(probs_path))
    probs = {s: {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(s + "/")} for s in eval_splits}
    labels = {s: splits[s].y for s in eval_splits}

    # 5b. more calibration rows: sentence-like training rows that no stage ever drew
    stage_steps = {stage: int(ck.state["info"][stage]["steps"]) for stage in ("teacher", "width", "depth")}
    unseen = unseen_sentence_rows(lengths, cfg, {**stage_steps, "rewire": cfg.importance_batches})
    splits["calib"] = TextSplit([train.texts[i] for i in unseen], train.y[unseen])
    calib_path = ck.root / "probs_calib.safetensors"
    if not ck.done("evaluate_calib"):
        save_numpy(text_subnet_probs(model, splits["calib"], encoder, progress=progress), str(calib_path))
        checkpoint_time()
        ck.mark_done("evaluate_calib", rows=len(unseen))
    probs["calib"] = load_numpy(str(calib_path))
    labels["calib"] = splits["calib"].y

    # FLOPs and latency for a sentence of the validation split's median length
    val_lengths = encoder.lengths(splits["val"].texts)
    median = int(np.argsort(val_lengths)[len(val_lengths) // 2])
    example = encoder.encode([splits["val"].texts[median]])
    subnets = describe_subnets(model, example, {k: probs[k] for k in ("val", "test")}, labels)

    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "supernet.safetensors")
    shutil.copyfile(base / "tokenizer.json", out / "tokenizer.json")
    manifest: dict[str, Any] = {
        "name": name,
        "task": {"kind": "classification", "labels": LABELS},
        "input": {"kind": "text", "tokenizer": "tokenizer.json", "max_length": cfg.max_length},
        "supernet": {
            "family": DynaBert.family,
            "config": c.to_dict(),
            "weights": "supernet.safetensors",
            "training": {**asdict(cfg), "base_model": base.name, "stages": ck.state.get("info", {})},
        },
        "subnets": subnets,
        "full_subnet": model.full_spec.name,
        "flops_example_tokens": int(example[1].sum()),
        "data": {"name": SST2_DATA_NAME, "path": str(data.resolve()),
                 "split_sizes": {k: len(v) for k, v in splits.items()}, "test": "dev.tsv"},
    }
    manifest.update(fit_text_router(model, splits, encoder, probs, labels, subnets, out, progress))
    manifest["train_seconds"] = round(time.perf_counter() - started, 1)
    write_manifest(out, manifest)
    checkpoint_time()
    return Bundle.load(out)


def fit_text_router(
    model: DynaBert,
    splits: dict[str, TextSplit],
    encoder: TextEncoder,
    probs: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    subnets: list[dict[str, Any]],
    out: Path,
    progress: bool,
) -> dict[str, Any]:
    """The text router, trained on the router slice and calibrated on the validation slice by the
    router package (generic over inputs); the test split is dev.tsv."""
    from dynaroute.router.fit import fit_router
    from dynaroute.router.text import TextRouter, TextRouterConfig
    from dynaroute.train.router import RouterTrainConfig

    torch.manual_seed(0)
    config = TextRouterConfig(model.config.vocab_size, len(subnets), model.num_paths)
    router = TextRouter(config)
    router.init_from_word_embeddings(model.embeddings.word.weight.detach())
    keys = {"train": "router", "val": "val", "test": "test"}
    inputs = {k: encoder.encode(splits[v].texts) for k, v in keys.items()}
    probs = {k: probs[v] for k, v in keys.items()} | {"calib": probs.get("calib", {})}
    labels = {k: labels[v] for k, v in keys.items()}
    val_texts = list(splits["val"].texts)
    if "calib" in splits and len(splits["calib"]):
        # the validation split, extended by the unused sentence-like training rows (calibration only)
        val_texts += splits["calib"].texts
        probs["val"] = {k: np.concatenate([v, probs["calib"][k]]) for k, v in probs["val"].items()}
        labels["val"] = np.concatenate([labels["val"], splits["calib"].y])
        inputs["val"] = encoder.encode(val_texts)
    del probs["calib"]
    rows, note = sentence_like_rows(encoder.lengths(val_texts))
    return fit_router(
        model, inputs, probs, labels, subnets, out,
        router, TextRouter.family, config.to_dict(), train_config=RouterTrainConfig(epochs=60, lr=3e-3),
        progress=progress, calibration_rows=rows, calibration_note=note, ladder_gap=NEAR_FULL_POINTS,
        thresholds={"cascade": CASCADE_BOUNDS},
    )


# train.tsv holds phrases (median ~10 tokens) cut from the treebank's sentences; what is served
# (and dev.tsv) are whole sentences (median ~25). Thresholds chosen on short phrases, which the
# small subnets answer confidently, overspend on sentences, so calibration uses the held-out
# rows of sentence length. Below MIN_CALIBRATION_ROWS such rows (tiny runs), all rows are used.
SENTENCE_TOKENS = 20
MIN_CALIBRATION_ROWS = 100
# The must-show's "no more than 0.5 points below the full model": the cascade ladder's target.
NEAR_FULL_POINTS = 0.005


# The cascade's confidence bounds: two classes put every max softmax in [0.5, 1], where the
# default 0.05 steps are too coarse to place an operating point; 0.01 steps, plus the tail.
CASCADE_BOUNDS = np.unique(np.concatenate([np.linspace(0.0, 1.0, 21), np.linspace(0.5, 0.99, 50),
                                           1.0 - np.logspace(-6, -1, 21)]))

# At most this many unused training rows join the calibration rows (evaluating every subnet and
# exit on them costs about a minute per thousand sentences on one CPU thread).
MAX_EXTRA_CALIBRATION_ROWS = 3000


def unseen_sentence_rows(lengths: list[int], cfg: SST2TrainConfig, steps: dict[str, int]) -> np.ndarray:
    """Indices of sentence-like training rows that no stage drew: each stage's batch stream
    (see `batch_stream`) is replayed for the steps it ran. They are as held-out as the
    validation split (neither was trained on), and look like what is served."""
    seeds = {"teacher": 1, "rewire": 2, "width": 3, "depth": 4}
    seen: set[int] = set()
    for stage, n in steps.items():
        seed = cfg.seed * 100 + seeds[stage]
        epoch = 0
        while n > 0:
            batches = length_batches(lengths, cfg.batch_size, random.Random(seed * 1000 + epoch))
            for b in batches[:n]:
                seen.update(b)
            n -= len(batches)
            epoch += 1
    lengths_np = np.asarray(lengths)
    rows = [i for i in range(len(lengths)) if i not in seen and lengths_np[i] >= SENTENCE_TOKENS]
    return np.asarray(rows[:MAX_EXTRA_CALIBRATION_ROWS], dtype=np.int64)


def sentence_like_rows(lengths: list[int]) -> tuple[np.ndarray, str]:
    """Indices of the validation rows to calibrate on, and a note for the manifest."""
    lengths_np = np.asarray(lengths)
    rows = np.flatnonzero(lengths_np >= SENTENCE_TOKENS)
    if len(rows) < MIN_CALIBRATION_ROWS:
        return np.arange(len(lengths_np)), f"all validation rows (fewer than {MIN_CALIBRATION_ROWS} of " \
            f">= {SENTENCE_TOKENS} tokens)"
    return rows, (f"validation rows and unused training rows of >= {SENTENCE_TOKENS} tokens (sentence-like; "
                  "train.tsv phrases are shorter)")


def config_from_args(args: argparse.Namespace) -> SST2TrainConfig:
    cfg = SST2TrainConfig(max_length=args.max_length, max_examples=args.max_examples, seed=args.seed)
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["epochs"] = float(args.epochs)
    for key in ("teacher_epochs", "teacher_steps", "width_steps", "depth_steps", "val_examples", "router_examples",
                "test_examples", "batch_size"):
        v = getattr(args, key, None)
        if v is not None:
            overrides[key] = v
    return replace(cfg, **overrides)


def main_sst2(args: argparse.Namespace) -> int:
    if not args.data:
        raise SystemExit("dynaroute train sst2 needs --data PATH (a folder with train.tsv and dev.tsv)")
    torch.set_num_threads(max(1, int(getattr(args, "threads", None) or torch.get_num_threads())))
    bundle = train_sst2(
        args.data, args.out, config_from_args(args), base_model=args.base_model, name=args.name or "sst2",
        steps_cap=args.steps,
    )
    full = bundle.subnet_info(bundle.full_subnet)
    print(f"wrote bundle {bundle.name!r} to {args.out} in {bundle.manifest['train_seconds']} s; "
          f"full model test accuracy {full['test_accuracy']:.4f}")
    return 0


# --- `dynaroute eval` on SST-2 bundles -------------------------------------------------------

def sst2_eval_data(bundle: Bundle, data_path: Path | None = None) -> dict[str, Any]:
    """The bundle's validation slice of train.tsv and its test split (dev.tsv), rebuilt from the
    training settings in the manifest, read from `data_path` (`dynaroute eval --data`) or else
    the folder the manifest records. Subnet outputs include every early exit (DynaBERT's
    shallower subnets keep other layers, so they are not its exits)."""
    from dynaroute.errors import BundleError

    recorded = bundle.manifest.get("data", {}).get("path")
    folder = data_path or (Path(recorded) if recorded else None)
    if folder is None or not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
        raise BundleError(f"evaluating SST-2 bundle {bundle.name!r} needs the SST-2 folder (train.tsv and dev.tsv); "
                          f"{'got ' + repr(str(folder)) if folder else 'the manifest records none'}: "
                          "pass --data PATH")
    training = bundle.manifest["supernet"]["training"]
    known = {f for f in SST2TrainConfig.__dataclass_fields__}
    cfg = SST2TrainConfig(**{k: v for k, v in training.items() if k in known})
    splits = load_sst2_splits(folder, cfg)
    encoder = TextEncoder.from_bundle(bundle)

    def probs(model: DynaBert, split: str) -> dict[str, np.ndarray]:
        return text_subnet_probs(model, splits[split], encoder)

    return {
        **{k: (encoder.encode(splits[k].texts), splits[k].y) for k in ("val", "test")},
        "subnet_probs": probs,
    }


def _register_eval() -> None:
    from dynaroute.train.report import register_eval_data

    register_eval_data(SST2_DATA_NAME, sst2_eval_data)


_register_eval()
