"""Wire-level input checks shared by the native and KServe servicers.

Each servicer decodes its own wire format into numpy arrays or strings, then checks them here
against the model's input spec, so that both APIs reject the same mistakes with messages that
name the request field and say what was expected. The engine checks again (its own callers
are not all servicers); the messages here are the ones that name the wire field.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynaroute.errors import InvalidInputError, TooLargeError, shown

# dtypes a tensor may be sent as (numpy names); anything else is not understood on the wire.
WIRE_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
MAX_DIMS = 64  # numpy's own limit on an array's dimensions


@dataclass(frozen=True)
class InputSpec:
    """The model's input: a tensor of `dtype` and `shape` (one example), or text."""

    kind: str
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    max_length: int = 0
    value_range: tuple[float, float] | None = None  # the training inputs' [min, max], when the bundle has it

    @classmethod
    def from_model_info(cls, info: dict[str, Any]) -> InputSpec:
        spec = info["input"]
        if spec.get("kind") == "text":
            return cls("text", dtype="string", max_length=int(spec.get("max_length", 0)))
        value_range = spec.get("value_range")
        return cls(
            "tensor", dtype=str(spec["dtype"]), shape=tuple(int(d) for d in spec["shape"]),
            value_range=None if value_range is None else (float(value_range[0]), float(value_range[1])),
        )

    @property
    def is_text(self) -> bool:
        return self.kind == "text"


def decode_raw(field: str, dtype: str, shape: list[int], data: bytes) -> np.ndarray:
    """Raw little-endian row-major bytes -> array, after checking the dtype name and length."""
    if dtype not in WIRE_DTYPES:
        raise InvalidInputError(
            f"{field}.dtype: {shown(dtype)} is not understood; expected one of {list(WIRE_DTYPES)}"
        )
    if len(shape) > MAX_DIMS:  # checked first: the byte count below multiplies every dimension
        raise InvalidInputError(
            f"{field}.shape: {len(shape)} dimensions ({shown(list(shape))}); numpy holds at most {MAX_DIMS}"
        )
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"{field}.shape: {shown(list(shape))} has a negative dimension")
    wire = np.dtype(dtype).newbyteorder("<")
    need = math.prod(shape) * wire.itemsize
    if len(data) != need:
        raise InvalidInputError(
            f"{field}.data: {len(data)} bytes, but dtype {dtype} and shape {shown(list(shape))} need {need} bytes"
        )
    try:
        return np.frombuffer(data, dtype=wire).astype(dtype).reshape(shape)  # a writable copy, native order
    except ValueError as e:  # more dimensions than numpy holds, or a size past its index range
        raise InvalidInputError(f"{field}.shape: {shown(list(shape))} is not an array numpy can build ({e})") from None


def check_example(field: str, x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """One example: the model's dtype and shape, finite values. Returns it unchanged."""
    if str(x.dtype) != spec.dtype:
        raise InvalidInputError(f"{field}.dtype: got {x.dtype}, expected {spec.dtype}")
    if tuple(x.shape) != spec.shape:
        raise InvalidInputError(
            f"{field}.shape: got {shown(list(x.shape))}, expected {list(spec.shape)} (one example)"
        )
    check_values(field, x, spec.value_range)
    return x


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


def check_text(field: str, text: str) -> str:
    """One sentence: non-empty after stripping whitespace."""
    if not text.strip():
        raise InvalidInputError(f"{field}: empty; expected a non-empty sentence")
    return text


def check_size(field: str, size: int, limit: int) -> None:
    """The servicers' own message size limit, checked before decoding anything."""
    if size > limit:
        raise TooLargeError(f"{field}: {size} bytes exceeds the server's limit of {limit} bytes")


def decode_bytes_elements(field: str, raw: bytes, count: int) -> list[bytes]:
    """KServe v2 BYTES raw contents: each element is a 4-byte little-endian length, then its bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidInputError(f"{field}: truncated BYTES length prefix at offset {pos}")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise InvalidInputError(f"{field}: BYTES element at offset {pos} claims {n} bytes, past the end")
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if len(out) != count:
        raise InvalidInputError(f"{field}: holds {len(out)} BYTES elements, but the shape needs {count}")
    return out
