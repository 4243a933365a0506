"""Reading labelled data: formats, label order, splits, and every bad-data error naming the
file, the row and the column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dynaroute.codec import Standardizer
from dynaroute.datasets.dataset import DataSpec, dataset_from_arrays, load_dataset
from dynaroute.datasets.labels import LabelEncoder
from dynaroute.datasets.splitting import stratified_split
from dynaroute.errors import DataError


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def tabular_csv(path: Path, n: int = 30) -> str:
    rows = ["a,b,label"] + [f"{i},{i * 0.5},{['cat', 'dog', 'eel'][i % 3]}" for i in range(n)]
    return write(path, "\n".join(rows) + "\n")


def text_tsv(path: Path, n: int = 30) -> str:
    rows = ["sentence\tlabel"] + [f"text number {i}\t{['neg', 'pos', 'mixed'][i % 3]}" for i in range(n)]
    return write(path, "\n".join(rows) + "\n")


def test_tabular_csv_is_split_stratified_and_seeded(tmp_path: Path) -> None:
    spec = DataSpec(tabular_csv(tmp_path / "d.csv"), seed=3)
    ds = load_dataset(spec)
    assert ds.kind == "tabular" and ds.features == ("a", "b")
    assert ds.labels == ("cat", "dog", "eel")  # first appearance
    assert {len(ds[k]) for k in ("val", "test")} == {6} and len(ds["train"]) == 18
    for k in ("train", "val", "test"):
        assert sorted(set(ds[k].y.tolist())) == [0, 1, 2]
    rows = np.concatenate([ds[k].rows for k in ("train", "val", "test")])
    assert sorted(rows.tolist()) == list(range(1, 31))  # every row used once
    assert ds["train"].x.dtype == np.float32 and ds["train"].x.shape == (18, 2)
    # row r holds a = r - 1
    assert np.array_equal(ds["val"].x[:, 0], ds["val"].rows - 1)
    again = load_dataset(spec)
    assert np.array_equal(again["test"].rows, ds["test"].rows)
    m = ds.manifest()
    assert m["rows"]["test"]["rows"] == ds["test"].rows.tolist() and m["columns"]["features"] == ["a", "b"]


def test_text_tsv_with_its_own_validation_and_test_files(tmp_path: Path) -> None:
    train = text_tsv(tmp_path / "train.tsv")
    val = write(tmp_path / "val.tsv", 'sentence\tlabel\nsaid "so"\tpos\nno\tneg\n')
    test = write(tmp_path / "test.tsv", "sentence\tlabel\nyes\tmixed\n")
    ds = load_dataset(DataSpec(train, validation=val, test=test, text_column="sentence"))
    assert ds.kind == "text" and len(ds["train"]) == 30
    assert ds["val"].x == ['said "so"', "no"] and ds["val"].y.tolist() == [1, 0]
    assert ds["test"].y.tolist() == [2] and ds["test"].file == test
    assert ds.manifest()["split"]["split_off_train"] == []


def test_jsonl_and_integer_labels_sorted_by_value(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"t{i}", "label": [10, 2, 1][i % 3]}) for i in range(15)]
    ds = load_dataset(DataSpec(write(tmp_path / "d.jsonl", "\n".join(lines) + "\n"), text_column="text"))
    assert ds.labels == ("1", "2", "10")


def test_npz_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.normal(size=(20, 4)), y=np.arange(20) % 2)
    ds = load_dataset(DataSpec(str(tmp_path / "d.npz")))
    assert ds.features == ("x0", "x1", "x2", "x3") and ds.labels == ("0", "1")


def test_arrays_in_python() -> None:
    ds = dataset_from_arrays([[float(i), 1.0] for i in range(20)], ["a", "b"] * 10)
    assert ds.kind == "tabular" and ds.labels == ("a", "b") and ds["train"].x.shape[1] == 2
    text = dataset_from_arrays([f"s{i}" for i in range(20)], [0, 1] * 10)
    assert text.kind == "text" and text.labels == ("0", "1")


def test_stratified_split_keeps_every_class_in_every_part() -> None:
    y = np.array([0] * 3 + [1] * 50)
    train, val, test = stratified_split(y, [0.2, 0.2], 0, "f", "label", ["a", "b"])
    for part in (train, val, test):
        assert set(y[part]) == {0, 1}
    assert len(train) + len(val) + len(test) == 53


def test_standardize_uses_training_statistics() -> None:
    x = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
    st = Standardizer.fit(x)
    assert st.mean.tolist() == [2.0, 5.0] and st.std.tolist() == [1.0, 0.0]
    assert st(x).tolist() == [[-1.0, 0.0], [1.0, 0.0]]  # a constant feature is centred, not divided by 0


def test_label_encoder_refuses_a_single_class() -> None:
    with pytest.raises(DataError, match=r"'f', column 'label': holds a single class \['a'\]"):
        LabelEncoder.fit(["a", "a"], "f", "label")


# --- every bad-data error: one DataError naming the file, the row and the column -----------

def bad(tmp_path: Path, name: str, text: str, **spec: object) -> str:
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as e:
        load_dataset(DataSpec(path, **spec))  # type: ignore[arg-type]
    return str(e.value)


def test_missing_column_names_the_file_and_the_columns_it_has(tmp_path: Path) -> None:
    msg = bad(tmp_path, "d.csv", "x,label\n1,a\n", text_column="text")
    assert "d.csv" in msg and "column 'text'" in msg and "['x', 'label']" in msg
    msg = bad(tmp_path, "e.csv", "x,y\n1,a\n")
    assert "e.csv" in msg and "column 'label'" in msg


def test_empty_text_names_the_row(tmp_path: Path) -> None:
    msg = bad(tmp_path, "d.tsv", "text\tlabel\nfine\ta\n  \tb\n", text_column="text")
    assert "d.tsv" in msg and "row 2" in msg and "column 'text'" in msg and "empty text" in msg


def test_nan_and_non_numeric_features_name_the_row(tmp_path: Path) -> None:
    msg = bad(tmp_path, "d.csv", "a,label\n1,x\nnan,y\n")
    assert "d.csv" in msg and "row 2" in msg and "column 'a'" in msg and "finite" in msg
    msg = bad(tmp_path, "e.csv", "a,b,label\n1,2,x\n3,high,y\n")
    assert "row 2" in msg and "column 'b'" in msg and "'high' is not a number" in msg
    np.savez(tmp_path / "f.npz", X=np.array([[1.0], [np.nan]]), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"f\.npz', row 2, column 'x0'"):
        load_dataset(DataSpec(str(tmp_path / "f.npz")))


def test_empty_label_names_the_row(tmp_path: Path) -> None:
    msg = bad(tmp_path, "d.csv", "a,label\n1,x\n2,\n")
    assert "row 2" in msg and "column 'label'" in msg and "empty label" in msg


def test_single_class_is_refused(tmp_path: Path) -> None:
    msg = bad(tmp_path, "d.csv", "a,label\n1,x\n2,x\n")
    assert "d.csv" in msg and "column 'label'" in msg and "single class" in msg


def test_class_too_small_to_split_is_refused(tmp_path: Path) -> None:
    msg = bad(tmp_path, "d.csv", "a,label\n" + "".join(f"{i},x\n" for i in range(10)) + "1,rare\n2,rare\n")
    assert "d.csv" in msg and "column 'label'" in msg and "class 'rare' has 2 row(s)" in msg


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_dataset(DataSpec(str(tmp_path / "none.csv")))
    with pytest.raises(DataError, match="unknown data format '.xlsx'"):
        load_dataset(DataSpec(str(tmp_path / "d.xlsx")))
    (tmp_path / "bin.csv").write_bytes(b"a,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="bin.csv.*not UTF-8"):
        load_dataset(DataSpec(str(tmp_path / "bin.csv")))
    assert "empty file" in bad(tmp_path, "empty.csv", "")
    assert "row 1" in bad(tmp_path, "short.csv", "a,b,label\n1,2\n")
    assert "row 2" in bad(tmp_path, "j.jsonl", '{"a": 1, "label": "x"}\n{oops\n')
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz.*not a readable .npz"):
        load_dataset(DataSpec(str(tmp_path / "bad.npz")))


def test_label_unseen_in_training_is_refused_in_validation_and_test(tmp_path: Path) -> None:
    train = tabular_csv(tmp_path / "train.csv")
    val = write(tmp_path / "val.csv", "a,b,label\n1,2,cat\n3,4,yak\n")
    with pytest.raises(DataError) as e:
        load_dataset(DataSpec(train, validation=val))
    msg = str(e.value)
    assert "val.csv" in msg and "row 2" in msg and "column 'label'" in msg and "'yak' never occurs" in msg
    with pytest.raises(DataError, match=r"test\.csv', row 1, column 'label'"):
        load_dataset(DataSpec(train, test=write(tmp_path / "test.csv", "a,b,label\n1,2,yak\n")))
