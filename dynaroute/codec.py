"""Input codecs: one per input kind, so that nothing else asks which kind a model takes.

A bundle's manifest describes its input (`InputSpec`): a tensor (dtype, shape), tabular
features (a float32 vector of raw values, standardised with the training set's statistics)
or text (a tokenizer and a maximum length). Its codec (`codec_for`) is what the gateway,
evaluation and training use to

- `check` one example as it arrives on the wire (exact dtype and shape, finite values, in
  range; a non-empty sentence), with messages naming the request field;
- `validate` one example from the engine's in-process API (a little more lenient: a numeric
  dtype is cast, a batch of one is one example);
- `encode` a list of examples into the model's batch, and the per-example rows sent to the
  experts (tabular: standardised; text: tokenised);
- `stack` such rows back into one batch (text: padded to the longest);
- `groups`: how to split the rows of one expert call into batches that each run whole (text:
  by length, so that short sentences are not padded to a long one's length);
- say whether encoding runs in a thread (`in_thread`: tokenising does; a tensor's checks cost
  less than the hop would).

Tabular manifests: `{"kind": "tabular", "dtype": "float32", "shape": [F], "features": [F
names], "mean": [F], "std": [F], "value_range": [min, max]}` (value_range optional, on the raw
values). Clients send raw feature values; `Standardizer` applies (x - mean) / std (a std of 0
counts as 1) before the router and the experts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dynaroute.errors import BundleError, InvalidInputError, shown

if TYPE_CHECKING:
    from dynaroute.text import TextEncoder

KINDS = ("tensor", "tabular", "text")


@dataclass(frozen=True)
class InputSpec:
    """The model's input, as the manifest's `input` (and `GetModel`) describe it."""

    kind: str
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    max_length: int = 0  # text
    tokenizer: str = ""  # text: the tokenizer file, relative to the bundle
    value_range: tuple[float, float] | None = None  # the training inputs' raw [min, max], when recorded
    features: tuple[str, ...] = ()  # tabular: the column names, in order
    mean: tuple[float, ...] = ()  # tabular: per-feature training mean
    std: tuple[float, ...] = ()  # tabular: per-feature training standard deviation

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"input.kind: {self.kind!r} is not an input kind; expected one of {list(KINDS)}")
        if self.kind == "text":
            if self.max_length < 2:
                raise ValueError(f"input.max_length: {self.max_length}; a text input needs >= 2")
            return
        try:
            np.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"input.dtype: {self.dtype!r} is not a numpy dtype") from None
        if not self.shape or any(d < 1 for d in self.shape):
            raise ValueError(f"input.shape: {list(self.shape)}; expected one or more dimensions >= 1")
        if self.value_range is not None and not self.value_range[0] <= self.value_range[1]:
            raise ValueError(f"input.value_range: {list(self.value_range)}; expected [min, max] with min <= max")
        if self.kind == "tabular":
            if self.dtype != "float32" or len(self.shape) != 1:
                raise ValueError(f"input: a tabular input is float32 of shape [F]; got {self.dtype} {list(self.shape)}")
            (f,) = self.shape
            for name in ("features", "mean", "std"):
                if len(getattr(self, name)) != f:
                    raise ValueError(f"input.{name}: {len(getattr(self, name))} entries for {f} features")
            if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or min(self.std) < 0:
                raise ValueError("input.mean / input.std: expected finite values and std >= 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        """The manifest's `input` object; a malformed one is a BundleError naming the field."""
        try:
            kind = d.get("kind", "tensor")  # bundles written before kinds were named are tensors
            if kind == "text":
                return cls("text", dtype="string", max_length=int(d["max_length"]),
                           tokenizer=str(d.get("tokenizer", "")))
            value_range = d.get("value_range")
            return cls(
                kind, dtype=str(d["dtype"]), shape=tuple(int(v) for v in d["shape"]),
                value_range=None if value_range is None else (float(value_range[0]), float(value_range[1])),
                features=tuple(str(v) for v in d.get("features", ())),
                mean=tuple(float(v) for v in d.get("mean", ())), std=tuple(float(v) for v in d.get("std", ())),
            )
        except KeyError as e:
            raise BundleError(f"input: missing {e.args[0]!r} for a {d.get('kind', 'tensor')} input") from None
        except (TypeError, ValueError) as e:
            raise BundleError(f"input: {e}") from None

    @property
    def wire(self) -> str:
        """What a request carries: "text" (a string) or "tensor" (an array; tabular too)."""
        return "text" if self.kind == "text" else "tensor"

    def files(self) -> list[str]:
        """The bundle files this input needs (the tokenizer of a text model)."""
        return [self.tokenizer] if self.kind == "text" and self.tokenizer else []

    def describe(self) -> str:
        """What the model takes, for error messages."""
        if self.kind == "text":
            return "text"
        what = f"a tensor of dtype {self.dtype} and shape {list(self.shape)}"
        return what + (f" (raw values of {', '.join(self.features)})" if self.kind == "tabular" else "")


