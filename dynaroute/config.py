"""Configuration of the serving side, as frozen dataclasses checked when built.

CONTRACT: `EngineConfig` and `PlacementConfig` are read by the gRPC layer and the CLI; a bad
value raises ValueError naming the field. The placement file format is
{"actors": [{"name": "small", "subnets": ["w0.25-d3-p0"], "replicas": 1, "num_cpus": 0.25,
"num_gpus": 0, "resources": {"node2": 0.01}, "backend": "int8"}]} ("backend" optional: torch, onnx or
int8; default: `EngineConfig.backend`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The expert backends (dynaroute/experts/backends.py, one class each): named here, where configs
# are checked, so that building a config loads neither torch nor ONNX Runtime.
BACKENDS = ("torch", "onnx", "int8")


@dataclass(frozen=True)
class ActorPlacement:
    """One expert actor (and its replicas): which subnets it holds and what it asks Ray for."""

    name: str
    subnets: tuple[str, ...]
    replicas: int = 1
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    backend: str | None = None  # torch, onnx or int8; None: the engine's (EngineConfig.backend)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ActorPlacement.name must be a non-empty string")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"ActorPlacement.backend of {self.name!r} must be one of {list(BACKENDS)}, "
                             f"got {self.backend!r}")
        object.__setattr__(self, "subnets", tuple(self.subnets))
        if not self.subnets or not all(isinstance(s, str) and s for s in self.subnets):
            raise ValueError(f"ActorPlacement.subnets of {self.name!r} must be a non-empty list of subnet names")
        if len(set(self.subnets)) != len(self.subnets):
            raise ValueError(f"ActorPlacement.subnets of {self.name!r} names a subnet twice: {list(self.subnets)}")
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"ActorPlacement.replicas of {self.name!r} must be an integer >= 1, got {self.replicas}")
        for key in ("num_cpus", "num_gpus"):
            v = getattr(self, key)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"ActorPlacement.{key} of {self.name!r} must be a number >= 0, got {v!r}")
        for k, v in self.resources.items():
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"ActorPlacement.resources[{k!r}] of {self.name!r} must be a number > 0, got {v!r}")


@dataclass(frozen=True)
class PlacementConfig:
    """Which subnets live on which expert actors. Every served subnet must be placed once."""

    actors: tuple[ActorPlacement, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "actors", tuple(self.actors))
        if not self.actors:
            raise ValueError("PlacementConfig.actors must list at least one actor")
        names = [a.name for a in self.actors]
        if len(set(names)) != len(names):
            raise ValueError(f"PlacementConfig.actors: actor names must be unique, got {names}")
        seen: dict[str, str] = {}
        for a in self.actors:
            for s in a.subnets:
                if s in seen:
                    raise ValueError(
                        f"PlacementConfig.actors: subnet {s!r} is placed on both {seen[s]!r} and {a.name!r}"
                    )
                seen[s] = a.name

    @property
    def subnets(self) -> dict[str, str]:
        """subnet name -> actor name."""
        return {s: a.name for a in self.actors for s in a.subnets}

    def check_subnets(self, available: list[str]) -> None:
        """Refuse a placement that names an unknown subnet or leaves one of the bundle's out."""
        placed = self.subnets
        unknown = sorted(set(placed) - set(available))
        if unknown:
            raise ValueError(f"PlacementConfig.actors: unknown subnets {unknown}; the bundle has {available}")
        missing = [s for s in available if s not in placed]
        if missing:
            raise ValueError(f"PlacementConfig.actors: subnets {missing} are not placed on any actor")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlacementConfig:
        if not isinstance(d, dict) or not isinstance(d.get("actors"), list):
            raise ValueError('PlacementConfig.actors: expected {"actors": [...]} at the top level')
        actors = []
        for i, a in enumerate(d["actors"]):
            if not isinstance(a, dict):
                raise ValueError(f"PlacementConfig.actors[{i}] must be an object, got {a!r}")
            try:
                actors.append(ActorPlacement(**a))
            except TypeError as e:  # unknown or missing keys
                raise ValueError(f"PlacementConfig.actors[{i}]: {e}") from None
        return cls(tuple(actors))

    @classmethod
    def from_file(cls, path: str | Path) -> PlacementConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"placement file {str(path)!r}: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def default(cls, subnets: list[tuple[str, int]], num_actors: int = 2, num_cpus: float = 0.25) -> PlacementConfig:
        """Every subnet on every one of `num_actors` replicas of one expert actor.

        Any budget, the full model pinned included, then runs on every replica, so every core
        the actors are given works for whatever is asked: with subnets dealt onto actors (see
        `dealt`), the full model pinned got one core of two (107 req/s against 213 replicated on
        SST-2, and the dynamic model 236 against 362). The cost is memory: each replica holds
        every subnet. Few replicas, because each costs a process (and a CUDA context on a GPU)."""
        names = tuple(name for name, _ in sorted(subnets, key=lambda s: (s[1], s[0])))
        return cls((ActorPlacement("expert", names, replicas=max(1, num_actors), num_cpus=num_cpus),))

    @classmethod
    def dealt(cls, subnets: list[tuple[str, int]], num_actors: int = 2, num_cpus: float = 0.25) -> PlacementConfig:
        """Deal (name, flops) subnets onto `num_actors` actors in order of cost, like cards: each
        actor holds a share of the subnets (less memory per actor than `default`), and a subnet's
        neighbours by FLOPs, where its requests fall back to, sit on another actor than its own."""
        ordered = [name for name, _ in sorted(subnets, key=lambda s: (s[1], s[0]))]
        k = max(1, min(num_actors, len(ordered)))
        chunks = [ordered[i::k] for i in range(k)]
        return cls(tuple(ActorPlacement(f"expert-{i}", tuple(c), num_cpus=num_cpus) for i, c in enumerate(chunks)))


