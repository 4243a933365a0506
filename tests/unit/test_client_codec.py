"""What the client puts on the wire and how the gateway reads it back (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from dynaroute.client import make_request
from dynaroute.codec import InputSpec, codec_for
from dynaroute.errors import InvalidInputError
from dynaroute.gateway.inputs import decode_bytes_elements, decode_raw
from dynaroute.gateway.native import decode_budget

CODEC = codec_for(InputSpec("tensor", dtype="float32", shape=(64,)))


def test_tensor_round_trips_little_endian() -> None:
    x = np.arange(64, dtype=">f4")  # big-endian on purpose: the wire is little-endian regardless
    req = make_request(x, id="a", model="digits")
    assert req.tensor.dtype == "float32"
    assert req.tensor.data == np.arange(64, dtype="<f4").tobytes()
    back = decode_raw("tensor", "float32", list(req.tensor.shape), req.tensor.data)
    np.testing.assert_array_equal(back, np.arange(64, dtype=np.float32))
    assert back.flags.writeable
    CODEC.check("tensor", back)


def test_budget_fields_travel_as_the_oneof() -> None:
    req = make_request(np.zeros(64, np.float32), quality=0.25, policy="cascade")
    budget = decode_budget(req.budget)
    assert (budget.quality, budget.policy, budget.subnet) == (0.25, "cascade", None)
    assert decode_budget(make_request(text="hi", subnet="w1-d3-p0").budget).subnet == "w1-d3-p0"
    assert decode_budget(make_request(text="hi").budget).quality is None
    with pytest.raises(ValueError, match="at most one"):
        make_request(text="hi", quality=0.5, max_flops=1e6)
    with pytest.raises(InvalidInputError, match=r"budget\.quality"):
        decode_budget(make_request(text="hi", quality=2.0).budget)


@pytest.mark.parametrize(
    ("dtype", "shape", "data", "needle"),
    [
        ("complex64", [64], bytes(512), "tensor.dtype"),
        ("float32", [64], bytes(100), "tensor.data"),
        ("float32", [-1], b"", "tensor.shape"),
    ],
)
def test_wire_problems_name_the_field(dtype: str, shape: list[int], data: bytes, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle.replace(".", r"\.")):
        decode_raw("tensor", dtype, shape, data)


@pytest.mark.parametrize(
    ("x", "needle"),
    [
        (np.zeros(64, np.float64), "dtype: got float64, expected float32"),
        (np.zeros((8, 8), np.float32), "shape: got [8, 8], expected [64]"),
        (np.full(64, np.inf, np.float32), "NaN or Inf"),
        (np.zeros(0, np.float32), "shape: got [0]"),
    ],
)
def test_examples_must_match_the_input_spec(x: np.ndarray, needle: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        CODEC.check("tensor", x)
    assert needle in str(e.value)


def test_empty_text_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="text: empty"):
        codec_for({"kind": "text", "max_length": 8, "tokenizer": "t.json"}).check("text", "   ")


def test_bytes_elements_read_what_a_stock_kserve_client_writes() -> None:
    from tritonclient.utils import serialize_byte_tensor  # numpy only; no protos loaded

    texts = ["a fine film", "h\u00e9llo", ""]
    raw = serialize_byte_tensor(np.array([t.encode() for t in texts], dtype=np.object_)).item()
    assert [b.decode() for b in decode_bytes_elements("raw_input_contents[0]", raw, 3)] == texts
    with pytest.raises(InvalidInputError, match="needs 2"):
        decode_bytes_elements("raw_input_contents[0]", raw, 2)
    with pytest.raises(InvalidInputError, match="past the end"):
        decode_bytes_elements("raw_input_contents[0]", raw[:-5], 3)
