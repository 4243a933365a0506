"""Input codecs: what each input kind checks, how it encodes a batch and stacks rows."""

from __future__ import annotations

import numpy as np
import pytest

from dynaroute.codec import (
    InputSpec,
    Standardizer,
    TabularCodec,
    TensorCodec,
    TextCodec,
    codec_for,
    length_groups,
)
from dynaroute.errors import BundleError, InvalidInputError

TABULAR = {"kind": "tabular", "dtype": "float32", "shape": [3], "features": ["age", "income", "flag"],
           "mean": [40.0, 50000.0, 1.0], "std": [10.0, 20000.0, 0.0], "value_range": [0.0, 200000.0]}


def test_each_kind_gets_its_codec_and_old_tensor_manifests_still_read() -> None:
    assert isinstance(codec_for({"dtype": "float32", "shape": [64]}), TensorCodec)  # no kind: a tensor
    assert type(codec_for(TABULAR)) is TabularCodec
    text = codec_for({"kind": "text", "max_length": 16, "tokenizer": "tokenizer.json"})
    assert isinstance(text, TextCodec) and text.in_thread and text.spec.files() == ["tokenizer.json"]
    assert not codec_for(TABULAR).in_thread and codec_for(TABULAR).spec.wire == "tensor"


@pytest.mark.parametrize(("spec", "needle"), [
    ({"kind": "image", "dtype": "float32", "shape": [3]}, "input.kind"),
    ({"kind": "tensor", "shape": [3]}, "missing 'dtype'"),
    ({"kind": "tensor", "dtype": "float32", "shape": [0]}, "input.shape"),
    ({**TABULAR, "mean": [0.0]}, "input.mean: 1 entries for 3 features"),
    ({**TABULAR, "std": [1.0, -1.0, 1.0]}, "std >= 0"),
    ({**TABULAR, "dtype": "int64"}, "tabular input is float32"),
    ({"kind": "text", "max_length": 1}, "input.max_length"),
])
def test_a_malformed_input_spec_is_a_bundle_error_naming_the_field(spec: dict, needle: str) -> None:
    with pytest.raises(BundleError, match="input") as e:
        InputSpec.from_dict(spec)
    assert needle in str(e.value)


def test_standardizer_centres_and_scales_and_leaves_constant_features_unscaled() -> None:
    s = Standardizer([1.0, 2.0], [2.0, 0.0])
    np.testing.assert_allclose(s(np.array([[3.0, 5.0], [1.0, 2.0]])), [[1.0, 3.0], [0.0, 0.0]])
    x = np.random.default_rng(0).normal([5.0, -3.0], [2.0, 0.5], size=(4000, 2))
    fitted = Standardizer.fit(x)
    z = fitted(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)
    again = Standardizer(**fitted.to_dict())
    np.testing.assert_array_equal(again(x), z)
    with pytest.raises(ValueError, match="one length"):
        Standardizer([0.0], [1.0, 1.0])


def test_tabular_checks_raw_values_and_encodes_them_standardised() -> None:
    codec = codec_for(TABULAR)
    raw = np.array([50.0, 90000.0, 1.0], np.float32)
    assert codec.check("tensor", raw) is raw  # raw incomes are far outside any standardised range: accepted
    encoded = codec.encode([raw, np.array([40.0, 50000.0, 0.0], np.float32)])
    np.testing.assert_allclose(encoded.batch, [[1.0, 2.0, 0.0], [0.0, 0.0, -1.0]])
    np.testing.assert_array_equal(codec.stack(encoded.rows), encoded.batch)  # rows go to the experts as encoded
    with pytest.raises(InvalidInputError, match="outside"):
        codec.check("tensor", np.array([50.0, 1e9, 1.0], np.float32))
    # the engine's API: a list of numbers and a batch of one are one example
    np.testing.assert_array_equal(codec.validate([[50, 90000, 1]], None, "m"), raw)
    with pytest.raises(InvalidInputError, match=r"takes a tensor of dtype float32 and shape \[3\] \(raw values of age"):
        codec.validate(None, "hello", "m")


