"""Batches end to end against the session's real `dynaroute serve` (digits): the native
InferBatch call through the Python clients, `dynaroute infer --batch FILE`, and
`dynaroute models`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from dynaroute.bundle import Bundle
from dynaroute.client import AsyncClient, Client
from dynaroute.data import load_digits_splits
from tests.integration.test_cluster import _metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 12


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynaroute", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return load_digits_splits().test.x[:N].astype(np.float32)


@pytest.fixture(scope="module")
def full_labels(digits_bundle_dir: Path, rows: np.ndarray) -> list[int]:
    """What the full subnet answers for each row, computed here with the extracted module."""
    bundle = Bundle.load(digits_bundle_dir)
    with torch.no_grad():
        out = bundle.extract(bundle.full_subnet)(torch.as_tensor(rows))
    logits = out[-1] if isinstance(out, list | tuple) else out
    return [int(v) for v in logits.argmax(-1)]


def test_native_batch_answers_every_row_in_order(digits_server, digits_bundle_dir: Path, rows: np.ndarray,
                                                 full_labels: list[int]) -> None:  # noqa: ANN001
    bundle = Bundle.load(digits_bundle_dir)
    with Client(digits_server.grpc_address) as client:
        reply = client.infer_batch(rows, id="b", subnet=bundle.full_subnet)
        one = client.infer(rows[5], subnet=bundle.full_subnet)
    assert reply.model == bundle.name and reply.id == "b"
    assert len(reply.rows) == N
    assert [r.WhichOneof("result") for r in reply.rows] == ["reply"] * N
    assert [r.reply.id for r in reply.rows] == [f"b/{i}" for i in range(N)]
    assert [r.reply.outputs.label for r in reply.rows] == full_labels
    assert all(list(r.reply.route.subnets) == [bundle.full_subnet] for r in reply.rows)
    assert all(r.reply.cost.full_flops == bundle.full_flops for r in reply.rows)
    # A row of a batch answers as the same example sent alone does.
    np.testing.assert_allclose(reply.rows[5].reply.outputs.logits, one.outputs.logits, rtol=1e-5, atol=1e-5)


def test_native_batch_routes_each_row_and_async_client_sends_batches(digits_server, rows: np.ndarray) -> None:  # noqa: ANN001
    async def send() -> list:
        async with AsyncClient(digits_server.grpc_address) as client:
            return list(await asyncio.gather(client.infer_batch(rows, quality=0.0), client.infer_batch(rows[:3])))

    routed, default = asyncio.run(send())
    assert len(routed.rows) == N and len(default.rows) == 3
    for r in [*routed.rows, *default.rows]:
        assert r.WhichOneof("result") == "reply"
        assert r.reply.route.subnets and r.reply.cost.router_flops > 0  # the router ran for each row


def test_a_bad_row_answers_alone_and_a_bad_batch_is_refused_whole(digits_server, rows: np.ndarray) -> None:  # noqa: ANN001
    bad = rows.copy()
    bad[3, 0] = np.nan
    with Client(digits_server.grpc_address) as client:
        reply = client.infer_batch(bad, quality=0.5)
        assert [r.WhichOneof("result") for r in reply.rows] == ["reply"] * 3 + ["error"] + ["reply"] * (N - 4)
        error = reply.rows[3].error
        assert error.code_name == "INVALID_ARGUMENT" and error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "NaN" in error.message

        refused = [
            (lambda: client.infer_batch(rows[:, :10]), grpc.StatusCode.INVALID_ARGUMENT, "tensor.shape"),
            (lambda: client.infer_batch(rows[0]), grpc.StatusCode.INVALID_ARGUMENT, "[N, 64]"),
            (lambda: client.infer_batch(rows.astype(np.float64)), grpc.StatusCode.INVALID_ARGUMENT, "tensor.dtype"),
            (lambda: client.infer_batch(texts=["a sentence"]), grpc.StatusCode.INVALID_ARGUMENT, "expects a tensor"),
            (lambda: client.infer_batch(rows, model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
            # N examples sent to the one-example call: pointed at the batch call.
            (lambda: client.infer(rows[:2]), grpc.StatusCode.INVALID_ARGUMENT, "send several with InferBatch"),
            (lambda: client.infer_batch(rows, quality=3.0), grpc.StatusCode.INVALID_ARGUMENT, "quality"),
            # More rows than the server ever admits at once: refused whole, naming the flag.
            (lambda: client.infer_batch(np.repeat(rows[:1], 1025, axis=0)), grpc.StatusCode.INVALID_ARGUMENT,
             "--max-queue-size"),
        ]
        for call, code, words in refused:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == code and words in e.value.details(), e.value.details()


def test_a_batch_counts_as_one_request_and_n_rows(digits_server, rows: np.ndarray) -> None:  # noqa: ANN001
    labels = {"model": "digits", "api": "native", "status": "ok"}

    def counts() -> tuple[float, float]:
        requests = _metric(digits_server.metrics_address, "dynaroute_requests_total", **labels) or 0.0
        return requests, _metric(digits_server.metrics_address, "dynaroute_rows_total", **labels) or 0.0

    before = counts()
    with Client(digits_server.grpc_address) as client:
        client.infer_batch(rows, quality=0.5)
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (1, N)


# ---- dynaroute infer --batch ------------------------------------------------------------------


def _labels_of(lines: list[str]) -> list[int]:
    out = []
    for i, line in enumerate(lines):
        assert line.startswith(f"row {i}: label "), line
        out.append(int(line.split()[3]))
    return out


def test_infer_batch_files_print_one_line_per_row_in_order(digits_server, digits_bundle_dir: Path, tmp_path: Path,
                                                           rows: np.ndarray, full_labels: list[int]) -> None:  # noqa: ANN001
    pin = ("--subnet", Bundle.load(digits_bundle_dir).full_subnet)
    np.save(tmp_path / "x.npy", rows)
    header = ",".join(f"pixel{i}" for i in range(rows.shape[1]))
    (tmp_path / "x.csv").write_text(header + "\n" + "\n".join(",".join(f"{v:g}" for v in r) for r in rows) + "\n")
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r.tolist()) for r in rows) + "\n")
    for name, extra in [("x.npy", ()), ("x.csv", ()), ("x.jsonl", ("--batch-size", "5"))]:  # 5: three calls
        done = cli("infer", "--address", digits_server.grpc_address, "--batch", str(tmp_path / name), *pin, *extra)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == N and _labels_of(lines) == full_labels, (name, lines)
        assert all("route w1-d3-p0" in line and "of full" in line for line in lines)

    done = cli("infer", "--address", digits_server.grpc_address, "--batch", str(tmp_path / "x.npy"), "--json",
               "--quality", "0.5", "--batch-size", "7")
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["row"] for r in replies] == list(range(N))
    assert all(isinstance(r["reply"]["cost"]["total_flops"], int) and r["reply"]["route"]["subnets"] for r in replies)


def test_infer_batch_says_which_rows_failed(digits_server, tmp_path: Path, rows: np.ndarray) -> None:  # noqa: ANN001
    bad = rows.copy()
    bad[2, 5] = np.inf
    bad[9, 0] = 1e9  # far outside the training range
    np.save(tmp_path / "bad.npy", bad)
    done = cli("infer", "--address", digits_server.grpc_address, "--batch", str(tmp_path / "bad.npy"),
               "--batch-size", "4")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == N  # every row answered, in order, the bad ones with their error
    assert lines[2].startswith("row 2: error INVALID_ARGUMENT: ") and "NaN or Inf" in lines[2]
    assert lines[9].startswith("row 9: error INVALID_ARGUMENT: ") and "outside" in lines[9]
    assert all(lines[i].startswith(f"row {i}: label ") for i in range(N) if i not in (2, 9))
    assert "dynaroute infer: 2 of 12 rows failed (rows 2, 9)" in done.stderr


def test_infer_batch_refuses_a_bad_file_before_sending(digits_server, tmp_path: Path, rows: np.ndarray) -> None:  # noqa: ANN001
    text = "\n".join(",".join(f"{v:g}" for v in r) for r in rows[:3])
    (tmp_path / "bad.csv").write_text(text + "\n1,2,3\n")
    done = cli("infer", "--address", digits_server.grpc_address, "--batch", str(tmp_path / "bad.csv"))
    assert done.returncode == 2 and done.stdout == ""
    assert "row 3 (line 4): 3 values" in done.stderr and "expected shape [64]" in done.stderr
    assert "Traceback" not in done.stderr


# ---- dynaroute models ---------------------------------------------------------------------------


def test_models_prints_input_labels_subnets_and_budgets(digits_server, digits_bundle_dir: Path) -> None:  # noqa: ANN001
    bundle = Bundle.load(digits_bundle_dir)
    done = cli("models", digits_server.grpc_address)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"model {bundle.name}  (classification; ready)")
    assert "input:   tensor float32 [64] per example" in out
    assert "labels:  " + ", ".join(bundle.labels) in out
    for s in bundle.subnet_infos:
        assert f"  {s['name']} " in out
    budgets = out.split("calibrated budgets", 1)[1].splitlines()[2:]
    assert [float(line.split()[0]) for line in budgets] == [0, 0.25, 0.5, 0.75, 1]
    # Quality 1 is the full model's point (at least the full model's accuracy).
    assert int(budgets[-1].split()[3].replace(",", "")) >= bundle.full_flops

    done = cli("models", digits_server.grpc_address, "--json")
    assert done.returncode == 0, done.stderr
    (model,) = json.loads(done.stdout)
    assert model["name"] == bundle.name and model["labels"] == bundle.labels
    assert [s["name"] for s in model["subnets"]] == [s["name"] for s in bundle.subnet_infos]
    assert model["input"]["shape"] == [64] and model["full_flops"] == bundle.full_flops
    assert {p["policy"] for p in model["calibration"]} >= {model["default_policy"]}


def test_models_without_a_server_is_one_line(tmp_path: Path) -> None:
    done = cli("models", "127.0.0.1:1", "--timeout-s", "2")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("dynaroute models: UNAVAILABLE: ") and len(done.stderr.splitlines()) == 1
