"""Wire-level decoding shared by the native and KServe servicers.

Each servicer decodes its own wire format into numpy arrays or strings (here), then checks
each example with the model's input codec (`dynaroute.codec`, `InputCodec.check`), so that
both APIs reject the same mistakes with messages that name the request field and say what was
expected. The engine validates again with the same codec (its own callers are not all
servicers); the servicers' messages are the ones that name the wire field.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from dynaroute.errors import InvalidInputError, TooLargeError, shown

# dtypes a tensor may be sent as (numpy names); anything else is not understood on the wire.
WIRE_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
MAX_DIMS = 64  # numpy's own limit on an array's dimensions


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