class Standardizer:
    """Per-feature (x - mean) / std, with a std of 0 (a constant feature) counted as 1. What the
    gateway applies to a tabular model's raw inputs, and training and evaluation to their rows."""

    def __init__(self, mean: Sequence[float] | np.ndarray, std: Sequence[float] | np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float32)
        std = np.asarray(std, dtype=np.float32)
        if self.mean.shape != std.shape or self.mean.ndim != 1:
            raise ValueError(f"mean and std must be vectors of one length; got {self.mean.shape} and {std.shape}")
        self.std = std
        self._scale = np.where(std > 0, std, np.float32(1.0)).astype(np.float32)

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        """The statistics of the training rows `x` [N, F] (population std)."""
        x = np.asarray(x, dtype=np.float64)
        return cls(x.mean(axis=0), x.std(axis=0))

    @classmethod
    def from_spec(cls, spec: InputSpec) -> Standardizer:
        return cls(spec.mean, spec.std)

    def to_dict(self) -> dict[str, list[float]]:
        """The manifest's `mean` and `std`."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [..., F] raw -> float32 standardised (a new array)."""
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self._scale).astype(np.float32, copy=False)


def accepted_range(value_range: tuple[float, float]) -> tuple[float, float]:
    """The values a tensor model accepts: its training range widened by the range's own span on
    each side. Far enough out for inputs a little unlike the training data; close enough that
    a value which overflows float32 inside the network (1e30: NaN logits) is refused."""
    lo, hi = value_range
    span = max(hi - lo, abs(hi), abs(lo), 1.0)
    return lo - span, hi + span


def check_values(field: str, x: np.ndarray, value_range: tuple[float, float] | None) -> None:
    """Finite values, within the accepted range when the bundle knows its training range."""
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InvalidInputError(f"{field}: contains NaN or Inf; expected finite values")
    if value_range is not None and x.size:
        lo, hi = accepted_range(value_range)
        low, high = float(x.min()), float(x.max())
        if low < lo or high > hi:
            raise InvalidInputError(
                f"{field}: values from {low:g} to {high:g}, outside [{lo:g}, {hi:g}] (the training inputs "
                f"spanned [{value_range[0]:g}, {value_range[1]:g}]); expected values in that range"
            )


@dataclass(frozen=True)
class Encoded:
    """A list of examples encoded: the model's `batch`, and each example's `rows` entry for the experts."""

    batch: Any
    rows: list[Any]


