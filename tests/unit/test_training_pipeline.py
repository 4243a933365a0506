"""The training pipeline's pieces that need no training: the run folder, resuming, the family
by data kind, and the router's slice held out of train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dynaroute.datasets.dataset import dataset_from_arrays
from dynaroute.experts.bert import DynaBert
from dynaroute.experts.mlp import SlimmableMLP
from dynaroute.training.pipeline import supernet_family
from dynaroute.training.stages import Checkpoints, run_dir_for


def test_the_run_folder_is_beside_the_bundle() -> None:
    assert run_dir_for("models/wine") == Path("models/wine.run")
    assert run_dir_for(Path("/x/b/")) == Path("/x/b.run")


def test_checkpoints_refuse_to_resume_with_other_settings(tmp_path: Path) -> None:
    ck = Checkpoints(tmp_path / "run")
    ck.check_resumable({"lr": 0.1, "widths": (0.5, 1.0), "steps": 3})
    ck.mark_done("supernet", final_loss=0.5)
    again = Checkpoints(tmp_path / "run")
    assert again.done("supernet")
    again.check_resumable({"lr": 0.1, "widths": (0.5, 1.0), "steps": 9}, free={"steps"})  # tuples match lists
    with pytest.raises(ValueError, match=r"other settings \(lr\); use another --run-dir"):
        Checkpoints(tmp_path / "run").check_resumable({"lr": 0.2, "widths": (0.5, 1.0), "steps": 9})


def test_family_defaults_by_data_kind_and_refuses_what_the_pipeline_cannot_train() -> None:
    assert supernet_family(None, "tabular") is SlimmableMLP and supernet_family(None, "text") is DynaBert
    # Found as a manifest names it: a built-in short name or an import path.
    assert supernet_family("dynaroute.experts.mlp:SlimmableMLP", "tabular") is SlimmableMLP
    assert supernet_family(SlimmableMLP, "tabular") is SlimmableMLP
    with pytest.raises(ValueError, match="text data trains the 'dynabert' family"):
        supernet_family(SlimmableMLP, "text")
    with pytest.raises(TypeError, match="a name or a DynamicModel subclass"):
        supernet_family(dict, "tabular")


def test_hold_out_takes_a_stratified_slice_of_train_only() -> None:
    ds = dataset_from_arrays([f"s{i}" for i in range(100)], ["a", "b", "c", "d"] * 25)
    held = ds.hold_out("router", 12, seed=0)
    train, router = held["train"], held["router"]
    assert len(train) + len(router) == len(ds["train"]) and 10 <= len(router) <= 14
    assert not set(train.rows) & set(router.rows) and set(router.y) == {0, 1, 2, 3}
    assert np.array_equal(held["test"].rows, ds["test"].rows)
    assert held.manifest()["rows"]["router"]["rows"] == router.rows.tolist()
