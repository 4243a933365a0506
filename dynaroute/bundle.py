"""Bundles: a directory with `manifest.json` and `*.safetensors`, everything needed to serve.

Loading validates before anything is built: the manifest parses, its schema version is known,
every file it names exists, and every weight has the shape the config implies. Weights are
read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from dynaroute.codec import InputCodec, InputSpec, codec_for
from dynaroute.errors import BundleError
from dynaroute.experts.base import SUPERNET_FAMILIES, DynamicModel, StagedModule
from dynaroute.experts.spec import SubnetSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Write a module's state dict as safetensors (contiguous copies, shared tensors split),
    atomically, with the mode any new file gets (0644 under the usual umask): safetensors'
    own `save_file` creates it 0600, which another user serving the bundle cannot read."""
    data = save({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically, so that a reader never sees half a file."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, **manifest}, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)


def check_weights(module: torch.nn.Module, path: Path, what: str) -> None:
    """Refuse a weights file whose tensor names or shapes do not match `module`'s config."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise BundleError(f"{path.name}: not a readable safetensors file ({e})") from e
    missing = sorted(set(expected) - set(found))
    if missing:
        raise BundleError(f"{path.name}: {what} weights are missing tensors {missing[:5]}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise BundleError(f"{path.name}: {what} weights have unexpected tensors {unexpected[:5]}")
    for k, shape in expected.items():
        if found[k] != shape:
            raise BundleError(
                f"{path.name}: tensor {k!r} has shape {list(found[k])}, but the {what} config "
                f"expects {list(shape)}"
            )


@dataclass
class Bundle:
    """A validated bundle directory. Build models from it with `supernet()` and `extract()`."""

    root: Path
    manifest: dict[str, Any]
    # The supernet built to check the weights' shapes in `load`; the first `supernet()` call loads
    # the weights into it rather than building another (a BERT takes a noticeable share of an
    # expert actor's start).
    _checked: DynamicModel | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, root: str | os.PathLike) -> Bundle:
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"bundle directory {str(root)!r} does not exist")
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"bundle {str(root)!r} has no {MANIFEST}")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path}: unreadable JSON ({e})") from e
        if not isinstance(manifest, dict):
            raise BundleError(f"{path}: expected a JSON object at the top level")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{path}: unknown schema_version {version!r}; this dynaroute reads version {SCHEMA_VERSION}"
            )
        for key in ("name", "task", "input", "supernet", "subnets"):
            if key not in manifest:
                raise BundleError(f"{path}: missing required key {key!r}")
        if not isinstance(manifest["input"], dict):
            raise BundleError(f"{path}: 'input' must be an object (the input spec)")
        try:
            InputSpec.from_dict(manifest["input"])
        except BundleError as e:
            raise BundleError(f"{path}: {e}") from e
        bundle = cls(root, manifest)
        for rel in bundle.files():
            if not (root / rel).is_file():
                raise BundleError(f"bundle {str(root)!r} is missing file {rel!r} named in {MANIFEST}")
        bundle._checked = bundle._build_supernet()
        check_weights(bundle._checked, root / manifest["supernet"]["weights"], "supernet")
        return bundle

    def files(self) -> list[str]:
        """Every file the manifest names, relative to the bundle root."""
        m = self.manifest
        out = [m["supernet"]["weights"]]
        if "router" in m:
            out.append(m["router"]["weights"])
        out.extend(self.input_spec.files())
        return out

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input"])

    def codec(self) -> InputCodec:
        """The codec of the bundle's input (its tokenizer or feature statistics loaded): what the
        gateway, evaluation and training encode examples with."""
        return codec_for(self.input_spec, self.root)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def labels(self) -> list[str]:
        return self.manifest["task"]["labels"]

    @property
    def subnet_infos(self) -> list[dict[str, Any]]:
        return self.manifest["subnets"]

    def subnet_info(self, name: str) -> dict[str, Any]:
        for s in self.subnet_infos:
            if s["name"] == name:
                return s
        raise KeyError(f"bundle {self.name!r} has no subnet {name!r}")

    @property
    def full_subnet(self) -> str:
        return self.manifest["full_subnet"]

    @property
    def full_flops(self) -> int:
        return int(self.subnet_info(self.full_subnet)["flops"])

    def _build_supernet(self) -> DynamicModel:
        s = self.manifest["supernet"]
        try:  # the family by name (dynaroute.registry): the same lookup in the gateway, eval and every actor
            return SUPERNET_FAMILIES.build(s["family"], s["config"])
        except BundleError as e:  # an unknown family (and how families are found), or a config it refuses
            raise BundleError(f"{self.root / MANIFEST}: {e}") from e

    def supernet(self) -> DynamicModel:
        """A new supernet with the bundle's weights (each call returns its own)."""
        model, self._checked = self._checked or self._build_supernet(), None
        model.load_state_dict(load_file(str(self.root / self.manifest["supernet"]["weights"])))
        return model.eval()

    def extract(self, spec: SubnetSpec | str) -> StagedModule:
        """Extract one subnet. For many, call `supernet()` once and extract from it."""
        if isinstance(spec, str):
            spec = SubnetSpec.parse(spec)
        return self.supernet().extract(spec)