def test_tensor_rows_stack_and_one_row_is_a_view() -> None:
    codec = codec_for({"kind": "tensor", "dtype": "float32", "shape": [4]})
    row = np.zeros(4, np.float32)
    assert codec.stack([row]).base is row
    assert codec.stack([row, np.ones(4, np.float32)]).shape == (2, 4)
    with pytest.raises(InvalidInputError, match="shape \\[2, 4\\]; expected \\[4\\]"):
        codec.validate(np.zeros((2, 4)), None, "m")


def test_text_rows_are_padded_to_the_longest_and_text_is_checked_without_a_tokenizer() -> None:
    codec = codec_for({"kind": "text", "max_length": 16, "tokenizer": "tokenizer.json"})
    ids, mask = codec.stack([(np.array([1, 2, 3]), np.array([1, 1, 1])), (np.array([4]), np.array([1]))])
    np.testing.assert_array_equal(ids, [[1, 2, 3], [4, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    assert codec.check("text", "a fine film") == "a fine film"
    with pytest.raises(InvalidInputError, match="takes text; got a tensor"):
        codec.validate(np.zeros(3), None, "m")
    with pytest.raises(RuntimeError, match="tokenizer"):
        codec.encode(["a fine film"])


def test_text_encodes_with_the_bundles_tokenizer_and_its_rows_restack_to_the_batch() -> None:
    from dynaroute.experts.bert import default_checkpoint

    codec = codec_for({"kind": "text", "max_length": 16, "tokenizer": "tokenizer.json"}, default_checkpoint())
    encoded = codec.encode(["hi", "a somewhat longer sentence"])
    ids, mask = encoded.batch
    assert ids.shape == mask.shape == (2, 6)
    restacked = codec.stack(encoded.rows)
    np.testing.assert_array_equal(restacked[0], ids.numpy())
    np.testing.assert_array_equal(restacked[1], mask.numpy())
    short_ids, _ = codec.stack(encoded.rows[:1])
    assert short_ids.shape == (1, 3)  # rows drop the batch's padding; stacking pads to the longest row


def test_length_groups_cover_every_row_once_and_split_only_where_padding_costs_more_than_a_batch() -> None:
    lengths = [40, 3, 41, 4, 3, 40, 5, 42] * 4  # short and long sentences, interleaved
    groups = length_groups(lengths, group_cost=64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted({lengths[i] // 10 for i in g}) for g in groups] == [[0], [4]]  # the short ones apart
    assert length_groups([10, 12, 11, 12], group_cost=64) == [[0, 2, 1, 3]]  # padding 3 positions: not worth a batch
    assert length_groups([7], group_cost=64) == [[0]]
    # The split is the cheapest one: padded positions plus the cost per group.
    def cost(gs: list[list[int]], c: float) -> float:
        return sum(len(g) * max(lengths[i] for i in g) + c for g in gs)
    assert cost(groups, 64) <= min(cost([list(range(len(lengths)))], 64), cost([[i] for i in range(len(lengths))], 64))


def test_text_rows_of_an_expert_call_are_grouped_by_length() -> None:
    from dynaroute.experts.bert import default_checkpoint

    codec = codec_for({"kind": "text", "max_length": 48, "tokenizer": "tokenizer.json"}, default_checkpoint())
    short, long = "fine", " ".join(["a long and winding sentence that goes on"] * 5)
    rows = codec.encode([short, long] * 8).rows
    groups = codec.groups(rows)
    assert sorted(map(sorted, groups)) == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    ids, mask = codec.stack([rows[i] for i in groups[0]])
    assert ids.shape == (8, 3) and mask.all()  # the short sentences' batch is not padded to the long ones'
    tensor = codec_for({"kind": "tensor", "dtype": "float32", "shape": [2]})
    assert tensor.groups([np.zeros(2)] * 3) == [[0, 1, 2]]
