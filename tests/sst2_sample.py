"""SST-2 data for tests: ../shared/data/sst2 beside the repository when it exists, else a small
generated sample of the same shape, so that no test depends on that folder."""

from __future__ import annotations

import random
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
# Sentences that tests send to a served text model.
TEXTS = [
    "a wonderful , moving film",
    "the script is dull and lifeless , and the cast seems to know it",
    "an awful movie",
    "smart and funny from start to finish",
]


def sst2_data(fallback: Path) -> Path:
    """The shared SST-2 folder, or a sample written under `fallback`."""
    return SHARED if (SHARED / "train.tsv").is_file() else sample_data(fallback)


def sample_data(root: Path) -> Path:
    """A small SST-2-shaped sample: sentiment words in varied templates."""
    rng = random.Random(0)
    good = ["great", "wonderful", "moving", "funny", "brilliant", "charming", "smart", "delightful"]
    bad = ["dull", "boring", "awful", "tedious", "clumsy", "lifeless", "stupid", "painful"]
    nouns = ["film", "movie", "story", "script", "performance", "cast", "ending", "direction"]
    templates = ["a {a} {n}", "the {n} is {a}", "{a} and {b} , the {n} never lets up", "an {a} {n} about nothing"]

    def rows(n: int) -> list[str]:
        out = []
        for _ in range(n):
            label = rng.randint(0, 1)
            words = good if label else bad
            text = rng.choice(templates).format(a=rng.choice(words), b=rng.choice(words), n=rng.choice(nouns))
            out.append(f"{label}\t{text}")
        return out

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.tsv").write_text("label\tsentence\n" + "\n".join(rows(600)) + "\n")
    (root / "dev.tsv").write_text("label\tsentence\n" + "\n".join(rows(64)) + "\n")
    return root
