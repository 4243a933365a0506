"""The model repository: the bundles of one folder, each served by an engine of its own, by name.

`dynaroute serve DIR` serves a repository: DIR is one bundle (it holds manifest.json) or a
folder of bundles (each sub-folder that holds a manifest.json; others are not models). A model
is named by its manifest's `name`, and has one version, "1". The servicers look a model up for
each request (`Repository.use`), and the model-repository calls load, replace and unload
models while the others keep serving:

- load starts the model's engine (its router here, its experts on Ray) and then routes to it;
- replace (load of a loaded model) starts the new engine beside the old one, routes new
  requests to the new one, then drains the old one (its in-flight requests finish) and closes
  it: no request of the model is refused on the way;
- unload stops routing to the model (new requests are UNAVAILABLE while it drains, NOT_FOUND
  after), lets its in-flight requests finish, then closes its engine.

A request holds a lease on its model for as long as it runs (all rows of a KServe batch under
one lease), so a model is closed only once nothing uses it. Loads and unloads of one name take
turns; those of different names run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dynaroute import metrics
from dynaroute.bundle import MANIFEST
from dynaroute.codec import codec_for
from dynaroute.config import EngineConfig
from dynaroute.errors import BundleError, InvalidInputError, ModelNotFoundError, UnavailableError, shown
from dynaroute.gateway.types import Engine

log = logging.getLogger(__name__)

VERSION = "1"  # every model has one version (KServe's model_version, Triton's index)

# Starts the engine of the bundle at a path (RayEngine.start in the server; a stand-in in tests).
EngineStarter = Callable[[Path, EngineConfig], Awaitable[Engine]]
# Told when a model starts or stops serving (the server sets its gRPC health status).
OnChange = Callable[[str, bool], Awaitable[None]]


class ModelState(StrEnum):
    """A model's state, as Triton's repository index names it."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"  # not loaded: never, unloaded, or its load failed (`reason` says)


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index."""

    name: str
    version: str
    state: ModelState
    reason: str = ""


class Model:
    """A loaded model: its engine, its input codec (built once, for the servicers' checks; the
    engine encodes) and the requests that hold it."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self.engine = engine
        self.path = path
        self.name = engine.model_name
        info = engine.model_info()
        self.codec = codec_for(info["input"])
        self.labels: tuple[str, ...] = tuple(info["labels"])
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def acquire(self) -> None:
        self._leases += 1
        self._idle.clear()

    def release(self) -> None:
        self._leases -= 1
        if self._leases == 0:
            self._idle.set()

    async def drain(self) -> None:
        """Wait until no request holds this model, then until its engine has none in flight."""
        await self._idle.wait()
        await self.engine.drain()


@dataclass
class _Entry:
    """A model name the repository knows, loaded or not."""

    name: str
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = "not loaded"
    model: Model | None = None  # the engine requests go to (READY only)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one load or unload of this name at a time


@dataclass(frozen=True)
class Scan:
    """What the repository folder holds: bundle name -> folder, and folders that are not usable
    bundles (folder name -> why)."""

    bundles: dict[str, Path]
    problems: dict[str, str]


