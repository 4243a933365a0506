"""RayEngine on a real local Ray: routing, pinning, top-k, early exit, a killed expert under
load, deadlines, overload and draining. Expected outputs are the same subnets run in-process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import ray
import torch
from prometheus_client import REGISTRY

from dynaroute.bundle import Bundle
from dynaroute.config import ActorPlacement, EngineConfig, PlacementConfig
from dynaroute.data import load_digits_splits
from dynaroute.errors import DeadlineError, InvalidInputError, ModelNotFoundError, OverloadedError, UnavailableError
from dynaroute.experts.spec import SubnetSpec
from dynaroute.gateway.engine import RayEngine
from dynaroute.gateway.types import InferRequest
from dynaroute.router.budget import Budget

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

X = load_digits_splits().test.x[:64]


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(local_ray, digits_bundle_dir: Path):
    # Subnets dealt onto actors of one replica each: the fallback tests kill an expert's only replica
    # (the default placement's replicas cover for each other: test_replicas_share_load_...).
    subnets = [(s["name"], int(s["flops"])) for s in Bundle.load(digits_bundle_dir).subnet_infos]
    eng = await RayEngine.start(digits_bundle_dir, EngineConfig(placement=PlacementConfig.dealt(subnets)))
    yield eng
    await eng.close()


def req(engine: RayEngine, i: int, budget: Budget | None = None, **kw) -> InferRequest:
    return InferRequest(engine.model_name, str(i), tensor=X[i % len(X)], budget=budget or Budget(), **kw)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def in_process(bundle: Bundle, subnet: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return bundle.extract(subnet)(torch.from_numpy(np.atleast_2d(x))).numpy()


async def test_routes_at_budgets_answer_like_the_subnet_in_process(engine: RayEngine):
    bundle = engine.bundle
    mean_flops = {}
    for quality in (0.0, 1.0):
        results = await asyncio.gather(*(engine.infer(req(engine, i, Budget(quality=quality))) for i in range(32)))
        for i, r in enumerate(results):
            assert len(r.route.subnets) == 1
            # The answer is the subnet's own, cut at the exit it left at (early exit).
            spec = SubnetSpec.parse(r.route.subnets[0])
            answered_by = SubnetSpec(spec.width, r.route.exit_depths[0], spec.path).name
            np.testing.assert_allclose(r.logits, in_process(bundle, answered_by, X[i])[0], atol=1e-4)
            assert r.label == int(np.argmax(r.logits)) and r.label_name == bundle.labels[r.label]
            assert r.cost.router_flops == engine.router.flops > 0
            assert r.cost.full_flops == bundle.full_flops
            assert r.cost.total_s >= r.cost.queue_s + r.cost.compute_s - 1e-6 > 0
        mean_flops[quality] = np.mean([r.cost.flops for r in results])
    assert mean_flops[0.0] <= mean_flops[1.0]


async def test_pinned_subnet_runs_exactly_that_subnet(engine: RayEngine):
    bundle = engine.bundle
    for info in bundle.subnet_infos:
        name = info["name"]
        before = metric("dynaroute_route_decisions_total", model=engine.model_name, subnet=name)
        results = await asyncio.gather(*(engine.infer(req(engine, i, Budget(subnet=name))) for i in range(4)))
        expected = in_process(bundle, name, X[:4])
        for i, r in enumerate(results):
            assert r.route.subnets == [name] and r.route.fallbacks == []
            np.testing.assert_allclose(r.logits, expected[i], atol=1e-4)
            assert r.cost.expert_flops == info["flops"] and r.cost.router_flops == 0
        assert metric("dynaroute_route_decisions_total", model=engine.model_name, subnet=name) == before + 4


async def test_early_exits_leave_at_confident_exits_and_are_counted(engine: RayEngine):
    model = engine.model_name
    before = {d: metric("dynaroute_exits_total", model=model, depth=str(d)) for d in (1, 2, 3)}
    results = await asyncio.gather(*(engine.infer(req(engine, i, Budget(policy="cascade"))) for i in range(64)))
    depths = [d for r in results for d in r.route.exit_depths]
    after = {d: metric("dynaroute_exits_total", model=model, depth=str(d)) for d in (1, 2, 3)}
    assert sum(after[d] - before[d] for d in after) == sum(1 + r.route.escalations for r in results)
    assert after[1] - before[1] >= sum(r.route.exit_depths[0] == 1 for r in results)
    assert min(depths) < 3, "a trained digits model is confident at an early exit for some inputs"
    for r in results:
        if r.route.escalations == 0:
            info = engine.bundle.subnet_info(r.route.subnets[0])
            assert r.cost.expert_flops == info["exit_flops"][r.route.exit_depths[0] - 1]


async def test_a_cascade_first_exit_passes_shallower_exits_by(local_ray, digits_bundle_dir: Path, tmp_path: Path):
    # the same bundle, its cascade calibrated to leave experts no earlier than exit 2
    root = tmp_path / "first_exit"
    shutil.copytree(digits_bundle_dir, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["calibration"]["options"]["cascade"]["first_exit"] = 2
    (root / "manifest.json").write_text(json.dumps(manifest))
    eng = await RayEngine.start(root, EngineConfig())
    try:
        results = await asyncio.gather(*(eng.infer(req(eng, i, Budget(policy="cascade", quality=0.0)))
                                          for i in range(64)))
    finally:
        await eng.close()
    assert all(r.route.exit_depths[0] >= 2 for r in results)
    for i, r in enumerate(results):
        if r.route.escalations == 0:
            spec = SubnetSpec.parse(r.route.subnets[0])
            info = eng.bundle.subnet_info(spec.name)
            assert r.cost.expert_flops == info["exit_flops"][r.route.exit_depths[0] - 1]
            answered_by = SubnetSpec(spec.width, r.route.exit_depths[0], spec.path).name
            np.testing.assert_allclose(r.logits, in_process(eng.bundle, answered_by, X[i])[0], atol=1e-4)


async def test_bad_requests_are_refused_with_the_right_error(engine: RayEngine):
    refused = {"model": engine.model_name, "api": "kserve", "status": "invalid_argument"}
    invalid_before = metric("dynaroute_requests_total", **refused)
    with pytest.raises(ModelNotFoundError, match="not served"):
        await engine.infer(InferRequest("other", "1", tensor=X[0]))
    with pytest.raises(InvalidInputError, match="shape"):
        await engine.infer(InferRequest(engine.model_name, "1", tensor=np.zeros(63, np.float32)))
    with pytest.raises(InvalidInputError, match="NaN"):
        await engine.infer(InferRequest(engine.model_name, "1", tensor=np.full(64, np.nan, np.float32), api="kserve"))
    assert metric("dynaroute_requests_total", **refused) == invalid_before + 1
    with pytest.raises(InvalidInputError, match="subnet"):
        await engine.infer(req(engine, 0, Budget(subnet="w9-d9-p0")))
    with pytest.raises(InvalidInputError, match="policy"):
        await engine.infer(req(engine, 0, Budget(policy="nonsense")))
    assert (await engine.infer(req(engine, 0))).label >= 0  # still serving


async def test_deadline_raises_deadline_error_and_the_engine_keeps_serving(engine: RayEngine):
    late = {"model": engine.model_name, "api": "native", "status": "deadline_exceeded"}
    before = metric("dynaroute_requests_total", **late)
    with pytest.raises(DeadlineError):
        await engine.infer(req(engine, 0, deadline=time.monotonic() - 0.001))
    with pytest.raises(DeadlineError):
        await engine.infer(req(engine, 0, deadline=time.monotonic() + 0.0001))  # expires in flight
    r = await engine.infer(req(engine, 0, deadline=time.monotonic() + 10))
    assert r.label >= 0
    assert metric("dynaroute_requests_total", **late) == before + 2


async def test_killed_expert_during_a_burst_every_request_is_answered_with_fallbacks(engine: RayEngine):
    model = engine.model_name
    full = engine.bundle.full_subnet
    pool = engine.dispatcher.pool_of[full]
    fallbacks_before = metric("dynaroute_fallbacks_total", model=model, reason="expert_unavailable") + metric(
        "dynaroute_fallbacks_total", model=model, reason="expert_error"
    )
    done = 0
    results = []

    async def client(k: int) -> None:
        nonlocal done
        while done < 500:
            i = done
            done += 1
            results.append(await engine.infer(req(engine, i, Budget(subnet=full))))

    async def killer() -> None:
        while done < 100:
            await asyncio.sleep(0.001)
        ray.kill(pool.replicas[0].handle, no_restart=False)  # Ray restarts it

    await asyncio.wait_for(asyncio.gather(killer(), *(client(k) for k in range(16))), timeout=60)
    assert len(results) == 500  # every request answered: none lost, none hanging
    used = [r for r in results if r.route.fallbacks]
    assert used, "requests sent while the expert was down fall back to another subnet"
    for r in used:
        (fb,) = r.route.fallbacks
        wanted, got = fb.split("->")
        assert wanted == full and r.route.subnets == [got] and got not in pool.subnets
        assert engine.bundle.subnet_info(got)["path"] == engine.bundle.subnet_info(full)["path"]
    fallbacks_after = metric("dynaroute_fallbacks_total", model=model, reason="expert_unavailable") + metric(
        "dynaroute_fallbacks_total", model=model, reason="expert_error"
    )
    assert fallbacks_after - fallbacks_before == len(used)

    # Ray restarts the actor; the pool takes it back and the pinned subnet is served again.
    for _ in range(600):
        if pool.live == 1:
            break
        await asyncio.sleep(0.1)
    assert pool.live == 1
    assert metric("dynaroute_expert_replicas_live", model=model, expert=pool.name) == 1
    r = await engine.infer(req(engine, 0, Budget(subnet=full)))
    assert r.route.subnets == [full] and r.route.fallbacks == []


async def test_replicas_share_load_and_cover_for_a_killed_one(local_ray, digits_bundle_dir: Path):
    names = [s["name"] for s in Bundle.load(digits_bundle_dir).subnet_infos]
    placement = PlacementConfig((ActorPlacement("all", tuple(names), replicas=2, num_cpus=0.1),))
    eng = await RayEngine.start(digits_bundle_dir, EngineConfig(placement=placement))
    try:
        (pool,) = eng.dispatcher.pools.values()
        assert pool.live == 2 and metric("dynaroute_expert_replicas_live", model=eng.model_name, expert="all") == 2
        full = eng.bundle.full_subnet
        results = []
        killed = pool.replicas[0].handle
        pid_before = await killed.__ray_call__.remote(lambda self: os.getpid())

        async def client() -> None:
            while len(results) < 200:
                results.append(await eng.infer(req(eng, len(results), Budget(subnet=full))))

        async def killer() -> None:
            while len(results) < 50:
                await asyncio.sleep(0.001)
            ray.kill(killed, no_restart=False)

        await asyncio.wait_for(asyncio.gather(killer(), *(client() for _ in range(16))), timeout=60)
        # The other replica answered everything: no request lost, no fallback needed. (Whether the
        # pool saw the death depends on scheduling: Ray queues calls for an actor it is restarting.)
        assert len(results) >= 200 and all(r.route.subnets == [full] and not r.route.fallbacks for r in results)
        # The killed replica came back as a new process, and the pool holds both again.
        pid_after = None
        for _ in range(600):
            try:
                pid_after = await killed.__ray_call__.remote(lambda self: os.getpid())
                break
            except ray.exceptions.ActorUnavailableError:  # still restarting
                await asyncio.sleep(0.1)
        assert pid_after is not None and pid_after != pid_before
        for _ in range(600):
            if pool.live == 2:
                break
            await asyncio.sleep(0.1)
        assert pool.live == 2
    finally:
        await eng.close()


async def test_topk_sums_path_logits_by_weight(local_ray, digits_paths_bundle_dir: Path):
    eng = await RayEngine.start(digits_paths_bundle_dir, EngineConfig())
    try:
        bundle = eng.bundle
        results = await asyncio.gather(*(eng.infer(req(eng, i, Budget(policy="topk"))) for i in range(32)))
        multi = [(i, r) for i, r in enumerate(results) if len(r.route.subnets) > 1]
        assert multi, "top-k over two paths should combine both branches"
        for i, r in multi:
            paths = {bundle.subnet_info(s)["path"] for s in r.route.subnets}
            assert len(paths) == len(r.route.subnets)
            pairs = zip(r.route.subnets, r.route.weights, strict=True)
            expected = sum(w * in_process(bundle, s, X[i])[0] for s, w in pairs)
            np.testing.assert_allclose(r.logits, expected, atol=1e-4)
            assert r.cost.expert_flops == sum(bundle.subnet_info(s)["flops"] for s in r.route.subnets)
    finally:
        await eng.close()


async def test_overload_then_drain(local_ray, digits_bundle_dir: Path):
    config = EngineConfig(max_batch_size=1, max_queue_size=2, max_inflight_batches=1, default_num_actors=1)
    eng = await RayEngine.start(digits_bundle_dir, config)
    try:
        full = eng.bundle.full_subnet
        outcomes = await asyncio.gather(
            *(eng.infer(req(eng, i, Budget(subnet=full))) for i in range(40)), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert refused and all(isinstance(o, OverloadedError) for o in refused)
        assert len(refused) < len(outcomes)  # the queue's worth was served

        inflight = [asyncio.ensure_future(eng.infer(req(eng, i, Budget(subnet=full)))) for i in range(3)]
        await asyncio.sleep(0)
        drained = asyncio.ensure_future(eng.drain())
        await asyncio.sleep(0)
        assert not eng.ready
        with pytest.raises(UnavailableError, match="shutting down"):
            await eng.infer(req(eng, 0))
        results = await asyncio.gather(*inflight)  # the in-flight ones finish
        assert all(r.route.subnets == [full] for r in results)
        await asyncio.wait_for(drained, 10)
    finally:
        await eng.close()
