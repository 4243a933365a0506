"""Serving on each expert backend through the real server (`dynaroute serve` on local Ray):
ONNX Runtime fp32 answers as torch does, int8 nearly always with torch's label, and a placement
can put actors of one server on different backends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dynaroute.bundle import Bundle
from dynaroute.client import Client
from dynaroute.data import load_digits_splits
from dynaroute.experts.backends import make_backend
from tests.serving import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHEAP = "w0.25-d1-p0"


@pytest.fixture(scope="module")
def test_x() -> np.ndarray:
    return load_digits_splits().test.x[:40]


@pytest.fixture(scope="module")
def bundle(digits_exported_dir: Path) -> Bundle:
    return Bundle.load(digits_exported_dir)


def logits_of(bundle: Bundle, subnet: str, x: np.ndarray, backend: str = "torch") -> np.ndarray:
    module = bundle.extract(subnet)
    if backend != "torch":
        module = make_backend(backend).load(module, bundle.backend_graphs(backend, subnet))
    with torch.no_grad():
        return module(torch.as_tensor(x)).numpy()


def test_onnx_backend_answers_like_torch(bundle, test_x):
    server = ServerProcess.start(bundle.root, "--backend", "onnx")
    try:
        with Client(server.grpc_address, timeout_s=60) as client:
            for subnet in (bundle.full_subnet, CHEAP):
                expected = logits_of(bundle, subnet, test_x)
                got = np.stack([np.asarray(client.infer(row, id=str(i), subnet=subnet).outputs.logits)
                                for i, row in enumerate(test_x)])
                np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
            for i, row in enumerate(test_x[:10]):  # routed: the answer of the subnet and exit taken, as torch
                reply = client.infer(row, id=f"q{i}", quality=0.5)
                subnet, depth = reply.route.subnets[0], reply.route.exit_depths[0]
                module = bundle.extract(subnet)
                with torch.no_grad():
                    expected = module.forward_exits(torch.as_tensor(row[None]))[depth - 1][0].numpy()
                np.testing.assert_allclose(np.asarray(reply.outputs.logits), expected, atol=1e-4, rtol=0)
    finally:
        assert server.stop() == 0


def test_placement_puts_actors_on_different_backends(bundle, test_x, tmp_path):
    others = [s["name"] for s in bundle.subnet_infos if s["name"] != bundle.full_subnet]
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"actors": [
        {"name": "full-int8", "subnets": [bundle.full_subnet], "backend": "int8"},
        {"name": "rest-torch", "subnets": others, "backend": "torch"},
    ]}))
    server = ServerProcess.start(bundle.root, "--placement", str(placement))
    try:
        with Client(server.grpc_address, timeout_s=60) as client:
            full = np.stack([np.asarray(client.infer(row, id=str(i), subnet=bundle.full_subnet).outputs.logits)
                             for i, row in enumerate(test_x)])
            cheap = np.stack([np.asarray(client.infer(row, id=f"c{i}", subnet=CHEAP).outputs.logits)
                              for i, row in enumerate(test_x)])
    finally:
        assert server.stop() == 0
    # The full subnet ran on int8: its in-process int8 answer, and torch's label nearly always.
    # Row by row: dynamic quantisation scales activations by their batch's range, and one client
    # sending one request at a time gets batches of one.
    int8 = np.concatenate([logits_of(bundle, bundle.full_subnet, row[None], "int8") for row in test_x])
    np.testing.assert_allclose(full, int8, atol=1e-4, rtol=0)
    torch_labels = logits_of(bundle, bundle.full_subnet, test_x).argmax(1)
    assert (full.argmax(1) == torch_labels).mean() >= 0.95
    # the other actor ran torch, though the bundle's default backend is int8
    np.testing.assert_allclose(cheap, logits_of(bundle, CHEAP, test_x), atol=1e-4, rtol=0)


def test_text_served_on_onnx_answers_like_torch(sst2_exported_dir, tmp_path):
    """Sentences tokenised by the gateway run through the ONNX graphs of the exported subnets (a
    placement puts those on an onnx actor, the rest on torch), dynamic padding and all."""
    from dynaroute.text import TextEncoder

    bundle = Bundle.load(sst2_exported_dir)
    exported = sorted(bundle.manifest["backends"]["onnx"]["subnets"])
    rest = [s["name"] for s in bundle.subnet_infos if s["name"] not in exported]
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"actors": [
        {"name": "onnx", "subnets": exported, "backend": "onnx"},
        {"name": "torch", "subnets": rest, "backend": "torch"},
    ]}))
    texts = ["a wonderful , moving film", "the script is dull and lifeless , and the cast seems to know it",
             "an awful movie"]
    encoder = TextEncoder.from_bundle(bundle)
    server = ServerProcess.start(bundle.root, "--placement", str(placement))
    try:
        with Client(server.grpc_address, timeout_s=60) as client:
            for subnet in exported:
                reference = bundle.extract(subnet)
                for i, text in enumerate(texts):
                    reply = client.infer(text=text, id=f"{subnet}-{i}", subnet=subnet)
                    with torch.no_grad():
                        expected = reference(encoder.encode([text]))[0].numpy()
                    np.testing.assert_allclose(np.asarray(reply.outputs.logits), expected, atol=1e-4, rtol=0)
    finally:
        assert server.stop() == 0
