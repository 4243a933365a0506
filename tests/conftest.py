"""Shared fixtures. Bundles are trained once per session into a temporary directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def digits_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default digits bundle (one path), trained once for the whole test session."""
    from dynaroute.training.digits import train_digits

    out = tmp_path_factory.mktemp("bundles") / "digits"
    train_digits(out, progress=False)
    return out


@pytest.fixture(scope="session")
def digits_paths_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mixture-of-paths digits bundle (two branches), for top-k path routing."""
    from dynaroute.experts.mlp import MLPConfig
    from dynaroute.training.digits import train_digits
    from dynaroute.training.supernet import SupernetTrainConfig

    out = tmp_path_factory.mktemp("bundles") / "digits_paths"
    train_digits(out, MLPConfig(num_paths=2), SupernetTrainConfig(epochs=40), name="digits-paths", progress=False)
    return out


@pytest.fixture(scope="session")
def digits_exported_dir(digits_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the digits bundle exported for both ONNX Runtime backends (onnx, then int8: the
    bundle's default backend is int8)."""
    from dynaroute.export import export_bundle

    root = tmp_path_factory.mktemp("exported") / "digits"
    shutil.copytree(digits_bundle_dir, root)
    for backend in ("onnx", "int8"):
        export_bundle(root, backend, latency_repeats=3)
    return root


# The tiny SST-2 bundle's subnets that `sst2_exported_dir` exports (the others stay torch-only).
SST2_EXPORTED = ("w0.25-d3-p0", "w0.5-d4-p0", "w1-d6-p0")


@pytest.fixture(scope="session")
def sst2_exported_dir(sst2_tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny SST-2 bundle with three subnets exported for onnx and int8 through the
    real CLI (`dynaroute export --subnets`)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("exported") / "sst2"
    shutil.copytree(sst2_tiny_bundle_dir, root)
    for backend in ("onnx", "int8"):
        done = subprocess.run([sys.executable, "-m", "dynaroute", "export", str(root), "--backend", backend,
                               "--subnets", *SST2_EXPORTED, "--repeats", "2"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert f"exported {len(SST2_EXPORTED)} subnets for backend '{backend}'" in done.stdout
    return root


@pytest.fixture(scope="session")
def digits_server(digits_bundle_dir: Path):
    """`dynaroute serve` on the digits bundle (subprocess, local Ray, free ports, the HTTP/REST
    port on), shared by the integration and e2e tests of the API; stopped with SIGTERM at the
    end of the session."""
    from tests.serving import ServerProcess

    server = ServerProcess.start(digits_bundle_dir, "--max-message-bytes", str(1 << 20), "--http-port", "0")
    yield server
    server.stop()


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:  # a missing tool fails the test: it is part of the set-up, never a reason to skip
        pytest.fail(f"{tool} is not installed: run `make prometheus` (Debian's prometheus package)")
    return path


@pytest.fixture()
def require_promtool() -> str:
    return _require("promtool")


@pytest.fixture()
def require_prometheus() -> str:
    return _require("prometheus")


@pytest.fixture(scope="session")
def sst2_tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SST-2 (DynaBERT) bundle: two steps per stage, short sequences, a small sample;
    trained once for the session (~20 s at one torch thread)."""
    import torch

    from dynaroute.training.sst2 import SST2TrainConfig, train_sst2
    from tests.sst2_sample import sst2_data

    root = tmp_path_factory.mktemp("bundles")
    cfg = SST2TrainConfig(max_length=24, max_examples=200, val_examples=48, router_examples=48, test_examples=48,
                          batch_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread trains faster than two contending
    try:
        train_sst2(sst2_data(root / "data"), root / "sst2", cfg, steps_cap=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "sst2"


@pytest.fixture(scope="session")
def sst2_server(sst2_tiny_bundle_dir: Path):
    """`dynaroute serve` on the tiny SST-2 bundle (subprocess, local Ray, free ports, the
    HTTP/REST port on)."""
    from tests.serving import ServerProcess

    server = ServerProcess.start(sst2_tiny_bundle_dir, "--http-port", "0")
    yield server
    server.stop()