@dataclass(frozen=True)
class SloConfig:
    """The SLO controller (dynaroute/gateway/slo.py): a latency objective per model and how the
    controller moves its level. `objective_ms` None: the objective is only the deadlines of
    requests that allow lowering (none: budgets are always served as asked).

    The controller lowers while the watched queue delay is at least `lower_at` times the
    objective (faster the further above; a queue's delay counts what arrivals beyond its drain
    rate add over `lookahead` times the objective), and restores, by `restore_per_s` of its
    range per second, once the delay is at most `restore_at` times the objective, nothing was
    lowered for `hold_s` and the request rate is at most `restore_load` times the one it last
    lowered at: the band between the two, the hold and the load are the hysteresis. `lower_at` stays
    well below admission control's 0.9 of the time left, so that budgets are lowered before
    anyone is refused."""

    objective_ms: float | None = None
    lower_at: float = 0.4
    restore_at: float = 0.15
    hold_s: float = 2.0
    lower_per_s: float = 20.0  # level per second at a delay of twice `lower_at` (proportional to the delay)
    restore_per_s: float = 0.5
    lookahead: float = 0.5  # how far ahead (x objective) arrivals beyond the drain rate count as delay
    restore_load: float = 0.75  # restore only at this share of the request rate last lowered at, or less
    tick_ms: float = 20.0  # how often the controller looks at the queues
    deadline_window_s: float = 2.0  # how long a request's deadline counts towards the objective

    def __post_init__(self) -> None:
        if self.objective_ms is not None and (
            not isinstance(self.objective_ms, int | float) or not math.isfinite(self.objective_ms)
            or self.objective_ms <= 0
        ):
            raise ValueError(f"SloConfig.objective_ms must be a number of milliseconds > 0 or None, "
                             f"got {self.objective_ms!r}")
        for name in ("lower_at", "restore_at", "hold_s", "lower_per_s", "restore_per_s", "lookahead",
                     "restore_load", "tick_ms", "deadline_window_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"SloConfig.{name} must be a number >= 0, got {v!r}")
        if not 0 < self.restore_at < self.lower_at < 1:
            raise ValueError(f"SloConfig: expected 0 < restore_at < lower_at < 1 (fractions of the objective), got "
                             f"restore_at={self.restore_at!r}, lower_at={self.lower_at!r}")
        for name in ("lower_per_s", "restore_per_s", "tick_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SloConfig.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, bounds its queues and deploys experts.

    max_wait_ms bounds how long a request waits for company in a batch; a lone request is sent
    after one event-loop turn in which nothing else arrived, so concurrency 1 does not pay it.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    max_queue_size: int = 1024  # per expert (and for the router): more waiting -> OverloadedError
    placement: PlacementConfig | None = None
    default_quality: float = 1.0  # budget used when a request sets none
    router_max_batch_size: int = 64
    router_max_wait_ms: float = 1.0
    max_inflight_batches: int = 1  # actor calls in flight per replica: fewer, larger batches under load
    max_restarts: int = -1  # Ray restarts a dead expert this many times (-1: forever)
    expert_threads: int = 1  # torch threads in each expert actor
    router_threads: int = 1  # torch threads in the gateway process (the router's batches are small)
    default_num_actors: int = 2  # without a placement: replicas of the one expert actor holding every subnet
    default_num_cpus: float = 0.25  # without a placement: CPUs each actor asks for
    ready_timeout_s: float = 120.0  # how long start() waits for the actors to load
    backend: str | None = None  # experts' backend (torch, onnx, int8); None: the bundle's default_backend
    slo: SloConfig = SloConfig()  # the latency objective and its controller (`--slo-ms`)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_size", "router_max_batch_size", "max_inflight_batches",
                     "expert_threads", "router_threads", "default_num_actors"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("max_wait_ms", "router_max_wait_ms"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"EngineConfig.{name} must be a number of milliseconds >= 0, got {v!r}")
        for name in ("default_num_cpus", "ready_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"EngineConfig.{name} must be a number > 0, got {v!r}")
        if not isinstance(self.default_quality, int | float) or not 0.0 <= self.default_quality <= 1.0:
            raise ValueError(f"EngineConfig.default_quality must be in [0, 1], got {self.default_quality!r}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < -1:
            raise ValueError(f"EngineConfig.max_restarts must be -1 (forever) or >= 0, got {self.max_restarts!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"EngineConfig.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if not isinstance(self.slo, SloConfig):
            raise ValueError(f"EngineConfig.slo must be a SloConfig, got {type(self.slo).__name__}")
        if self.placement is not None and not isinstance(self.placement, PlacementConfig):
            raise ValueError(f"EngineConfig.placement must be a PlacementConfig, got {type(self.placement).__name__}")


@dataclass(frozen=True)
class ServerConfig:
    """`dynaroute serve`: where the gateway listens and how it protects itself."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port (printed on the ready line)
    http_port: int | None = None  # KServe v2 over HTTP/REST on `host`: None: off; 0: pick a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # 0: pick a free port
    max_message_bytes: int = 4 * 1024 * 1024  # larger requests get INVALID_ARGUMENT
    grace_s: float = 10.0  # SIGTERM: how long in-flight calls may take to finish
    max_stream_inflight: int = 256  # InferStream: concurrent requests per stream
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "http_port"):
            v = getattr(self, name)
            if v is None and name == "http_port":
                continue
            if not isinstance(v, int) or not 0 <= v <= 65535:
                raise ValueError(f"ServerConfig.{name} must be in [0, 65535], got {v}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"ServerConfig.max_message_bytes must be at least 1024, got {self.max_message_bytes}")
        if self.grace_s < 0:
            raise ValueError(f"ServerConfig.grace_s must be >= 0, got {self.grace_s}")
        if self.max_stream_inflight < 1:
            raise ValueError(f"ServerConfig.max_stream_inflight must be >= 1, got {self.max_stream_inflight}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("ServerConfig.tls_cert and tls_key: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("ServerConfig.tls_client_ca needs tls_cert and tls_key (mutual TLS runs over TLS)")
