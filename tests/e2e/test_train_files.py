"""`dynaroute train --data FILE` then `dynaroute eval --data FILE`, as a user runs them: a
3-class text TSV with string labels (tiny DynaBERT settings; then served on Ray, the label names
in the replies), a tabular CSV with named labels,
every bad-data case refused with one line and no bundle, and `dynaroute.train` from arrays."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dynaroute
from dynaroute.bundle import Bundle
from dynaroute.client import Client
from tests.serving import ServerProcess

# Alone, the text test takes about 3 minutes (training, eval, a served Ray); the limit leaves room for a busy machine.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
TEXT_LABELS = ["neg", "pos", "meh"]


def cli(*args: str, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "dynaroute", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def text_rows(n: int, seed: int) -> list[str]:
    """Sentences with a sentiment word per class; labels cycle neg, pos, meh (first appearance)."""
    rng = random.Random(seed)
    words = {"neg": ["dull", "awful", "boring", "tedious"], "pos": ["great", "moving", "funny", "brilliant"],
             "meh": ["average", "passable", "ordinary", "so-so"]}
    nouns = ["film", "story", "script", "cast"]
    rows = []
    for i in range(n):
        label = TEXT_LABELS[i % 3]
        rows.append(f"the {rng.choice(nouns)} is {rng.choice(words[label])}\t{label}")
    return rows


def write_tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


def iris_csv(path: Path) -> Path:
    from sklearn.datasets import load_iris

    d = load_iris()
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    lines = [",".join([*names, "species"])]
    lines += [",".join([*(f"{v:g}" for v in x), d.target_names[y]]) for x, y in zip(d.data, d.target, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_text_tsv_with_three_string_labels_trains_evaluates_and_keeps_the_names(tmp_path: Path) -> None:
    train = write_tsv(tmp_path / "reviews.tsv", text_rows(240, 0))
    held = write_tsv(tmp_path / "held.tsv", text_rows(30, 1))
    out = tmp_path / "reviews"
    done = cli("train", "--data", str(train), "--text-column", "sentence", "--out", str(out), "--max-examples", "200",
               "--steps", "2", "--max-length", "24", "--router-examples", "48", "--batch-size", "16", "--threads", "1",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote bundle 'reviews'" in done.stdout and "['neg', 'pos', 'meh']" in done.stdout

    bundle = Bundle.load(out)
    m = bundle.manifest
    assert bundle.labels == TEXT_LABELS and m["task"]["labels"] == TEXT_LABELS
    assert m["supernet"]["family"] == "dynaroute.experts.bert:DynaBert" and m["supernet"]["config"]["num_classes"] == 3
    assert m["input"]["kind"] == "text" and m["input"]["max_length"] == 24
    # which rows of which file each split used: val and test split off the file, the router's held out of train
    rows = m["data"]["rows"]
    assert {k: len(v["rows"]) for k, v in rows.items()} == m["data"]["split_sizes"]
    used = [r for k in ("train", "router", "val", "test") for r in rows[k]["rows"]]
    assert len(used) == len(set(used)) == 240 and rows["test"]["file"] == str(train)
    assert m["data"]["columns"] == {"label": "label", "text": "sentence"}
    # the bundle holds what serving reads; the checkpoints are in the run folder beside it
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "router.safetensors", "supernet.safetensors",
                                                     "tokenizer.json"]
    assert json.loads((tmp_path / "reviews.run" / "state.json").read_text())["done"][:4] == [
        "teacher", "rewire", "width", "depth"]

    ev = cli("eval", str(out), "--data", str(held), "--json", "--out", str(tmp_path / "ev"), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads(ev.stdout)
    assert report["labels"] == TEXT_LABELS and report["test_data"]["rows"] == 30
    assert len(report["subnets"]) == 12 and len(report["dynamic"]) == 5
    assert (tmp_path / "ev" / "pareto.png").is_file()

    # served on local Ray: GetModel and every reply carry the data's label names
    server = ServerProcess.start(out)
    try:
        with Client(server.grpc_address, timeout_s=60) as client:
            assert list(client.get_model().labels) == TEXT_LABELS
            for text in ("the cast is brilliant", "the film is so-so", "the story is dull"):
                reply = client.infer(text=text, quality=0.5)
                assert len(reply.outputs.logits) == 3
                assert reply.outputs.label_name == TEXT_LABELS[reply.outputs.label]
    finally:
        assert server.stop() == 0


def test_tabular_csv_with_named_labels_trains_standardised_and_evaluates_on_any_file(tmp_path: Path) -> None:
    data = iris_csv(tmp_path / "iris.csv")
    out = tmp_path / "iris"
    done = cli("train", "--data", str(data), "--label-column", "species", "--out", str(out), "--epochs", "60",
               "--widths", "0.5,1", "--blocks", "2", "--hidden", "64", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    bundle = Bundle.load(out)
    m = bundle.manifest
    assert bundle.labels == ["setosa", "versicolor", "virginica"]
    spec = m["input"]
    assert spec["kind"] == "tabular" and spec["dtype"] == "float32" and spec["shape"] == [4]
    assert spec["features"] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    # the statistics are the training rows' (the rows the manifest records), in raw units
    raw = np.loadtxt(data, delimiter=",", skiprows=1, usecols=range(4), dtype=np.float32)
    train_rows = np.asarray(m["data"]["rows"]["train"]["rows"]) - 1
    mean, std = raw[train_rows].astype(np.float64).mean(0), raw[train_rows].astype(np.float64).std(0)
    np.testing.assert_allclose(spec["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(spec["std"], std, rtol=1e-5)
    assert spec["value_range"] == [float(raw[train_rows].min()), float(raw[train_rows].max())]
    assert m["supernet"]["config"]["in_features"] == 4 and m["supernet"]["config"]["widths"] == [0.5, 1.0]
    assert len(bundle.subnet_infos) == 4  # 2 widths x 2 depths
    assert bundle.subnet_info(bundle.full_subnet)["test_accuracy"] >= 0.85

    recorded = cli("eval", str(out), "--json", cwd=tmp_path)  # the recorded test rows, read again
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    r = json.loads(recorded.stdout)
    assert r["test_data"]["rows"] == len(m["data"]["rows"]["test"]["rows"])
    full = next(s for s in r["subnets"] if s["name"] == bundle.full_subnet)
    assert full["test_accuracy"] == bundle.subnet_info(bundle.full_subnet)["test_accuracy"]

    whole = cli("eval", str(out), "--data", str(data), "--json", cwd=tmp_path)  # raw values, standardised by eval
    assert whole.returncode == 0, whole.stderr[-3000:]
    r = json.loads(whole.stdout)
    assert r["labels"] == ["setosa", "versicolor", "virginica"] and r["test_data"]["rows"] == 150
    assert next(s for s in r["subnets"] if s["name"] == bundle.full_subnet)["test_accuracy"] >= 0.85
    assert {"dynamic", "oracle", "static_frontier"} <= set(r)

    (tmp_path / "odd.csv").write_text(data.read_text().replace("virginica", "tulip", 1))
    refused = cli("eval", str(out), "--data", str(tmp_path / "odd.csv"), cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "odd.csv', row 101, column 'species': label 'tulip' never occurs in the training data" in refused.stderr


GOOD = "a,b,label\n" + "".join(f"{i},{i % 7},{'xy'[i % 2]}\n" for i in range(20))
BAD_DATA = {
    "missing column": ("d.csv", GOOD, ["--feature-columns", "a,c"], ["d.csv", "column 'c'", "no such feature column"]),
    "empty text": ("d.tsv", "text\tlabel\nfine\tx\n \ty\n", ["--text-column", "text"],
                   ["d.tsv", "row 2", "column 'text'", "empty text"]),
    "NaN feature": ("d.csv", GOOD.replace("\n3,3,y", "\n3,nan,y"), [], ["d.csv", "row 4", "column 'b'", "finite"]),
    "non-numeric feature": ("d.csv", GOOD.replace("\n5,5,y", "\n5,five,y"), [],
                            ["d.csv", "row 6", "column 'b'", "'five' is not a number"]),
    "single class": ("d.csv", GOOD.replace(",y\n", ",x\n"), [], ["d.csv", "column 'label'", "single class"]),
    "class too small to split": ("d.csv", GOOD + "1,1,z\n", [], ["d.csv", "column 'label'", "class 'z' has 1 row"]),
    "unreadable file": ("d.csv", None, [], ["d.csv", "not UTF-8"]),
    "label unseen in training": ("d.csv", GOOD, ["--validation", "v.csv"],
                                 ["v.csv", "row 2", "column 'label'", "'w' never occurs in the training data"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_refused_with_one_line_naming_file_row_and_column_and_writes_no_bundle(
    tmp_path: Path, case: str
) -> None:
    name, text, flags, expected = BAD_DATA[case]
    if text is None:
        (tmp_path / name).write_bytes(b"a,label\n\xff\xfe,x\n")
    else:
        (tmp_path / name).write_text(text)
    (tmp_path / "v.csv").write_text("a,b,label\n1,2,x\n3,4,w\n")
    done = cli("train", "--data", name, "--out", "model", *flags, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynaroute train: "), done.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.run").exists()


def test_python_api_trains_from_arrays_and_returns_the_bundle(tmp_path: Path) -> None:
    from sklearn.datasets import load_iris

    d = load_iris()
    names = [d.target_names[y] for y in d.target]
    bundle = dynaroute.train((d.data, names), tmp_path / "iris", train_config=dynaroute.SupernetTrainConfig(epochs=30),
                             model_config=dynaroute.MLPConfig(widths=(0.5, 1.0), num_blocks=2), progress=False)
    assert isinstance(bundle, Bundle) and bundle.labels == ["setosa", "versicolor", "virginica"]
    assert bundle.manifest["input"]["kind"] == "tabular" and len(bundle.manifest["input"]["mean"]) == 4
    assert (tmp_path / "iris.run" / "supernet.safetensors").is_file()
    with pytest.raises(ValueError, match="cannot be trained on tabular data: its config has no in_features"):
        dynaroute.train((d.data, names), tmp_path / "other", family="dynabert")
