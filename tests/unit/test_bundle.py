"""Bundles load when whole and are refused, with a message naming the problem, when not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynaroute.bundle import Bundle
from dynaroute.errors import BundleError


@pytest.fixture()
def bundle_copy(digits_bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(digits_bundle_dir, dst)
    return dst


def test_a_whole_bundle_loads_and_extracts(digits_bundle_dir: Path) -> None:
    bundle = Bundle.load(digits_bundle_dir)
    assert bundle.name == "digits"
    assert bundle.full_subnet == "w1-d3-p0"
    x = torch.rand(4, 64) * 16
    supernet = bundle.supernet()
    sub = bundle.extract("w0.5-d2-p0")
    torch.testing.assert_close(sub(x), supernet(x, sub_spec := supernet.subnets()[4]), atol=1e-5, rtol=0)
    assert sub_spec.name == "w0.5-d2-p0"


def test_missing_weights_file(bundle_copy: Path) -> None:
    (bundle_copy / "supernet.safetensors").unlink()
    with pytest.raises(BundleError, match="missing file 'supernet.safetensors'"):
        Bundle.load(bundle_copy)


def test_missing_manifest(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(bundle_copy)


def test_unreadable_json(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable JSON"):
        Bundle.load(bundle_copy)


def test_unknown_schema_version(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown schema_version 99"):
        Bundle.load(bundle_copy)


def test_weight_shape_that_does_not_match_the_config(bundle_copy: Path) -> None:
    path = bundle_copy / "supernet.safetensors"
    tensors = load_file(str(path))
    tensors["paths.0.blocks.1.weight"] = torch.zeros(128, 256)
    save_file(tensors, str(path))
    with pytest.raises(BundleError, match=r"'paths.0.blocks.1.weight' has shape \[128, 256\].*expects \[256, 256\]"):
        Bundle.load(bundle_copy)


def test_config_that_does_not_match_the_weights(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["supernet"]["config"]["num_blocks"] = 4
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="missing tensors"):
        Bundle.load(bundle_copy)


def test_pickle_is_never_read(bundle_copy: Path) -> None:
    (bundle_copy / "supernet.safetensors").write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors")
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        Bundle.load(bundle_copy)
