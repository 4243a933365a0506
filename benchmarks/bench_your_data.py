"""Your own data, end to end: a tabular and a text data set other than SST-2, each trained with
`dynaroute train --data FILE`, then `dynaroute eval` (subnet table, dynamic points, oracle).

    .venv/bin/python benchmarks/bench_your_data.py [--out runs/your_data] [--threads 1]

- tabular: scikit-learn's breast cancer data (569 rows, 30 named features, labels
  `malignant` / `benign`) written as a CSV; the slimmable MLP sized from it.
- text: a four-class data set made here from the docstrings of four installed packages: the
  first paragraph of each public function's or class's docstring, labelled with the package
  it documents (numpy, scipy, torch, sklearn), package names masked, sentences found in more
  than one package dropped. DynaBERT on all-MiniLM-L6-v2, one epoch per stage.
Prints each run's training time and `dynaroute eval`'s report.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

PACKAGES = {
    "numpy": ["numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.ma", "numpy.polynomial"],
    "scipy": ["scipy.stats", "scipy.linalg", "scipy.signal", "scipy.optimize", "scipy.sparse", "scipy.interpolate",
              "scipy.integrate", "scipy.special", "scipy.spatial", "scipy.ndimage"],
    "torch": ["torch", "torch.nn", "torch.nn.functional", "torch.linalg", "torch.fft", "torch.special",
              "torch.distributions", "torch.optim", "torch.utils.data"],
    "sklearn": ["sklearn.linear_model", "sklearn.ensemble", "sklearn.metrics", "sklearn.preprocessing",
                "sklearn.cluster", "sklearn.decomposition", "sklearn.model_selection", "sklearn.neighbors",
                "sklearn.svm", "sklearn.tree", "sklearn.feature_extraction.text", "sklearn.manifold",
                "sklearn.pipeline", "sklearn.utils"],
}
# The packages' own names would give the answer away.
MASK = re.compile(r"\b(numpy|np|scipy|torch|sklearn|scikit-learn|pytorch|tensor|tensors|ndarray|ndarrays)\b", re.I)


def docstring_rows() -> list[tuple[str, str]]:
    """(first paragraph, package) of every public callable's docstring, each sentence once."""
    found: dict[str, set[str]] = defaultdict(set)
    for package, modules in PACKAGES.items():
        for name in modules:
            module = importlib.import_module(name)
            for attr in dir(module):
                obj = getattr(module, attr, None)
                if attr.startswith("_") or not callable(obj):
                    continue
                doc = inspect.getdoc(obj)
                if not doc:
                    continue
                text = MASK.sub("X", " ".join(doc.strip().split("\n\n")[0].split()))
                if 20 <= len(text) <= 400:
                    found[text].add(package)
    return sorted((text, next(iter(pkgs))) for text, pkgs in found.items() if len(pkgs) == 1)


def write_text_tsv(path: Path) -> int:
    rows = docstring_rows()
    with path.open("w") as f:  # GLUE-style TSV: no quoting, so no tab or newline inside a field
        f.write("sentence\tlabel\n")
        for text, label in rows:
            f.write(f"{text.replace(chr(9), ' ')}\t{label}\n")
    return len(rows)


def write_tabular_csv(path: Path) -> int:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([n.replace(" ", "_") for n in data.feature_names] + ["diagnosis"])
        for row, target in zip(data.data, data.target, strict=True):
            w.writerow([*(repr(float(v)) for v in row), data.target_names[target]])
    return len(data.target)


def dynaroute(*args: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dynaroute", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dynaroute {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/your_data"), help="where data and bundles go")
    parser.add_argument("--threads", default="1", help="torch threads for the text run")
    parser.add_argument("--max-length", default="48", help="text: tokens per docstring")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    csv_path = args.out / "breast_cancer.csv"
    n = write_tabular_csv(csv_path)
    out, seconds = dynaroute("train", "--data", str(csv_path), "--label-column", "diagnosis",
                             "--out", str(args.out / "breast_cancer"))
    print(f"== tabular: breast cancer, {n} rows, 30 features, 2 classes; trained in {seconds:.0f} s\n{out}")
    report, _ = dynaroute("eval", str(args.out / "breast_cancer"))
    print(report)

    tsv_path = args.out / "docstrings.tsv"
    n = write_text_tsv(tsv_path)
    out, seconds = dynaroute("train", "--data", str(tsv_path), "--text-column", "sentence", "--out",
                             str(args.out / "docstrings"), "--max-length", args.max_length, "--threads", args.threads,
                             "--router-examples", "400")
    print(f"== text: package docstrings, {n} rows, 4 classes; trained in {seconds:.0f} s\n{out}")
    report, _ = dynaroute("eval", str(args.out / "docstrings"))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