class InputCodec(ABC):
    """Validation and encoding for one input kind (see the module docstring)."""

    kind: ClassVar[str]
    # Whether `encode` runs in a worker thread, off the event loop (tokenising: yes).
    in_thread: ClassVar[bool] = False

    def __init__(self, spec: InputSpec):
        if spec.kind != self.kind:
            raise ValueError(f"{type(self).__name__} encodes {self.kind} inputs, not {spec.kind}")
        self.spec = spec

    @abstractmethod
    def check(self, field: str, value: Any) -> Any:
        """One example as decoded from the wire (array or str), checked exactly; returned as is."""

    @abstractmethod
    def validate(self, tensor: Any, text: Any, model: str) -> Any:
        """One example of an engine request (exactly one of `tensor` / `text` set), checked."""

    @abstractmethod
    def encode(self, examples: Sequence[Any]) -> Encoded:
        """Checked examples -> the model's batch and one row per example for the experts."""

    @abstractmethod
    def stack(self, rows: Sequence[Any]) -> Any:
        """Rows from `encode` (of any batches) -> one batch the model takes."""

    def groups(self, rows: Sequence[Any]) -> list[list[int]]:
        """The rows of one expert call split into batches (lists of row indices, every row in one):
        a fixed-shape input runs as one batch."""
        return [list(range(len(rows)))]


class TensorCodec(InputCodec):
    """A tensor of fixed dtype and shape, given to the model as it is sent."""

    kind = "tensor"

    def __init__(self, spec: InputSpec):
        super().__init__(spec)
        self.dtype = np.dtype(spec.dtype)

    def check(self, field: str, value: Any) -> np.ndarray:
        x = value
        if str(x.dtype) != self.spec.dtype:
            raise InvalidInputError(f"{field}.dtype: got {x.dtype}, expected {self.spec.dtype}")
        if tuple(x.shape) != self.spec.shape:
            raise InvalidInputError(
                f"{field}.shape: got {shown(list(x.shape))}, expected {list(self.spec.shape)} (one example)"
            )
        check_values(field, x, self.spec.value_range)
        return x

    def validate(self, tensor: Any, text: Any, model: str) -> np.ndarray:
        shape, dtype = self.spec.shape, self.dtype
        if text is not None:
            raise InvalidInputError(f"model {model!r} takes {self.spec.describe()}; got text")
        if tensor is None:
            raise InvalidInputError(f"tensor is required: {dtype.name} of shape {list(shape)}")
        x = np.asarray(tensor)
        if x.size == 0:
            raise InvalidInputError(f"tensor is empty; expected shape {list(shape)}")
        if x.shape != shape:
            if x.shape[1:] == shape and x.shape[0] == 1:  # a batch of one is one example
                x = x[0]
            else:
                raise InvalidInputError(f"tensor has shape {list(x.shape)}; expected {list(shape)}")
        if x.dtype != dtype:
            if x.dtype.kind not in "biuf":
                raise InvalidInputError(f"tensor has dtype {x.dtype.name}; expected {dtype.name}")
            x = x.astype(dtype)
        check_values("tensor", x, self.spec.value_range)
        return x

    def encode(self, examples: Sequence[Any]) -> Encoded:
        rows = list(examples)
        return Encoded(self.stack(rows), rows)

    def stack(self, rows: Sequence[Any]) -> np.ndarray:
        # One row (concurrency 1) is a view, not a copy.
        return rows[0][None] if len(rows) == 1 else np.stack(rows)


class TabularCodec(TensorCodec):
    """Raw feature values [F] in (checked against the raw value range); standardised rows out."""

    kind = "tabular"

    def __init__(self, spec: InputSpec):
        super().__init__(spec)
        self.standardize = Standardizer.from_spec(spec)

    def encode(self, examples: Sequence[Any]) -> Encoded:
        batch = self.standardize(np.stack(examples) if len(examples) > 1 else examples[0][None])
        return Encoded(batch, list(batch))


