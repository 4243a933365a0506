"""A supernet family the project does not ship (examples/tabular_resnet.py), end to end: trained
briefly by `dynaroute.train` from a CSV, named by import path in the manifest, evaluated (in
process and by `dynaroute eval`), served
by `dynaroute serve` on real local Ray (whose expert actors find the family by that name) and
answered over gRPC, native and KServe, from the raw feature values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from dynaroute.bundle import Bundle
from dynaroute.client import Client
from dynaroute.experts.spec import SubnetSpec
from dynaroute.training.supernet import SupernetTrainConfig
from dynaroute.training.tabular import torch_threads
from examples.tabular_resnet import SlimmableTabularResNet
from examples.train_wine import evaluate, held_out_rows, train_wine

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAMILY = "examples.tabular_resnet:SlimmableTabularResNet"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "wine"
    with torch_threads(1):
        train_wine(out, train_config=SupernetTrainConfig(epochs=20, batch_size=32))
    return out


@pytest.fixture(scope="module")
def test_split(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return held_out_rows(bundle_dir.parent / "wine.csv")


def with_repo_on_path() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="module")
def server(bundle_dir: Path):
    from tests.serving import ServerProcess

    # As a user would: the family's package on PYTHONPATH, which the gateway and, through the
    # Ray it starts, every expert actor inherit.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", with_repo_on_path()["PYTHONPATH"])
        s = ServerProcess.start(bundle_dir)
    yield s
    s.stop()


def test_the_manifest_names_the_family_by_import_path_and_the_input_as_tabular(bundle_dir: Path) -> None:
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m["supernet"]["family"] == FAMILY == SlimmableTabularResNet.family
    assert m["input"]["kind"] == "tabular" and len(m["input"]["features"]) == 13
    assert m["task"]["labels"] == ["class_0", "class_1", "class_2"]
    assert isinstance(Bundle.load(bundle_dir).supernet(), SlimmableTabularResNet)


def test_it_evaluates_from_raw_values_and_the_router_saves_compute(bundle_dir: Path, test_split) -> None:
    bundle = Bundle.load(bundle_dir)
    report = evaluate(bundle, *test_split)
    full = report["subnets"][bundle.full_subnet]
    assert full >= 0.85 and full == pytest.approx(bundle.subnet_info(bundle.full_subnet)["test_accuracy"])
    cheapest = report["dynamic"]["budgets"][0]
    assert cheapest["flops_ratio"] < 0.5 and cheapest["accuracy"] >= 0.8
    # The codec standardises: unstandardised raw values (proline ~ 1000) would give another answer.
    x_raw = test_split[0]
    model = bundle.supernet()
    spec = SubnetSpec.parse(bundle.full_subnet)
    with torch.no_grad():
        encoded = model(torch.as_tensor(bundle.codec().encode(list(x_raw)).batch), spec).argmax(-1).numpy()
        unencoded = model(torch.as_tensor(x_raw), spec).argmax(-1).numpy()
    assert (encoded == test_split[1]).mean() > (unencoded == test_split[1]).mean()


def test_dynaroute_eval_reads_the_recorded_test_rows_and_finds_the_family(bundle_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "dynaroute", "eval", str(bundle_dir), "--json", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=with_repo_on_path(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["labels"] == ["class_0", "class_1", "class_2"]
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_served_on_ray_it_answers_raw_rows_over_grpc(server, bundle_dir: Path, test_split) -> None:
    bundle = Bundle.load(bundle_dir)
    x_raw, y = test_split
    model = bundle.supernet()
    spec = SubnetSpec.parse(bundle.full_subnet)
    with torch.no_grad():
        expected = model(torch.as_tensor(bundle.codec().encode(list(x_raw[:4])).batch), spec).numpy()
    with Client(server.grpc_address, timeout_s=30) as client:
        info = client.get_model()
        assert info.input.kind == "tabular" and list(info.input.shape) == [13]
        pinned = [client.infer(x, subnet=bundle.full_subnet) for x in x_raw[:4]]
        np.testing.assert_allclose([list(r.outputs.logits) for r in pinned], expected, rtol=1e-4, atol=1e-4)
        routed = [client.infer(x, quality=0.0) for x in x_raw]
        assert np.mean([r.outputs.label == t for r, t in zip(routed, y, strict=True)]) >= 0.8
        assert {r.outputs.label_name for r in routed} <= set(bundle.labels)
        assert np.mean([r.cost.flops_ratio for r in routed]) < 0.5
        with pytest.raises(grpc.RpcError) as e:
            client.infer(np.full(13, np.nan, np.float32))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        full = client.infer(x_raw[0], quality=1.0).outputs
        assert full.label_name == bundle.labels[full.label]


def test_kserve_takes_a_batch_of_raw_rows(server, bundle_dir: Path, test_split) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    bundle = Bundle.load(bundle_dir)
    x_raw, y = test_split
    channel = grpc.insecure_channel(server.grpc_address)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name=bundle.name)
        req.inputs.add(name="input", datatype="FP32", shape=[len(x_raw), 13])
        req.raw_input_contents.append(x_raw.astype("<f4").tobytes())
        req.parameters["quality"].double_param = 1.0
        reply = stub.ModelInfer(req, timeout=60)
        labels = np.frombuffer(reply.raw_output_contents[1], "<i8")
        assert labels.shape == (len(y),) and (labels == y).mean() >= 0.85
    finally:
        channel.close()
