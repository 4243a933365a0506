"""The text pipeline: DynaBERT's procedure on any text classification data, then the router,
into a bundle.

Stages (each checkpointed in the run folder, so that a rerun resumes where it stopped):
1. teacher: fine-tune the full model (full width and depth, every exit trained).
2. rewire: reorder heads and FFN neurons by gradient importance (the function is unchanged).
3. width: width-adaptive training, distilling the teacher's logits and hidden states.
4. depth: width and depth together, the width-adaptive model (at the same width, full depth)
   as the teacher; every exit of every sampled subnet is trained.
5. evaluate every subnet, fit the router and its calibration, write the bundle.

The base model is any local BERT-architecture folder (config.json, *.safetensors,
tokenizer.json); the exits get as many classes as the data has. Word embeddings stay frozen
(they are the largest tensor; freezing them keeps CPU steps cheap and the extracted subnets'
shared table valid). Recipes (dynaroute/training/sst2.py, the files of `dynaroute train --data`)
give the splits; this module never reads a file of data.
"""

from __future__ import annotations

import copy
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

from dynaroute.bundle import Bundle, save_weights, write_manifest
from dynaroute.errors import DataError
from dynaroute.experts.bert import DynaBert, default_checkpoint
from dynaroute.text import TextEncoder
from dynaroute.training.distill import distill_loss, sandwich_widths
from dynaroute.training.evaluate import describe_subnets, full_accuracy, text_subnet_probs
from dynaroute.training.stages import Checkpoints, run_dir_for, run_stage, stage_steps
from dynaroute.training.supernet import seed_everything
from dynaroute.training.textdata import TextSplit, batch_stream, length_batches