class TextCodec(InputCodec):
    """A sentence in; (ids, mask) int64 out, tokenised with the bundle's tokenizer."""

    kind = "text"
    in_thread = True

    def __init__(self, spec: InputSpec, encoder: TextEncoder | None = None):
        super().__init__(spec)
        self.encoder = encoder  # None: a codec that checks but cannot encode (the servicers')

    def check(self, field: str, value: Any) -> str:
        if not value.strip():
            raise InvalidInputError(f"{field}: empty; expected a non-empty sentence")
        return value

    def validate(self, tensor: Any, text: Any, model: str) -> str:
        if tensor is not None:
            raise InvalidInputError(f"model {model!r} takes text; got a tensor")
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("text must be a non-empty string")
        return text

    def encode(self, examples: Sequence[Any]) -> Encoded:
        if self.encoder is None:
            raise RuntimeError("this text codec was built without its tokenizer (codec_for(spec, root))")
        ids, mask = self.encoder.encode(list(examples))
        ids_np, mask_np = ids.numpy(), mask.numpy()
        # Each row without the batch's padding (the tokenizer pads on the right): the experts'
        # batch is then padded to its own longest row, not to the router batch's.
        lengths = mask_np.sum(1).tolist()
        rows = [(ids_np[i, :n], mask_np[i, :n]) for i, n in enumerate(lengths)]
        return Encoded((ids, mask), rows)

    def stack(self, rows: Sequence[Any]) -> tuple[np.ndarray, ...]:
        """(ids, mask) rows padded to the longest: ids with the tokenizer's pad id (0 without
        one), the mask with zeros; so that the rows of one `encode` restack to its batch."""
        width = max(r[0].shape[-1] for r in rows)
        parts = []
        for k, pad in enumerate((0 if self.encoder is None else self.encoder.pad_id, 0)):  # ids, mask
            out = np.full((len(rows), width), pad, dtype=rows[0][k].dtype)
            for i, r in enumerate(rows):
                out[i, : r[k].shape[-1]] = r[k]
            parts.append(out)
        return tuple(parts)

    def groups(self, rows: Sequence[Any]) -> list[list[int]]:
        """Rows sorted by length and cut where padding all to the longer one's length would cost
        more than a batch of its own (`length_groups`): an encoder's cost grows with the padded
        length, and SST-2's sentences run from 5 to 48 tokens."""
        return length_groups([r[0].shape[-1] for r in rows], GROUP_COST_TOKENS)


# What one more expert batch costs, in padded token positions: the work of a subnet pass that does
# not shrink with the batch (torch op calls, reading the weights). Measured on one CPU thread for
# the SST-2 MiniLM: a one-row pass costs what 25 (width 0.25, 3 layers) to 40 (the full model)
# token positions of a batch of 32 do; 64 leaves room, since a split that does not pay loses.
GROUP_COST_TOKENS = 64


def length_groups(lengths: Sequence[int], group_cost: float) -> list[list[int]]:
    """Indices of rows grouped by length, minimising the padded positions run (each group padded
    to its longest row) plus `group_cost` per group: an exact split of the rows sorted by length
    (dynamic programming over cut points; n is an expert batch, at most a few dozen rows)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_len = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: the cost of the j shortest rows
    cut = [0] * (n + 1)  # where the last group of the j shortest rows starts
    for j in range(1, n + 1):
        longest = sorted_len[j - 1]
        for i in range(j):
            cost = best[i] + (j - i) * longest + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


CODECS: dict[str, type[InputCodec]] = {c.kind: c for c in (TensorCodec, TabularCodec, TextCodec)}


def codec_for(spec: InputSpec | Mapping[str, Any], root: str | Path | None = None) -> InputCodec:
    """The codec of an input spec (or the manifest's `input` dict). `root`, the bundle directory,
    is where a text model's tokenizer is read from; without it a text codec checks but cannot encode."""
    if not isinstance(spec, InputSpec):
        spec = InputSpec.from_dict(spec)
    if spec.kind == "text":
        encoder = None
        if root is not None:
            from dynaroute.text import TextEncoder  # tokenizers: only for text models

            encoder = TextEncoder.from_file(Path(root) / spec.tokenizer, spec.max_length)
        return TextCodec(spec, encoder)
    return CODECS[spec.kind](spec)
