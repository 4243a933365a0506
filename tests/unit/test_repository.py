"""The model repository's bookkeeping (gateway.repository) with stand-in engines: which engine
a request gets while models load, are replaced and unload, that an engine is closed only once
nothing holds it, and the errors a user sees. The real thing (Ray, gRPC, tritonclient) is in
tests/integration/test_repository.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from dynaroute import metrics
from dynaroute.config import EngineConfig
from dynaroute.errors import BundleError, InvalidInputError, ModelNotFoundError, UnavailableError
from dynaroute.gateway.repository import ModelState, Repository, bundles_in


class StandInEngine:
    """What the repository needs of an engine; publishes a replicas gauge as RayEngine does."""

    def __init__(self, path: Path) -> None:
        self.model_name = json.loads((path / "manifest.json").read_text())["name"]
        self.events: list[str] = []
        metrics.REPLICAS_LIVE.labels(self.model_name, "expert-0").set(2)
        metrics.SLO_LEVEL.labels(self.model_name).set(1)  # its SLO controller at the floor

    @property
    def ready(self) -> bool:
        return "drain" not in self.events

    def model_info(self) -> dict[str, Any]:
        return {"input": {"kind": "tensor", "dtype": "float32", "shape": [4]}, "labels": ["no", "yes"]}

    def admit(self, rows: int) -> None: ...

    async def infer(self, request: Any) -> Any: ...

    async def drain(self) -> None:
        self.events.append("drain")

    async def close(self) -> None:
        self.events.append("close")
        metrics.REPLICAS_LIVE.labels(self.model_name, "expert-0").set(0)  # as RayEngine.close does


def write_bundle(folder: Path, name: str) -> None:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": name}))


@pytest.fixture()
def repo_dir(tmp_path: Path) -> Path:
    write_bundle(tmp_path / "alpha", "alpha")
    write_bundle(tmp_path / "beta", "beta")
    (tmp_path / "notes").mkdir()  # a folder without a manifest is not a model
    return tmp_path


def make_repository(root: Path) -> tuple[Repository, list[StandInEngine], list[tuple[str, bool]]]:
    started: list[StandInEngine] = []
    changes: list[tuple[str, bool]] = []

    async def start(path: Path, config: EngineConfig) -> StandInEngine:
        await asyncio.sleep(0.01)  # a load takes time: requests arrive meanwhile
        started.append(StandInEngine(path))
        return started[-1]

    async def on_change(name: str, serving: bool) -> None:
        changes.append((name, serving))

    return Repository(root, EngineConfig(), start, on_change), started, changes


def gauge(model: str) -> dict[str, float]:
    """expert -> dynaroute_expert_replicas_live of `model` (the stand-in has one expert)."""
    value = REGISTRY.get_sample_value("dynaroute_expert_replicas_live", {"model": model, "expert": "expert-0"})
    return {} if value is None else {"expert-0": value}


async def test_every_bundle_of_the_folder_is_served_by_its_own_engine(repo_dir):
    models, started, changes = make_repository(repo_dir)
    await models.load_all()
    assert models.names == ["alpha", "beta"] and len(started) == 2
    with models.use("alpha") as a, models.use("beta") as b:
        assert a.engine is not b.engine and a.name == "alpha" and b.codec.spec.shape == (4,)
    assert {("alpha", True), ("beta", True)} <= set(changes)
    assert [(r.name, r.state) for r in models.index()] == [("alpha", ModelState.READY), ("beta", ModelState.READY)]
    with pytest.raises(InvalidInputError, match=r"several models; expected one of \['alpha', 'beta'\]"):
        models.resolve("")
    with pytest.raises(ModelNotFoundError, match="version"):
        models.get("alpha", "2")
    with pytest.raises(ModelNotFoundError, match="'gamma' is not served here"):
        models.get("gamma")
    assert models.label("gamma") == "unknown" and models.label("alpha") == "alpha"


async def test_a_single_bundle_is_a_repository_of_one(repo_dir):
    models, _, _ = make_repository(repo_dir / "alpha")
    await models.load_all()
    assert models.names == ["alpha"] and models.resolve("") == "alpha" and models.label("") == "alpha"


async def test_replace_routes_new_requests_to_the_new_engine_and_closes_the_old_once_released(repo_dir):
    models, started, _ = make_repository(repo_dir)
    await models.load_all()
    with models.use("alpha") as held:  # a request in flight on the old engine
        old = held.engine
        load = asyncio.create_task(models.load("alpha"))
        while len(started) < 3:
            with models.use("alpha") as m:  # served all along: by the old engine, then the new one
                pass
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        with models.use("alpha") as m:
            assert m.engine is started[2]
        assert old.events == [] and not load.done()  # not drained while the request holds it
    await load
    assert old.events == ["drain", "close"]
    assert started[2].events == []
    assert gauge("alpha") == {"expert-0": 2}  # the old engine's close zeroed the shared series: put back


async def test_unload_refuses_new_requests_finishes_held_ones_then_closes(repo_dir):
    models, started, changes = make_repository(repo_dir)
    await models.load_all()
    beta = models.get("beta").engine
    with models.use("alpha") as held:
        unload = asyncio.create_task(models.unload("alpha"))
        await asyncio.sleep(0.01)
        with pytest.raises(UnavailableError, match="unloading"):
            models.get("alpha")
        with models.use("beta"):  # the other model serves on
            pass
        assert held.engine.events == []
    await unload
    assert started[0].events == ["drain", "close"] and beta.events == []
    assert ("alpha", False) in changes
    with pytest.raises(ModelNotFoundError, match="not loaded .*unloaded.*RepositoryModelLoad"):
        models.get("alpha")
    assert {r.name: (r.state, r.reason) for r in models.index()}["alpha"] == (ModelState.UNAVAILABLE, "unloaded")
    assert [r.name for r in models.index(ready_only=True)] == ["beta"]
    assert gauge("alpha") == {}  # an unloaded model's gauges are gone, not left claiming (or alerting on) replicas
    assert REGISTRY.get_sample_value("dynaroute_slo_level", {"model": "alpha"}) is None  # nor its SLO level
    await models.load("alpha")
    with models.use("alpha") as m:
        assert m.engine is started[2]
    assert gauge("alpha") == {"expert-0": 2}


async def test_loading_names_what_is_wrong(repo_dir):
    models, _, _ = make_repository(repo_dir)
    await models.load_all()
    with pytest.raises(ModelNotFoundError, match="is not a bundle"):
        await models.load("notes")
    with pytest.raises(ModelNotFoundError, match=r"no bundle named 'gamma'.*\['alpha', 'beta'\]"):
        await models.load("gamma")
    assert models.names == ["alpha", "beta"]  # a name a client tried is not remembered
    write_bundle(repo_dir / "gamma-v2", "gamma")  # copied in after the start
    with pytest.raises(ModelNotFoundError, match="folder 'gamma-v2' holds model 'gamma'"):
        await models.load("gamma-v2")
    await models.load("gamma")
    assert models.get("gamma").path == repo_dir / "gamma-v2"
    write_bundle(repo_dir / "beta-copy", "beta")
    with pytest.raises(InvalidInputError, match=r"several folders \['beta', 'beta-copy'\]"):
        await models.load("beta")
    assert models.get("beta").engine.events == []  # a failed replace leaves the model serving
    with pytest.raises(BundleError, match="taken by folder"):
        bundles_in(repo_dir)


def test_a_folder_without_bundles_is_refused(tmp_path):
    with pytest.raises(BundleError, match="neither a bundle"):
        bundles_in(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        bundles_in(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(BundleError, match="is not a folder"):
        bundles_in(tmp_path / "file")


async def test_shutdown_drains_then_closes_every_engine(repo_dir):
    models, started, _ = make_repository(repo_dir)
    await models.load_all()
    await models.drain()
    with pytest.raises(UnavailableError, match="shutting down"):
        models.get("alpha")
    with pytest.raises(UnavailableError):
        await models.load("alpha")
    await models.close()
    assert [e.events for e in started] == [["drain", "close"], ["drain", "close"]]
