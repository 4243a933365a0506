"""Bundles: a directory with `manifest.json` and `*.safetensors`, everything needed to serve.

Loading validates before anything is built: the manifest parses, its schema version is known,
every file it names exists, and every weight has the shape the config implies. Weights are
read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from dynaroute.codec import InputCodec, InputSpec, codec_for
from dynaroute.errors import BundleError
from dynaroute.experts.backends import BACKENDS, DEFAULT_BACKEND, sha256
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
    # Exported graph files whose sha256 has been checked (each file is read once per bundle object).
    _verified: set[str] = field(default_factory=set, repr=False, compare=False)

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
        for entry in m.get("backends", {}).values():  # exported graphs (dynaroute export)
            out.extend(entry.get("files", {}))
        return out

    @property
    def default_backend(self) -> str:
        """The backend experts use unless told otherwise: the one the bundle was last exported for."""
        return self.manifest.get("default_backend", DEFAULT_BACKEND)

    @property
    def backends(self) -> list[str]:
        """The backends this bundle can be served on: torch, and every exported one."""
        return [DEFAULT_BACKEND, *self.manifest.get("backends", {})]

    def backend_graphs(self, backend: str, subnet: str) -> dict[str, Path]:
        """The exported graphs of one subnet (graph name -> file), each file's sha256 checked
        against the manifest: a graph that was changed after export is refused."""
        entry = self.manifest.get("backends", {}).get(backend)
        if entry is None:
            raise BundleError(f"bundle {self.name!r} has no graphs for backend {backend!r}; it has "
                              f"{self.backends}: run `dynaroute export {self.root} --backend {backend}`")
        graphs = entry["subnets"].get(subnet, {}).get("graphs")
        if not graphs:
            raise BundleError(f"bundle {self.name!r}: subnet {subnet!r} was not exported for backend {backend!r}; "
                              f"exported: {sorted(entry['subnets'])}")
        for rel in sorted(set(graphs.values())):
            self._check_file(rel, entry["files"].get(rel))
        return {name: self.root / rel for name, rel in graphs.items()}

    def check_backend(self, backend: str, subnets: Sequence[str] | None = None) -> None:
        """Refuse a backend this bundle cannot serve these subnets (default: all) on, or any of
        whose files is missing or changed; `dynaroute serve` checks this before it starts any actor."""
        if backend not in BACKENDS:
            raise BundleError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
        if backend == DEFAULT_BACKEND:
            return
        for name in subnets if subnets is not None else [s["name"] for s in self.subnet_infos]:
            self.backend_graphs(backend, name)

    def _check_file(self, rel: str, expected: str | None) -> None:
        if rel in self._verified:
            return
        path = self.root / rel
        if not path.is_file():
            raise BundleError(f"bundle {str(self.root)!r} is missing file {rel!r} named in {MANIFEST}")
        found = sha256(path)
        if found != expected:
            raise BundleError(f"{rel}: sha256 {found[:16]}... does not match the {expected and expected[:16]}... "
                              f"recorded in {MANIFEST}; the file was changed after export: export again")
        self._verified.add(rel)

    def calibration(self, backend: str | None = None) -> dict[str, Any]:
        """The router's calibration table (manifest form) for experts on `backend` (default: the
        default backend): the one measured on that backend's outputs when export redid it (int8),
        else the one measured at training."""
        entry = self.manifest.get("backends", {}).get(backend or self.default_backend, {})
        table = entry.get("calibration")
        return table if isinstance(table, dict) else self.manifest["calibration"]

    def latency_ms(self, subnet: str, backend: str | None = None, batch_size: int = 1) -> float | None:
        """A subnet's measured in-process latency on a backend (default: the default backend) at
        batch 1 or 32, as `dynaroute export` recorded it; None when it was not measured."""
        backend = backend or self.default_backend
        exported = self.manifest.get("backends", {})
        if backend == DEFAULT_BACKEND:  # measured beside each exported backend; else training's, at batch 1
            for entry in exported.values():
                value = entry["subnets"].get(subnet, {}).get("torch_latency_ms", {}).get(str(batch_size))
                if value is not None:
                    return float(value)
            value = self.subnet_info(subnet).get("latency_ms") if batch_size == 1 else None
        else:
            value = exported.get(backend, {}).get("subnets", {}).get(subnet, {}).get("latency_ms", {}).get(
                str(batch_size))
        return None if value is None else float(value)

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
