"""A text (DynaBERT) bundle served end to end: `dynaroute serve` runs the RayEngine on real
local Ray; native `text` requests and KServe v2 BYTES tensors are tokenised in the gateway and
answer what the same subnet, cut at the same exit, answers in-process."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from dynaroute.bundle import Bundle
from dynaroute.client import Client
from dynaroute.text import TextEncoder
from tests.sst2_sample import TEXTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def bundle(sst2_tiny_bundle_dir: Path) -> Bundle:
    return Bundle.load(sst2_tiny_bundle_dir)


@pytest.fixture(scope="module")
def client(sst2_server):
    with Client(sst2_server.grpc_address, timeout_s=60) as c:
        yield c


def exit_logits(bundle: Bundle, subnet: str, text: str, depth: int) -> np.ndarray:
    """The extracted subnet run in-process on one tokenised sentence, answering at exit `depth`."""
    sub = bundle.extract(subnet)
    x = TextEncoder.from_bundle(bundle).encode([text])
    with torch.no_grad():
        state = sub.embed(x)
        for i in range(depth):
            state = sub.stage(i, state)
        return sub.exit_logits(depth - 1, state)[0].numpy()


def test_model_info_says_text(client, bundle):
    info = client.get_model()
    assert info.name == bundle.name and info.input.kind == "text"
    assert info.full_subnet == bundle.full_subnet == "w1-d6-p0"


def test_pinned_subnet_answers_like_the_extracted_subnet(client, bundle):
    for subnet in (bundle.full_subnet, "w0.5-d3-p0"):
        for i, text in enumerate(TEXTS):
            reply = client.infer(text=text, id=f"p{i}", subnet=subnet)
            assert list(reply.route.subnets) == [subnet]
            depth = int(subnet.split("-d")[1].split("-")[0])
            assert list(reply.route.exit_depths) == [depth]  # pinned: no early exit
            expected = exit_logits(bundle, subnet, text, depth)
            np.testing.assert_allclose(np.asarray(reply.outputs.logits), expected, rtol=1e-4, atol=1e-4)
            assert reply.outputs.label == int(expected.argmax())
            assert reply.outputs.label_name == bundle.labels[reply.outputs.label]


@pytest.mark.parametrize("quality", [0.0, 0.5, 1.0])
def test_text_at_budgets_answers_like_the_subnet_and_exit_it_took(client, bundle, quality):
    for i, text in enumerate(TEXTS):
        reply = client.infer(text=text, id=f"q{i}", quality=quality)
        assert len(reply.route.subnets) == 1 and len(reply.route.exit_depths) == 1
        subnet, depth = reply.route.subnets[0], reply.route.exit_depths[0]
        np.testing.assert_allclose(np.asarray(reply.outputs.logits), exit_logits(bundle, subnet, text, depth),
                                   rtol=1e-4, atol=1e-4)
        assert reply.cost.full_flops == bundle.full_flops
        assert reply.cost.total_flops == reply.cost.router_flops + reply.cost.expert_flops > 0


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_is_invalid_argument_and_server_keeps_serving(client, text):
    with pytest.raises(grpc.RpcError) as e:
        client.infer(text=text)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "text" in e.value.details()
    assert client.infer(text=TEXTS[0]).outputs.label_name


def test_kserve_bytes_request_through_tritonclient(sst2_server, bundle):
    # tritonclient's own stubs: the test process must not load a second copy of the `inference` protos
    import tritonclient.grpc as tc

    triton = tc.InferenceServerClient(sst2_server.grpc_address)
    meta = triton.get_model_metadata(bundle.name)
    assert [(i.name, i.datatype) for i in meta.inputs] == [("text", "BYTES")]
    inp = tc.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    result = triton.infer(bundle.name, [inp], parameters={"subnet": bundle.full_subnet})
    expected = np.stack([exit_logits(bundle, bundle.full_subnet, t, 6) for t in TEXTS])
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(result.as_numpy("label"), expected.argmax(1))
    with pytest.raises(tc.InferenceServerException) as e:
        empty = tc.InferInput("text", [1], "BYTES")
        empty.set_data_from_numpy(np.array([b""], dtype=object))
        triton.infer(bundle.name, [empty])
    assert "INVALID_ARGUMENT" in str(e.value.status()), e.value
    triton.close()
