"""Triton's classification extension on the real server: a client that asks for the top k
classes of `logits` (tritonclient's `class_count`) gets them as "value:index:label" strings,
with the bundle's label names, over gRPC and over HTTP/REST (binary and JSON)."""

from __future__ import annotations

import numpy as np
import pytest

from dynaroute.bundle import Bundle
from dynaroute.data import load_digits_splits

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("transport", ["grpc", "http-binary", "http-json"])
def test_top_classes_come_back_with_their_label_names(digits_server, digits_bundle_dir, transport):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    labels = Bundle.load(digits_bundle_dir).labels
    x = load_digits_splits().test.x[:4].astype(np.float32)
    triton, address = ((triton_grpc, digits_server.grpc_address) if transport == "grpc"
                       else (triton_http, digits_server.http_address))
    client = triton.InferenceServerClient(address)
    try:
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        binary = {} if transport == "grpc" else {"binary_data": transport == "http-binary"}
        outputs = [triton.InferRequestedOutput("logits", class_count=3, **binary),
                   triton.InferRequestedOutput("label", **binary), triton.InferRequestedOutput("confidence", **binary)]
        result = client.infer(digits_server.model, [inp], outputs=outputs, parameters={"quality": 1.0})
        top, label = result.as_numpy("logits"), result.as_numpy("label")
        assert top.shape == (4, 3)
        for row, answer in zip(top, label, strict=True):
            fields = [e.decode() if isinstance(e, bytes) else e for e in row]
            values = [float(f.split(":")[0]) for f in fields]
            assert values == sorted(values, reverse=True)  # highest first
            _, index, name = fields[0].split(":")
            assert int(index) == answer and name == labels[answer]  # the top class is the answer, by name
    finally:
        client.close()
