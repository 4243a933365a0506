"""`dynaroute train digits` then `dynaroute eval`, as a user runs them: the must-shows of
issues 2 and 3 on the test split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Alone, training takes well under 3 minutes; the limits leave room for a machine shared with other work.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "dynaroute", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=2200, check=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("e2e")
    train = run_cli("train", "digits", "--out", "tmp", cwd=work)
    assert "wrote bundle 'digits'" in train.stdout
    out = run_cli("eval", "tmp", "--json", cwd=work)
    return json.loads(out.stdout), work / "tmp"


def test_eval_lists_every_subnet_with_the_issue_2_fields(report: tuple[dict, Path]) -> None:
    r, _ = report
    assert len(r["subnets"]) == 12
    for s in r["subnets"]:
        assert {"name", "width", "depth", "path", "params", "flops", "val_accuracy", "test_accuracy"} <= set(s)
    assert r["full_flops"] == max(s["flops"] for s in r["subnets"])


def test_full_and_smallest_subnets_are_accurate(report: tuple[dict, Path]) -> None:
    subnets = {s["name"]: s for s in report[0]["subnets"]}
    assert subnets["w1-d3-p0"]["test_accuracy"] >= 0.97
    assert subnets["w0.25-d1-p0"]["test_accuracy"] >= 0.90


def test_dynamic_model_near_full_accuracy_spends_at_most_40_percent_router_included(
    report: tuple[dict, Path],
) -> None:
    r, _ = report
    full = next(s for s in r["subnets"] if s["name"] == "w1-d3-p0")["test_accuracy"]
    assert [d["budget"] for d in r["dynamic"]] == [0, 0.25, 0.5, 0.75, 1]
    for d in r["dynamic"]:
        assert {"budget", "policy", "accuracy", "mean_flops", "flops_ratio"} <= set(d)
        assert d["mean_flops"] >= r["router"]["flops"]  # the router is paid on every request
    near = [d for d in r["dynamic"] if d["accuracy"] >= full - 0.003]
    assert near, f"no budget within 0.3 points of the full model's {full}: {r['dynamic']}"
    assert min(d["flops_ratio"] for d in near) <= 0.40
    o = r["oracle"]
    assert {"accuracy", "mean_flops", "flops_ratio"} <= set(o)
    # the bound no router beats: at least as accurate as any budget, and cheaper than the near-full ones
    assert o["accuracy"] >= max(full, *(d["accuracy"] for d in r["dynamic"]))
    assert o["flops_ratio"] < min(d["flops_ratio"] for d in near)
    assert 0 < o["savings_share_reached"] <= 1


def test_dynamic_curve_is_at_or_above_the_static_frontier(report: tuple[dict, Path]) -> None:
    r, _ = report
    check = r["frontier_check"]
    smallest = min(s["flops"] for s in r["subnets"])
    assert check["to_flops"] == r["full_flops"]
    # The dynamic model pays its router, so it starts just above the smallest subnet.
    assert check["from_flops"] <= smallest + r["router"]["flops"] + 1
    assert check["ok"], check


def test_eval_writes_the_plot_and_the_report(report: tuple[dict, Path]) -> None:
    r, bundle = report
    png = bundle / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert json.loads((bundle / "report.json").read_text())["dynamic"] == r["dynamic"]
