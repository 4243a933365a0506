"""dynaroute.rowfiles: batch files for `dynaroute infer --batch`, every row checked and named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dynaroute.rowfiles import load_rows

SHAPE = (2, 3)


@pytest.fixture()
def rows() -> np.ndarray:
    return np.arange(4 * 6, dtype=np.float32).reshape(4, *SHAPE)


def test_npy_csv_and_jsonl_give_the_same_rows(tmp_path: Path, rows: np.ndarray) -> None:
    np.save(tmp_path / "a.npy", rows.astype(np.float64))  # cast to the model's dtype
    np.save(tmp_path / "flat.npy", rows.reshape(4, 6))
    header = ",".join(f"p{i}" for i in range(6))
    (tmp_path / "a.csv").write_text(header + "\n" + "\n".join(",".join(map(str, r.ravel())) for r in rows) + "\n\n")
    lines = [json.dumps(r.tolist()) for r in rows[:2]] + [""] + [json.dumps(r.ravel().tolist()) for r in rows[2:]]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    for name in ("a.npy", "flat.npy", "a.csv", "a.jsonl"):
        got = load_rows(str(tmp_path / name), "tensor", "float32", SHAPE)
        assert got.dtype == np.float32 and got.shape == (4, *SHAPE), name
        np.testing.assert_array_equal(got, rows)


def test_text_rows_from_jsonl_csv_and_npy(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text('"a fine film"\n{"text": "dull, sadly"}\n')
    (tmp_path / "t.csv").write_text('label,sentence\n1,"a fine film"\n0,"dull, sadly"\n')
    (tmp_path / "plain.csv").write_text('"a fine film"\n"dull, sadly"\n')
    np.save(tmp_path / "t.npy", np.array(["a fine film", "dull, sadly"]))
    for name in ("t.jsonl", "t.csv", "plain.csv", "t.npy"):
        assert load_rows(str(tmp_path / name), "text") == ["a fine film", "dull, sadly"], name


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.csv", "1,2,3,4,5,6\n1,2,x,4,5,6\n", "row 1 (line 2): 'x' is not a number"),
        ("short.csv", "h1,h2\n1,2,3,4,5,6\n1,2\n", "row 1 (line 3): 2 values of shape [2]; expected shape [2, 3] or 6"),
        ("bad.jsonl", "[1,2,3,4,5,6]\n\n{\"no\": 1}\n", "row 1 (line 3): expected a JSON array of numbers, got dict"),
        ("broken.jsonl", "[1,2,3,4,5,6]\n[1,2\n", "row 1 (line 2): not JSON"),
        ("empty.csv", "h1,h2\n", "holds no rows"),
        ("x.txt", "1", "must end in one of .npy, .csv, .jsonl"),
    ],
)
def test_a_bad_row_is_named_with_its_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match="--batch") as e:
        load_rows(str(tmp_path / name), "tensor", "float32", SHAPE)
    assert message in str(e.value)


def test_npy_of_the_wrong_shape_or_kind_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"shape \[4, 5\]; expected \[N, 2, 3\] \(or \[N, 6\]\)"):
        load_rows(str(tmp_path / "w.npy"), "tensor", "float32", SHAPE)
    (tmp_path / "t.jsonl").write_text('"ok"\n3\n')
    with pytest.raises(ValueError, match=r"row 1 \(line 2\): expected a JSON string"):
        load_rows(str(tmp_path / "t.jsonl"), "text")
