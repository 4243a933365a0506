"""The router of a trained digits bundle: its cost, its scores, and the routes it plans."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dynaroute.bundle import Bundle
from dynaroute.data import load_digits_splits
from dynaroute.errors import BundleError, InvalidInputError
from dynaroute.experts.flops import count_flops
from dynaroute.router.budget import Budget
from dynaroute.router.runtime import RouterRuntime


@pytest.fixture(scope="module")
def bundle(digits_bundle_dir: Path) -> Bundle:
    return Bundle.load(digits_bundle_dir)


@pytest.fixture(scope="module")
def runtime(bundle: Bundle) -> RouterRuntime:
    return RouterRuntime.from_bundle(bundle)


@pytest.fixture(scope="module")
def test_x() -> torch.Tensor:
    return torch.as_tensor(load_digits_splits().test.x[:64])


def test_router_costs_at_most_a_tenth_of_the_full_model_measured(bundle: Bundle, runtime: RouterRuntime,
                                                                 test_x: torch.Tensor) -> None:
    assert runtime.flops == bundle.manifest["router"]["flops"] == count_flops(runtime.router, test_x[:1])
    assert 0 < runtime.flops <= 0.10 * bundle.full_flops


def test_score_gives_probabilities_per_subnet_and_a_gate(bundle: Bundle, runtime: RouterRuntime,
                                                         test_x: torch.Tensor) -> None:
    correct, gate = runtime.score(test_x)
    assert runtime.subnet_names == [s["name"] for s in bundle.subnet_infos]
    assert correct.shape == (64, len(runtime.subnet_names)) and gate.shape == (64, 1)
    assert ((correct >= 0) & (correct <= 1)).all()
    assert np.allclose(gate.sum(1), 1.0)
    # The router has learnt that bigger subnets are more often right: the full subnet scores
    # at least as high as the smallest on average.
    full, small = runtime.subnet_names.index(bundle.full_subnet), runtime.subnet_names.index("w0.25-d1-p0")
    assert correct[:, full].mean() >= correct[:, small].mean()


def test_numpy_input_scores_as_the_torch_router_does(runtime: RouterRuntime, test_x: torch.Tensor) -> None:
    # The gateway passes numpy rows, which the MLP router scores without torch.
    assert runtime.router.numpy_forward() is not None
    for rows in (test_x[:1], test_x):
        c_np, g_np = runtime.score(rows.numpy())
        c_t, g_t = runtime.score(rows)
        assert c_np.dtype == c_t.dtype and g_np.shape == g_t.shape
        np.testing.assert_allclose(c_np, c_t, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_np, g_t, rtol=1e-5, atol=1e-6)


def test_plan_pins_a_subnet_and_refuses_unknown_subnets_and_policies(runtime: RouterRuntime,
                                                                     test_x: torch.Tensor) -> None:
    correct, gate = runtime.score(test_x[:1])
    route = runtime.plan(Budget(subnet="w0.5-d2-p0"), correct[0], gate[0])
    assert route.subnets == ("w0.5-d2-p0",) and route.weights == (1.0,)
    with pytest.raises(InvalidInputError, match="unknown subnet 'w9-d9-p0'"):
        runtime.plan(Budget(subnet="w9-d9-p0"), correct[0], gate[0])
    with pytest.raises(InvalidInputError, match="unknown policy"):
        runtime.plan(Budget(quality=0.5, policy="greedy"), correct[0], gate[0])


def test_plan_follows_the_budget_through_the_calibration_table(bundle: Bundle, runtime: RouterRuntime) -> None:
    table = bundle.manifest["calibration"]["tables"]
    correct, gate = runtime.score(torch.as_tensor(load_digits_splits().val.x))
    flops = dict(zip(runtime.subnet_names, runtime.subnet_flops, strict=True))
    for policy in ("threshold", "cascade", "topk"):
        assert table[policy], policy
        route = runtime.plan(Budget(quality=1.0, policy=policy), correct[0], gate[0])
        assert route.policy == policy and set(route.subnets) <= set(runtime.subnet_names)
    cheap = [runtime.plan(Budget(quality=0.0, policy="threshold"), c, g) for c, g in zip(correct, gate, strict=True)]
    best = [runtime.plan(Budget(quality=1.0, policy="threshold"), c, g) for c, g in zip(correct, gate, strict=True)]
    assert np.mean([flops[r.subnets[0]] for r in cheap]) <= np.mean([flops[r.subnets[0]] for r in best])
    # a FLOPs budget below every calibrated point still routes, to the cheapest point
    assert runtime.resolve(Budget(max_flops=1.0)).reachable is False
    assert runtime.resolve(Budget(max_flops=1.0)).point == runtime.resolve(Budget(quality=0.0)).point


def test_a_bundle_without_a_router_or_with_mismatched_router_weights_is_refused(digits_bundle_dir: Path,
                                                                                 tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(digits_bundle_dir, copy)
    save_file({"hidden.weight": torch.zeros(3, 3)}, str(copy / "router.safetensors"))
    with pytest.raises(BundleError, match="router"):
        RouterRuntime.from_bundle(Bundle.load(copy))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["router"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no router"):
        RouterRuntime.from_bundle(Bundle.load(copy))


@pytest.mark.slow
def test_topk_runs_two_paths_weighted_by_the_gate(digits_paths_bundle_dir: Path) -> None:
    runtime = RouterRuntime.from_bundle(Bundle.load(digits_paths_bundle_dir))
    correct, gate = runtime.score(torch.as_tensor(load_digits_splits().test.x[:8]))
    assert gate.shape == (8, 2) and np.allclose(gate.sum(1), 1.0)
    route = runtime.plan(Budget(quality=1.0, policy="topk"), correct[0], gate[0])
    assert len(route.subnets) == 2
    assert {n.rsplit("-", 1)[1] for n in route.subnets} == {"p0", "p1"}
    assert sum(route.weights) == pytest.approx(1.0)
    assert route.weights[0] >= route.weights[1]  # the gate's favourite path first
