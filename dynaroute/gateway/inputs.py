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

from dynaroute.errors import InvalidInputError

# dtypes a tensor may be sent as (numpy names); anything else is not understood on the wire.
WIRE_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


@dataclass(frozen=True)
class InputSpec:
    """The model's input: a tensor of `dtype` and `shape` (one example), or text."""

    kind: str
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    max_length: int = 0

    @classmethod
    def from_model_info(cls, info: dict[str, Any]) -> InputSpec:
        spec = info["input"]
        if spec.get("kind") == "text":
            return cls("text", dtype="string", max_length=int(spec.get("max_length", 0)))
        return cls("tensor", dtype=str(spec["dtype"]), shape=tuple(int(d) for d in spec["shape"]))

    @property
    def is_text(self) -> bool:
        return self.kind == "text"


def decode_raw(field: str, dtype: str, shape: list[int], data: bytes) -> np.ndarray:
    """Raw little-endian row-major bytes -> array, after checking the dtype name and length."""
    if dtype not in WIRE_DTYPES:
        raise InvalidInputError(f"{field}.dtype: {dtype!r} is not understood; expected one of {list(WIRE_DTYPES)}")
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"{field}.shape: {list(shape)} has a negative dimension")
    wire = np.dtype(dtype).newbyteorder("<")
    need = math.prod(shape) * wire.itemsize
    if len(data) != need:
        raise InvalidInputError(
            f"{field}.data: {len(data)} bytes, but dtype {dtype} and shape {list(shape)} need {need} bytes"
        )
    return np.frombuffer(data, dtype=wire).astype(dtype).reshape(shape)  # a writable copy, native order


def check_example(field: str, x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """One example: the model's dtype and shape, finite values. Returns it unchanged."""
    if str(x.dtype) != spec.dtype:
        raise InvalidInputError(f"{field}.dtype: got {x.dtype}, expected {spec.dtype}")
    if tuple(x.shape) != spec.shape:
        raise InvalidInputError(f"{field}.shape: got {list(x.shape)}, expected {list(spec.shape)} (one example)")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InvalidInputError(f"{field}: contains NaN or Inf; expected finite values")
    return x


def check_text(field: str, text: str) -> str:
    """One sentence: non-empty after stripping whitespace."""
    if not text.strip():
        raise InvalidInputError(f"{field}: empty; expected a non-empty sentence")
    return text


def check_size(field: str, size: int, limit: int) -> None:
    """The servicers' own message size limit, checked before decoding anything."""
    if size > limit:
        raise InvalidInputError(f"{field}: {size} bytes exceeds the server's limit of {limit} bytes")


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