@dataclass(frozen=True)
class TextTrainConfig:
    max_length: int = 64
    max_examples: int | None = None  # supernet training examples (after the held-out slices)
    val_examples: int = 2000  # SST-2 recipe: rows of train.tsv held out for calibration and validation
    router_examples: int = 4000  # held out of the training rows: the router's training set
    test_examples: int | None = None  # SST-2 recipe: dev.tsv rows (None: all)
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
                raise ValueError(f"TextTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 4:
            raise ValueError(f"TextTrainConfig.max_length must be >= 4, got {self.max_length}")
        if self.epochs <= 0:
            raise ValueError(f"TextTrainConfig.epochs must be > 0, got {self.epochs}")
        for name in ("teacher_steps", "width_steps", "depth_steps", "max_examples", "test_examples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"TextTrainConfig.{name} must be >= 1 or None, got {v}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"TextTrainConfig.distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.widths_per_step < 1 or self.depth_widths_per_step < 1:
            raise ValueError("TextTrainConfig.widths_per_step and depth_widths_per_step must be >= 1")


# Each stage's data stream has its own seed, derived from the run's: one place, read by the
# stages and by `unseen_sentence_rows`, which replays their streams.
STAGE_SEEDS = {"teacher": 1, "rewire": 2, "width": 3, "depth": 4}


def stage_seed(cfg: TextTrainConfig, stage: str) -> int:
    return cfg.seed * 100 + STAGE_SEEDS[stage]


# A stage's step cap may change until that stage is done (e.g. to fit a run into the time left;
# a stage resumed with another cap continues its learning-rate schedule towards the new end).
_STAGE_CAPS = {"teacher": ("teacher_steps", "teacher_epochs"), "width": ("width_steps",), "depth": ("depth_steps",)}


def check_base_model(base: Path) -> None:
    """Refuse a base model folder that is not a local BERT checkpoint, saying what it lacks."""
    if not base.is_dir():
        raise DataError("no such base model folder; expected a BERT checkpoint folder with config.json, "
                        "*.safetensors and tokenizer.json", file=str(base))
    needed = [n for n in ("config.json", "tokenizer.json") if not (base / n).is_file()]
    if not any(base.glob("*.safetensors")):
        needed.append("*.safetensors")
    if needed:
        raise DataError(f"base model folder lacks {needed}; expected a BERT checkpoint folder with config.json, "
                        "*.safetensors and tokenizer.json", file=str(base))


def train_text(
    splits: dict[str, TextSplit],
    labels: Sequence[str],
    out: str | Path,
    cfg: TextTrainConfig | None = None,
    base_model: str | Path | None = None,
    name: str = "text",
    data: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    steps_cap: int | None = None,
    sentence_calibration: bool = False,
    progress: bool = True,
) -> Bundle:
    """Run (or resume) every stage and write the bundle to `out`, checkpoints to `run_dir`
    (default `<out>.run`).

    splits: "train" (the supernet's), "router" (the router's), "val" (calibration) and "test",
    class indices into `labels`. data: the manifest's record of where they came from.
    sentence_calibration: SST-2's phrases-versus-sentences correction (see `sentence_like_rows`).
    """
    cfg = cfg or TextTrainConfig()
    out = Path(out)
    base = Path(base_model) if base_model else default_checkpoint()
    check_base_model(base)
    ck = Checkpoints(Path(run_dir) if run_dir else run_dir_for(out))
    done = set(ck.state.get("done", []))
    ck.check_resumable(asdict(cfg), {"checkpoint_every"} | {k for st, keys in _STAGE_CAPS.items() if st not in done
                                                    for k in keys})
    started = time.perf_counter() - float(ck.state.get("seconds", 0.0))
    seed_everything(cfg.seed)
    encoder = TextEncoder.from_file(base / "tokenizer.json", cfg.max_length)
    splits = dict(splits)
    train = splits["train"]
    lengths = encoder.lengths(train.texts)

    model = DynaBert.from_pretrained(base, num_classes=len(labels))
    model.embeddings.word.weight.requires_grad_(False)
    c = model.config
    full = c.num_layers

    def stream(stage_name: str) -> Iterator:
        return batch_stream(train, encoder, lengths, cfg.batch_size, stage_seed(cfg, stage_name))

    def stage(stage_name: str, steps: int, lr: float, batches: Iterator, loss: Any) -> dict[str, Any]:
        return run_stage(stage_name, model, steps, lr, batches, loss, ck, cfg.seed, cfg.warmup_fraction,
                         cfg.checkpoint_every, progress)

    def checkpoint_time() -> None:
        ck.state["seconds"] = round(time.perf_counter() - started, 1)
        ck.save_state()

    # 1. the teacher: full model, every full-depth exit learns from the labels
    if not ck.done("teacher"):
        def teacher_loss(x, y, rng):
            logits = model.forward_exits(x, 1.0)
            return sum(F.cross_entropy(z, y) for z in logits) / len(logits)

        steps = stage_steps(cfg.teacher_steps, steps_cap, cfg.teacher_epochs or cfg.epochs, len(train), cfg.batch_size)
        info = stage("teacher", steps, cfg.lr_teacher, stream("teacher"), teacher_loss)
        save_weights(model, ck.weights("teacher"))
        info["test_accuracy"] = full_accuracy(model, splits["test"], encoder)
        checkpoint_time()
        ck.mark_done("teacher", **info)

    # 2. rewiring by gradient importance on a few batches of the fine-tuned teacher
    if not ck.done("rewire"):
        model.load_state_dict(load_file(str(ck.weights("teacher"))))
        model.eval()  # deterministic gradients; dropout off
        model.zero_grad(set_to_none=True)
        batches = stream("rewire")
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
            loss = sum(distill_loss(model.run(x, w), t, c.kept_layers(full), full, y, x[1], cfg.distill_weight,
                                      cfg.hidden_weight) for w in chosen)
            return loss / len(chosen)

        steps = stage_steps(cfg.width_steps, steps_cap, cfg.epochs, len(train), cfg.batch_size)
        info = stage("width", steps, cfg.lr_width, stream("width"), width_loss)
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
                    student = model.run(x, w, d)
                    loss = loss + distill_loss(student, t, c.kept_layers(d), full, y, x[1], cfg.distill_weight,
                                               cfg.hidden_weight)
            return loss / (len(chosen) * len(c.depths))

        steps = stage_steps(cfg.depth_steps, steps_cap, cfg.epochs, len(train), cfg.batch_size)
        info = stage("depth", steps, cfg.lr_depth, stream("depth"), depth_loss)
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
    truth = {s: splits[s].y for s in eval_splits}

    # 5b. more calibration rows: sentence-like training rows that no stage ever drew
    if sentence_calibration:
        ran = {stage: int(ck.state["info"][stage]["steps"]) for stage in ("teacher", "width", "depth")}
        unseen = unseen_sentence_rows(lengths, cfg, {**ran, "rewire": cfg.importance_batches})
        splits["calib"] = TextSplit([train.texts[i] for i in unseen], train.y[unseen])
        calib_path = ck.root / "probs_calib.safetensors"
        if not ck.done("evaluate_calib"):
            save_numpy(text_subnet_probs(model, splits["calib"], encoder, progress=progress), str(calib_path))
            checkpoint_time()
            ck.mark_done("evaluate_calib", rows=len(unseen))
        probs["calib"] = load_numpy(str(calib_path))
        truth["calib"] = splits["calib"].y

    # FLOPs and latency for a sentence of the validation split's median length
    val_lengths = encoder.lengths(splits["val"].texts)
    median = int(np.argsort(val_lengths)[len(val_lengths) // 2])
    example = encoder.encode([splits["val"].texts[median]])
    subnets = describe_subnets(model, example, {k: probs[k] for k in ("val", "test")}, truth)

    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "supernet.safetensors")
    shutil.copyfile(base / "tokenizer.json", out / "tokenizer.json")
    manifest: dict[str, Any] = {
        "name": name,
        "task": {"kind": "classification", "labels": list(labels)},
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
        "data": {**(data or {}), "split_sizes": {k: len(v) for k, v in splits.items()}},
    }
    manifest.update(fit_text_router(model, splits, encoder, probs, truth, subnets, out, progress, sentence_calibration))
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
    sentence_calibration: bool = False,
) -> dict[str, Any]:
    """The text router, trained on the router slice and calibrated on the validation slice by the
    router package (generic over inputs)."""
    from dynaroute.router.fit import fit_router
    from dynaroute.router.text import TextRouter, TextRouterConfig
    from dynaroute.training.router import RouterTrainConfig

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
    if sentence_calibration:
        rows, note = sentence_like_rows(encoder.lengths(val_texts))
    else:
        rows, note = np.arange(len(val_texts)), "all validation rows"
    return fit_router(
        model, inputs, probs, labels, subnets, out,
        router, TextRouter.family, config.to_dict(), train_config=RouterTrainConfig(epochs=60, lr=3e-3),
        progress=progress, calibration_rows=rows, calibration_note=note, ladder_gap=NEAR_FULL_POINTS,
        thresholds={"cascade": CASCADE_BOUNDS}, cascade_start_thresholds=CASCADE_START_THRESHOLDS,
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

# The cascade's start thresholds searched with its ladder: 0 starts every sentence at the first
# rung; 0.5 lets the router skip it for sentences it expects the first rung to fail. A mean-pooled
# bag of words tells little of which sentences those are, so where it misjudges, starting every
# row at the bottom and escalating on the rung's own confidence is cheaper.
CASCADE_START_THRESHOLDS = [0.0, 0.5]

# At most this many unused training rows join the calibration rows (evaluating every subnet and
# exit on them costs about a minute per thousand sentences on one CPU thread).
MAX_EXTRA_CALIBRATION_ROWS = 3000


def unseen_sentence_rows(lengths: list[int], cfg: TextTrainConfig, steps: dict[str, int]) -> np.ndarray:
    """Indices of sentence-like training rows that no stage drew: each stage's batch stream
    (see `batch_stream`) is replayed for the steps it ran. They are as held-out as the
    validation split (neither was trained on), and look like what is served."""
    seen: set[int] = set()
    for stage, n in steps.items():
        seed = stage_seed(cfg, stage)
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
