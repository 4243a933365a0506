"""`dynaroute infer` against a running `dynaroute serve` (the session's digits server)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dynaroute.bundle import Bundle
from dynaroute.data import load_digits_splits

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def infer(server, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dynaroute", "infer", "--address", server.grpc_address, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def example() -> tuple[np.ndarray, int]:
    test = load_digits_splits().test
    return test.x[0], int(test.y[0])


def test_infer_npy_prints_label_route_and_cost(digits_server, tmp_path, example):
    x, _ = example
    np.save(tmp_path / "x.npy", x)
    done = infer(digits_server, "--tensor", str(tmp_path / "x.npy"), "--quality", "0.5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("label: ")
    for word in ("route: ", "cost: ", "FLOPs", "of the full model", "total"):
        assert word in done.stdout


def test_infer_json_tensor_pinned_subnet_as_json(digits_server, digits_bundle_dir, tmp_path, example):
    x, _ = example
    bundle = Bundle.load(digits_bundle_dir)
    (tmp_path / "x.json").write_text(json.dumps(x.tolist()))
    done = infer(digits_server, "--tensor", str(tmp_path / "x.json"), "--subnet", bundle.full_subnet, "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["model"] == bundle.name
    assert reply["route"]["subnets"] == [bundle.full_subnet]
    assert int(reply["cost"]["full_flops"]) == bundle.full_flops
    with torch.no_grad():
        out = bundle.extract(bundle.full_subnet)(torch.as_tensor(x[None]))
    logits = (out[-1] if isinstance(out, list | tuple) else out)[0]
    assert int(reply["outputs"]["label"]) == int(logits.argmax())


def test_infer_errors_exit_nonzero_with_the_status(digits_server, tmp_path, example):
    np.save(tmp_path / "short.npy", example[0][:10])
    done = infer(digits_server, "--tensor", str(tmp_path / "short.npy"))
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr and "tensor.shape" in done.stderr
    np.save(tmp_path / "x.npy", example[0])
    done = infer(digits_server, "--tensor", str(tmp_path / "x.npy"), "--model", "nope")
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr
    done = infer(digits_server, "--tensor", str(tmp_path / "x.npy"), "--quality", "3")
    assert done.returncode == 1 and "budget.quality" in done.stderr
    done = infer(digits_server, "--text", "a sentence")
    assert done.returncode == 1 and "expects a tensor" in done.stderr


def test_token_protected_server_needs_the_token(digits_bundle_dir, tmp_path, example):
    """`serve --auth-token-file` refuses calls without the token; `infer --token` gets through."""
    from tests.serving import ServerProcess

    (tmp_path / "token").write_text("s3cret-token\n")
    np.save(tmp_path / "x.npy", example[0])
    server = ServerProcess.start(digits_bundle_dir, "--auth-token-file", str(tmp_path / "token"))
    try:
        done = infer(server, "--tensor", str(tmp_path / "x.npy"))
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
        done = infer(server, "--tensor", str(tmp_path / "x.npy"), "--token", "wrong")
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
        done = infer(server, "--tensor", str(tmp_path / "x.npy"), "--token", "s3cret-token")
        assert done.returncode == 0 and done.stdout.startswith("label: "), done.stderr
    finally:
        assert server.stop() == 0
