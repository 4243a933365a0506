"""Placement and fallback choice, without Ray: which actor holds what, and where a route goes
when its expert is down."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from dynaroute.config import EngineConfig, PlacementConfig
from dynaroute.gateway.dispatch import Dispatcher, ExpertPool

FLOPS = {"a-p0": 10, "b-p0": 100, "c-p0": 300, "d-p0": 1000, "a-p1": 12, "b-p1": 900}


def test_default_placement_puts_every_subnet_on_every_replica_so_any_budget_uses_every_actor():
    p = PlacementConfig.default(list(FLOPS.items()), num_actors=2, num_cpus=0.25)
    (actor,) = p.actors
    assert actor.subnets == ("a-p0", "a-p1", "b-p0", "c-p0", "b-p1", "d-p0")  # cheapest first
    assert actor.replicas == 2 and actor.num_cpus == 0.25
    p.check_subnets(list(FLOPS))


def test_dealt_placement_deals_subnets_by_cost_onto_few_fractional_actors():
    p = PlacementConfig.dealt(list(FLOPS.items()), num_actors=2, num_cpus=0.25)
    assert [a.subnets for a in p.actors] == [("a-p0", "b-p0", "b-p1"), ("a-p1", "c-p0", "d-p0")]
    assert all(a.num_cpus == 0.25 and a.replicas == 1 for a in p.actors)
    p.check_subnets(list(FLOPS))


def test_placement_file_and_its_errors_name_the_field(tmp_path):
    f = tmp_path / "placement.json"
    f.write_text(json.dumps({"actors": [
        {"name": "small", "subnets": ["a-p0"], "replicas": 2, "num_cpus": 0.5, "resources": {"node2": 0.01}},
        {"name": "big", "subnets": ["d-p0"], "num_gpus": 0.5},
    ]}))
    p = PlacementConfig.from_file(f)
    assert p.subnets == {"a-p0": "small", "d-p0": "big"} and p.actors[0].replicas == 2
    with pytest.raises(ValueError, match="not placed"):
        p.check_subnets(["a-p0", "d-p0", "b-p0"])
    with pytest.raises(ValueError, match="unknown subnets"):
        p.check_subnets(["a-p0"])
    with pytest.raises(ValueError, match="replicas"):
        PlacementConfig.from_dict({"actors": [{"name": "x", "subnets": ["a"], "replicas": 0}]})
    with pytest.raises(ValueError, match="both"):
        PlacementConfig.from_dict({"actors": [{"name": "x", "subnets": ["a"]}, {"name": "y", "subnets": ["a"]}]})
    with pytest.raises(ValueError, match="unexpected keyword"):
        PlacementConfig.from_dict({"actors": [{"name": "x", "subnets": ["a"], "gpus": 1}]})
    with pytest.raises(ValueError, match="max_wait_ms"):
        EngineConfig(max_wait_ms=-1)
    with pytest.raises(ValueError, match="max_queue_size"):
        EngineConfig(max_queue_size=0)


def test_fallback_is_the_nearest_available_subnet_by_flops_on_the_same_path():
    small = ExpertPool("small", ["a-p0", "b-p0", "a-p1"], [object()])
    big = ExpertPool("big", ["c-p0", "d-p0", "b-p1"], [object()])
    d = Dispatcher([small, big], FLOPS, {n: int(n[-1]) for n in FLOPS})
    assert d.resolve("d-p0") == "d-p0"
    big.replicas[0].up = False  # as after the actor died
    assert d.resolve("d-p0") == "b-p0"  # closest FLOPs among what is up, same path
    assert d.resolve("c-p0") == "b-p0"
    assert d.resolve("b-p1") == "a-p1"  # never another path
    assert d.resolve("a-p0") == "a-p0"
    assert d.resolve("a-p0", exclude={"small"}) is None  # nothing left on path 0


class _Remote:
    """A replica's `run_groups.remote` for the pool (no Ray in unit tests): each group's answer is
    its rows' first values as logits, its group size as depth and its subnet's length as FLOPs."""

    def __init__(self) -> None:
        self.calls: list[list] = []

    async def remote(self, groups: list) -> list:
        self.calls.append(groups)
        return [(rows[:, :1].astype(np.float32), np.full(len(rows), len(rows)), np.full(len(rows), len(subnet)))
                for subnet, rows, _, _ in groups]


class _Handle:
    def __init__(self) -> None:
        self.run_groups = _Remote()


def test_rows_split_into_groups_by_the_codec_go_in_one_call_and_come_back_in_order():
    handle = _Handle()
    # The codec's split: rows whose value is below 5 apart from the others.
    pool = ExpertPool("e", ["a-p0", "bb-p0"], [handle], groups=lambda rows: [
        [i for i, r in enumerate(rows) if r[0] < 5], [i for i, r in enumerate(rows) if r[0] >= 5]])
    values = [1, 7, 2, 8, 9, 3]
    items = [("a-p0" if v != 3 else "bb-p0", np.array([v]), np.inf, 1) for v in values]
    results = asyncio.run(pool.run_items(items))
    assert [float(r[0][0]) for r in results] == values
    assert [r[1] for r in results] == [2, 3, 2, 3, 3, 1]  # group sizes: {1, 2}, {7, 8, 9}, {3} alone
    assert [r[2] for r in results] == [4, 4, 4, 4, 4, 5]
    assert len(handle.run_groups.calls) == 1 and len(handle.run_groups.calls[0]) == 3