def scan_folder(root: Path) -> Scan:
    """The bundles of `root`: itself when it holds a manifest, else each sub-folder that does.
    Only the manifests are read (their `name`); `Bundle.load` checks the rest when loading."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise BundleError(f"{str(root)!r} {what}; expected a bundle or a folder of bundles")
    folders = [root] if (root / MANIFEST).is_file() else sorted(
        p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()
    )
    bundles: dict[str, Path] = {}
    problems: dict[str, str] = {}
    for folder in folders:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            name = manifest["name"] if isinstance(manifest, dict) else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
            problems[folder.name] = f"{folder / MANIFEST}: unreadable or has no 'name' ({type(e).__name__})"
            continue
        if not isinstance(name, str) or not name:
            problems[folder.name] = f"{folder / MANIFEST}: 'name' must be a non-empty string"
            continue
        if name in bundles:
            for here, there in ((folder.name, bundles[name].name), (bundles[name].name, folder.name)):
                problems[here] = (f"model name {name!r} is taken by folder {there!r} too; give each bundle its own "
                                  f"manifest 'name'")
            continue
        bundles[name] = folder
    for name in [n for n, p in bundles.items() if p.name in problems]:  # a name in two folders serves neither
        del bundles[name]
    return Scan(bundles, problems)


def bundles_in(root: Path) -> dict[str, Path]:
    """name -> folder of every bundle of `root`, for serving them all; BundleError naming each
    folder that is not a usable bundle, or saying that there is none."""
    found = scan_folder(root)
    if found.problems:
        raise BundleError("; ".join(f"{folder}: {why}" for folder, why in sorted(found.problems.items())))
    if not found.bundles:
        raise BundleError(f"{str(root)!r} is neither a bundle (no {MANIFEST}) nor a folder of bundles (no sub-folder "
                          f"holds one)")
    return found.bundles


class Repository:
    """Model name -> engine, for the servicers; load / replace / unload for the repository API.

    `start` builds an engine for a bundle folder (the server passes `RayEngine.start`);
    `on_change(name, serving)` is awaited whenever a model starts or stops serving."""

    def __init__(self, root: str | Path, config: EngineConfig, start: EngineStarter,
                 on_change: OnChange | None = None) -> None:
        self.root = Path(root)
        self.config = config
        self._start = start
        self.on_change = on_change
        self._entries: dict[str, _Entry] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # loads and unloads running
        self._retiring: set[asyncio.Task[Any]] = set()  # engines draining, then closing
        self.draining = False  # the server is shutting down: no new request is admitted
        self.last_call = 0.0  # time.monotonic() of the latest lease, for the shutdown's quiet period

    # ---- what the servicers call, per request ----------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Every model name known (loaded or not), sorted."""
        return sorted(self._entries)

    def loaded(self) -> list[Model]:
        return [e.model for _, e in sorted(self._entries.items()) if e.model is not None]

    def resolve(self, name: str, field: str = "model") -> str:
        """The name a request means: `name`, or the only model's when it is empty."""
        if name:
            return name
        if len(self._entries) == 1:
            return next(iter(self._entries))
        raise InvalidInputError(f"{field}: not set, and this server serves several models; expected one of "
                                f"{self.names}")

    def label(self, name: str) -> str:
        """The `model` metrics label for a request naming `name`: unknown names are not echoed
        (a client must not grow the label set)."""
        if not name:
            return next(iter(self._entries)) if len(self._entries) == 1 else "unknown"
        return name if name in self._entries else "unknown"

    def ready(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.model is not None and not self.draining

    def check(self, name: str, version: str = "", field: str = "model") -> None:
        """ModelNotFoundError unless `name` is a model of this repository (loaded or not) and
        `version` is its version or empty."""
        if name not in self._entries:
            raise ModelNotFoundError(f"{field}: model {shown(name)} is not served here; expected one of {self.names}")
        if version not in ("", VERSION):
            raise ModelNotFoundError(
                f"version: model {shown(name)} has only version {VERSION!r}, not {shown(version)}"
            )

    def get(self, name: str, version: str = "", field: str = "model") -> Model:
        """The loaded model `name`; ModelNotFoundError (unknown name or version, not loaded) or
        UnavailableError (loading, unloading, the server shutting down)."""
        self.check(name, version, field)
        entry = self._entries[name]
        if self.draining:
            raise UnavailableError("the server is shutting down; retry on another server")
        if entry.model is not None:
            return entry.model
        if entry.state in (ModelState.LOADING, ModelState.UNLOADING):
            raise UnavailableError(f"model {name!r} is {entry.state.value.lower()}; retry when ModelReady (REST: "
                                   f"GET /v2/models/{name}/ready) says it is ready")
        raise ModelNotFoundError(f"{field}: model {name!r} is not loaded ({entry.reason}); load it with "
                                 f"RepositoryModelLoad (REST: POST /v2/repository/models/{name}/load)")

    @contextlib.contextmanager
    def use(self, name: str, version: str = "", field: str = "model") -> Iterator[Model]:
        """Hold the model `name` for one request: it is not closed (by an unload, a replace or
        the shutdown) until the request is done."""
        self.last_call = time.monotonic()  # refused calls too: the shutdown waits for the calls to stop coming
        model = self.get(name, version, field)
        model.acquire()
        try:
            yield model
        finally:
            model.release()

    # ---- the repository API -------------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model of the folder and every model loaded, with its state."""
        try:
            found = scan_folder(self.root)
        except BundleError as e:  # the folder went away
            found = Scan({}, {self.root.name: str(e)})
        rows = []
        for name in sorted(set(found.bundles) | set(self._entries)):
            entry = self._entries.get(name)
            if entry is None:
                rows.append(IndexEntry(name, VERSION, ModelState.UNAVAILABLE, "not loaded"))
            else:
                reason = "" if entry.state is ModelState.READY else entry.reason
                rows.append(IndexEntry(name, VERSION, entry.state, reason))
        for folder, why in sorted(found.problems.items()):
            if folder not in found.bundles and folder not in self._entries:
                rows.append(IndexEntry(folder, "", ModelState.UNAVAILABLE, why))
        return [r for r in rows if r.state is ModelState.READY] if ready_only else rows

    def find(self, name: str) -> Path:
        """The folder of the bundle named `name` now (the folder is read again: a bundle copied
        in after the start can be loaded); ModelNotFoundError / InvalidInputError naming why not."""
        found = scan_folder(self.root)
        if name in found.bundles:
            return found.bundles[name]
        folder = self.root / name
        collided = [f for f, why in found.problems.items() if f"model name {name!r} is taken" in why]
        if collided:
            raise InvalidInputError(f"model_name: {shown(name)} is the manifest name of several folders "
                                    f"{sorted(collided)} in {str(self.root)!r}; give each bundle its own name")
        if name in found.problems:
            raise InvalidInputError(f"model_name: {shown(name)} cannot be loaded: {found.problems[name]}")
        if name and "/" not in name and folder.is_dir() and folder != self.root:
            other = [n for n, p in found.bundles.items() if p == folder]
            if other:
                raise ModelNotFoundError(f"model_name: folder {name!r} holds model {other[0]!r}; load it by that name")
            raise ModelNotFoundError(f"model_name: {str(folder)!r} is not a bundle (it has no {MANIFEST})")
        raise ModelNotFoundError(f"model_name: no bundle named {shown(name)} in the repository {str(self.root)!r}; "
                                 f"it holds {sorted(found.bundles)}")

    async def load(self, name: str) -> None:
        """Load the bundle named `name` from the folder, or replace it when it is loaded. Returns
        once it serves. The work runs in a task of the repository's own, so that a caller who
        gives up does not leave a model half started."""
        await self._run(self._load(name))

    async def unload(self, name: str) -> None:
        """Stop serving `name`: new requests are refused, in-flight ones finish, then its
        engine closes. Unloading a model that is not loaded does nothing."""
        if name not in self._entries:
            self.find(name)  # NOT_FOUND naming what the folder holds, for a name it does not
            return
        await self._run(self._unload(name))

    async def load_all(self) -> None:
        """Load every bundle of the folder (the server's start); the first failure is raised."""
        names = list(bundles_in(self.root))
        for name in names:
            self._entries.setdefault(name, _Entry(name, ModelState.LOADING, "starting"))
            await self._changed(name, False)
        await asyncio.gather(*(self.load(name) for name in names))

    async def drain(self) -> None:
        """The shutdown's first half: admit no new request, wait for those in flight."""
        self.draining = True
        for name, entry in self._entries.items():
            if entry.model is not None:
                await self._changed(name, False)
        await asyncio.gather(*(m.drain() for m in self.loaded()))

    async def close(self) -> None:
        """The shutdown's second half: stop any load still running, let the engines being
        retired finish closing, close every engine."""
        self.draining = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        models = self.loaded()
        for entry in self._entries.values():
            entry.model = None
        for m in models:
            await m.engine.close()

    # ---- inside ----------------------------------------------------------------------------------

    async def _run(self, work: Awaitable[None]) -> None:
        if self.draining:
            if asyncio.iscoroutine(work):
                work.close()
            raise UnavailableError("the server is shutting down; retry on another server")
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    async def _changed(self, name: str, serving: bool) -> None:
        if self.on_change is not None:
            await self.on_change(name, serving)

    async def _load(self, name: str) -> None:
        self.find(name)  # before the name is known: a client's unknown name must not become an entry
        entry = self._entries.setdefault(name, _Entry(name))
        async with entry.lock:
            path = self.find(name)
            old = entry.model
            if old is None:
                entry.state, entry.reason = ModelState.LOADING, "loading"
                await self._changed(name, False)
            log.info("model %s: %s from %s", name, "replacing" if old else "loading", path)
            try:
                engine = await self._start(path, self.config)
            except BaseException as e:
                if old is None:
                    why = f"load failed: {e}" if isinstance(e, Exception) else "load cancelled: the server is stopping"
                    entry.state, entry.reason = ModelState.UNAVAILABLE, why
                if isinstance(e, BundleError | ValueError) and not isinstance(e, InvalidInputError):
                    raise InvalidInputError(f"model_name: {name!r} cannot be loaded from {str(path)!r}: {e}") from e
                raise
            if engine.model_name != name or self.draining:  # its manifest changed meanwhile, or shutting down
                await engine.close()
                if old is None:
                    entry.state, entry.reason = ModelState.UNAVAILABLE, "load abandoned"
                if self.draining:
                    raise UnavailableError("the server is shutting down; retry on another server")
                raise InvalidInputError(f"model_name: the bundle in {str(path)!r} was renamed to "
                                        f"{engine.model_name!r} while it loaded; load it by its new name")
            entry.model = Model(engine, path)
            entry.state, entry.reason = ModelState.READY, ""
            await self._changed(name, True)
            log.info("model %s: serving (%s)", name, "replaced" if old else "loaded")
            if old is not None:
                await self._retire(old, replaced=True)

    async def _unload(self, name: str) -> None:
        entry = self._entries[name]
        async with entry.lock:
            model = entry.model
            if model is None:
                return
            entry.model = None
            entry.state, entry.reason = ModelState.UNLOADING, "unloading"
            await self._changed(name, False)
            log.info("model %s: unloading", name)
            try:
                await self._retire(model, replaced=False)
            finally:
                entry.state, entry.reason = ModelState.UNAVAILABLE, "unloaded"
            log.info("model %s: unloaded", name)

    async def _retire(self, model: Model, replaced: bool) -> None:
        # In a task of its own that the shutdown waits for rather than cancels: an engine is
        # closed once, and never left half closed.
        task = asyncio.ensure_future(self._drain_and_close(model, replaced))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        await asyncio.shield(task)

    async def _drain_and_close(self, model: Model, replaced: bool) -> None:
        """Drain, then close an engine that no longer takes requests. Its gauges are shared with
        the engine that replaced it (same model and expert labels), which the old engine's close
        zeroes (replicas live, queue depth): they are put back. An unloaded model's gauges are
        removed, so that no series claims replicas (or alerts on none) for a model not served."""
        await model.drain()
        shared = metrics.set_gauge_values(model.name) if replaced else []
        await model.engine.close()
        if replaced:
            metrics.restore_gauge_values(shared)
        else:
            metrics.forget_model_gauges(model.name)
