"""Families found by name: built-in short names, import paths and `dynaroute.families` entry points."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from dynaroute.bundle import Bundle
from dynaroute.errors import BundleError
from dynaroute.experts.base import SUPERNET_FAMILIES, DynamicModel
from dynaroute.experts.mlp import MLPConfig, SlimmableMLP
from dynaroute.registry import ENTRY_POINT_GROUP, Registry, UnknownFamilyError, family_name
from dynaroute.router.model import ROUTER_FAMILIES, MLPRouter
from dynaroute.router.text import TextRouter


def test_built_in_short_names_of_older_manifests_and_import_paths_find_the_same_class() -> None:
    assert SUPERNET_FAMILIES.resolve("slimmable_mlp") is SlimmableMLP
    assert ROUTER_FAMILIES.resolve("mlp") is MLPRouter and ROUTER_FAMILIES.resolve("text_mean_pool") is TextRouter
    assert SlimmableMLP.family == "dynaroute.experts.mlp:SlimmableMLP"  # what new manifests record
    assert SUPERNET_FAMILIES.resolve(SlimmableMLP.family) is SlimmableMLP
    model = SUPERNET_FAMILIES.build("slimmable_mlp", MLPConfig(hidden=8).to_dict())
    assert isinstance(model, SlimmableMLP) and model.config.hidden == 8


def test_a_users_family_is_found_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_family_mod.py").write_text(textwrap.dedent("""
        from dynaroute.experts.mlp import SlimmableMLP

        class WiderMLP(SlimmableMLP):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = SUPERNET_FAMILIES.resolve("user_family_mod:WiderMLP")
    assert cls.__name__ == "WiderMLP" and cls.family == "user_family_mod:WiderMLP"


def test_a_users_family_is_found_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What `pip install` of a package declaring the entry point leaves on sys.path.
    dist = tmp_path / "my_families-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-families\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nmy_mlp = dynaroute.experts.mlp:SlimmableMLP\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("supernet family", DynamicModel, {})  # a fresh one: nothing cached
    assert "my_mlp" in registry.names()
    assert registry.resolve("my_mlp") is SlimmableMLP


@pytest.mark.parametrize(("name", "needle"), [
    ("resnet9000", "unknown supernet family 'resnet9000'"),
    ("no_such_module_here:Net", "cannot import 'no_such_module_here:Net' (ModuleNotFoundError"),
    ("dynaroute.experts.mlp:NoSuchNet", "AttributeError"),
    ("dynaroute.experts.mlp:MLPConfig", "not a subclass of dynaroute.experts.base.DynamicModel"),
])
def test_an_unknown_family_names_itself_and_how_families_are_found(name: str, needle: str) -> None:
    with pytest.raises(UnknownFamilyError) as e:
        SUPERNET_FAMILIES.resolve(name)
    assert needle in str(e.value)
    if "subclass" not in needle:
        assert "import path 'package.module:Class'" in str(e.value) and ENTRY_POINT_GROUP in str(e.value)


def test_a_class_no_other_process_can_import_has_no_family_name() -> None:
    class Local(SlimmableMLP):
        pass

    with pytest.raises(ValueError, match="cannot be found by name from another process"):
        family_name(Local)


def test_a_bundle_naming_an_unknown_family_is_refused_naming_it(digits_bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(digits_bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["supernet"]["family"] = "mypkg.nets:SlimmableCNN"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest.json: supernet family 'mypkg.nets:SlimmableCNN': cannot import"
                                          r".*dynaroute.families"):
        Bundle.load(copy)
    manifest["supernet"]["family"] = "slimmable_mlp"  # the short name older bundles carry
    manifest["supernet"]["config"]["hidden"] = -1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bad config for supernet family 'slimmable_mlp': MLPConfig.hidden"):
        Bundle.load(copy)
