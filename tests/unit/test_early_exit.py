"""ExpertWorker without Ray: batched early exit leaves each row at its first confident exit,
answers as the subnet of that depth would, charges that depth's measured FLOPs, and compacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynaroute.bundle import Bundle, save_weights, write_manifest
from dynaroute.experts.actor import ExpertWorker
from dynaroute.experts.mlp import MLPConfig, SlimmableMLP
from dynaroute.training.evaluate import describe_subnets

DEEP = "w0.5-d3-p0"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained three-block MLP bundle: fast, and its exits disagree in confidence."""
    torch.manual_seed(0)
    cfg = MLPConfig(in_features=16, hidden=32, widths=(0.5, 1.0), dropout=0.0, input_scale=1.0)
    model = SlimmableMLP(cfg).eval()
    root = tmp_path_factory.mktemp("tiny")
    save_weights(model, root / "supernet.safetensors")
    subnets = describe_subnets(model, torch.zeros(1, 16), {}, {}, measure_latency=False)
    write_manifest(root, {
        "name": "tiny",
        "task": {"kind": "classification", "labels": [str(i) for i in range(10)]},
        "input": {"kind": "tensor", "dtype": "float32", "shape": [16]},
        "supernet": {"family": SlimmableMLP.family, "config": cfg.to_dict(), "weights": "supernet.safetensors"},
        "subnets": subnets,
        "full_subnet": model.full_spec.name,
    })
    return root


@pytest.fixture(scope="module")
def worker(tiny_bundle: Path) -> ExpertWorker:
    return ExpertWorker(str(tiny_bundle), [DEEP, "w0.5-d1-p0", "w0.5-d2-p0"])


def _inputs(n: int = 64) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 3, (n, 16)).astype(np.float32)


def _exit_confidences(worker: ExpertWorker, x: np.ndarray) -> np.ndarray:
    exits = worker.modules[DEEP].forward_exits(torch.from_numpy(x))
    return np.stack([torch.softmax(e, -1).amax(-1).detach().numpy() for e in exits], 1)  # [N, 3]


def test_rows_leave_at_first_confident_exit_with_that_depths_answer(worker: ExpertWorker, tiny_bundle: Path):
    x = _inputs()
    conf = _exit_confidences(worker, x)
    bound = float(np.median(conf[:, 0]))  # about half the rows leave at the first exit
    logits, depth, flops = worker.run(DEEP, x, bound)

    confident = conf >= bound
    expected = np.where(confident[:, 0], 1, np.where(confident[:, 1], 2, 3))
    np.testing.assert_array_equal(depth, expected)
    assert set(depth) >= {1, 3}, "the test data should exercise both early and late exits"

    bundle = Bundle.load(tiny_bundle)
    for d in (1, 2, 3):  # each row's answer is what the subnet of its exit depth gives
        rows = depth == d
        if rows.any():
            ref = bundle.extract(f"w0.5-d{d}-p0")(torch.from_numpy(x[rows])).detach().numpy()
            np.testing.assert_allclose(logits[rows], ref, rtol=1e-5, atol=1e-5)
    exit_flops = np.asarray(bundle.subnet_info(DEEP)["exit_flops"])
    np.testing.assert_array_equal(flops, exit_flops[depth - 1])


def test_batch_is_compacted_as_rows_leave(worker: ExpertWorker):
    x = _inputs()
    conf = _exit_confidences(worker, x)
    bound = float(np.median(conf[:, 0]))
    module = worker.modules[DEEP]
    seen: list[int] = []
    original = module.stage

    def spy(index, state):
        seen.append(state[0].shape[0])
        return original(index, state)

    module.stage = spy  # type: ignore[method-assign]
    try:
        _, depth, _ = worker.run(DEEP, x, bound)
    finally:
        del module.stage
    assert seen[0] == len(x)
    assert seen[1] == int((depth > 1).sum()) < len(x)
    assert seen[2] == int((depth > 2).sum())


def test_a_single_row_leaves_where_it_would_in_a_batch(worker: ExpertWorker):
    # One row at a time is the concurrency-1 case, which takes a shorter code path.
    x = _inputs(16)
    bound = float(np.median(_exit_confidences(worker, x)[:, 0]))
    logits, depth, flops = worker.run(DEEP, x, bound)
    assert set(depth) >= {1, 3}
    for i in range(len(x)):
        one = worker.run(DEEP, x[i : i + 1], bound)
        np.testing.assert_allclose(one[0], logits[i : i + 1], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(one[1], depth[i : i + 1])
        np.testing.assert_array_equal(one[2], flops[i : i + 1])


def test_no_bound_runs_to_the_last_block_and_per_row_bounds(worker: ExpertWorker, tiny_bundle: Path):
    x = _inputs(8)
    bundle = Bundle.load(tiny_bundle)
    logits, depth, flops = worker.run(DEEP, x, None)
    np.testing.assert_array_equal(depth, 3)
    np.testing.assert_array_equal(flops, bundle.subnet_info(DEEP)["flops"])
    np.testing.assert_allclose(logits, bundle.extract(DEEP)(torch.from_numpy(x)).detach().numpy(), atol=1e-5)

    bounds = np.array([0.0, np.inf] * 4, dtype=np.float32)  # 0: always leave first; inf: never
    _, depth, flops = worker.run(DEEP, x, bounds)
    np.testing.assert_array_equal(depth, [1, 3] * 4)
    info = bundle.subnet_info(DEEP)
    np.testing.assert_array_equal(flops, [info["exit_flops"][0], info["flops"]] * 4)


def test_exits_before_first_exit_are_passed_by(worker: ExpertWorker, tiny_bundle: Path):
    x = _inputs(8)
    info = Bundle.load(tiny_bundle).subnet_info(DEEP)
    # bound 0: every row would leave at exit 1; from exit 2 on they leave at 2, in a batch and alone
    _, depth, flops = worker.run(DEEP, x, 0.0, first_exit=2)
    np.testing.assert_array_equal(depth, 2)
    np.testing.assert_array_equal(flops, info["exit_flops"][1])
    assert list(worker.run(DEEP, x[:1], 0.0, first_exit=2)[1]) == [2]
    # per row: first exits 1, 2, 3 (and one past the last: it still answers at the last exit)
    _, depth, _ = worker.run(DEEP, x[:4], 0.0, first_exit=np.array([1, 2, 3, 9]))
    np.testing.assert_array_equal(depth, [1, 2, 3, 3])
    # a row that leaves at its first allowed exit answers what the subnet of that depth answers there
    logits, _, _ = worker.run(DEEP, x, 0.0, first_exit=3)
    np.testing.assert_allclose(logits, worker.run(DEEP, x, None)[0], rtol=1e-5, atol=1e-6)


def test_run_groups_answers_each_subnet_and_refuses_one_it_does_not_hold(worker: ExpertWorker):
    x = _inputs(4)
    out = worker.run_groups([("w0.5-d1-p0", x[:2], None, 1), ("w0.5-d2-p0", x[2:], np.full(2, np.inf), 1)])
    assert [o[0].shape for o in out] == [(2, 10), (2, 10)]
    assert list(out[1][1]) == [2, 2]
    with pytest.raises(KeyError, match="w1-d3-p0"):
        worker.run("w1-d3-p0", x, None)
