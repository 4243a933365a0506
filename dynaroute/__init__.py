"""dynaroute: a runtime for dynamic neural networks (supernet + router + Ray experts + gRPC gateway).

The public API is importable from the package itself (`from dynaroute import Client, Budget`).
Names are imported on first use (module `__getattr__`), so `import dynaroute` stays light: a
client process does not load torch or Ray, and a CLI call loads only what its subcommand needs.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = importlib.metadata.version("dynaroute")  # pyproject.toml's, as installed
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # models and bundles
    "SubnetSpec": "dynaroute.experts.spec",
    "MLPConfig": "dynaroute.experts.mlp",
    "Bundle": "dynaroute.bundle",
    "SupernetTrainConfig": "dynaroute.training.supernet",
    "train": "dynaroute.training.pipeline",
    "DataSpec": "dynaroute.datasets.dataset",
    "TextTrainConfig": "dynaroute.training.text",
    "train_digits": "dynaroute.training.digits",
    "SST2TrainConfig": "dynaroute.training.sst2",
    "train_sst2": "dynaroute.training.sst2",
    "TextEncoder": "dynaroute.text",
    # routing
    "Budget": "dynaroute.router.budget",
    "Route": "dynaroute.router.policy",
    "RouterRuntime": "dynaroute.router.runtime",
    # serving
    "RayEngine": "dynaroute.gateway.engine",
    "EngineConfig": "dynaroute.config",
    "PlacementConfig": "dynaroute.config",
    "ActorPlacement": "dynaroute.config",
    "ServerConfig": "dynaroute.config",
    "SloConfig": "dynaroute.config",
    "InferRequest": "dynaroute.gateway.types",
    "InferResult": "dynaroute.gateway.types",
    "Client": "dynaroute.client",
    "AsyncClient": "dynaroute.client",
    # errors
    "DynarouteError": "dynaroute.errors",
    "InvalidInputError": "dynaroute.errors",
    "ModelNotFoundError": "dynaroute.errors",
    "OverloadedError": "dynaroute.errors",
    "UnavailableError": "dynaroute.errors",
    "DeadlineError": "dynaroute.errors",
    "UnauthenticatedError": "dynaroute.errors",
    "BundleError": "dynaroute.errors",
    "DataError": "dynaroute.errors",
}

__all__ = [  # the names of _EXPORTS, spelled out for tools that read __all__ statically
    "__version__",
    "SubnetSpec", "MLPConfig", "Bundle", "SupernetTrainConfig", "train", "DataSpec", "TextTrainConfig",
    "train_digits", "SST2TrainConfig", "train_sst2", "TextEncoder",
    "Budget", "Route", "RouterRuntime",
    "RayEngine", "EngineConfig", "PlacementConfig", "ActorPlacement", "ServerConfig", "SloConfig", "InferRequest",
    "InferResult",
    "Client", "AsyncClient",
    "DynarouteError", "InvalidInputError", "ModelNotFoundError", "OverloadedError", "UnavailableError",
    "DeadlineError", "UnauthenticatedError", "BundleError", "DataError",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynaroute' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from dynaroute.bundle import Bundle
    from dynaroute.client import AsyncClient, Client
    from dynaroute.config import ActorPlacement, EngineConfig, PlacementConfig, ServerConfig, SloConfig
    from dynaroute.datasets.dataset import DataSpec
    from dynaroute.errors import (
        BundleError,
        DataError,
        DeadlineError,
        DynarouteError,
        InvalidInputError,
        ModelNotFoundError,
        OverloadedError,
        UnauthenticatedError,
        UnavailableError,
    )
    from dynaroute.experts.mlp import MLPConfig
    from dynaroute.experts.spec import SubnetSpec
    from dynaroute.gateway.engine import RayEngine
    from dynaroute.gateway.types import InferRequest, InferResult
    from dynaroute.router.budget import Budget
    from dynaroute.router.policy import Route
    from dynaroute.router.runtime import RouterRuntime
    from dynaroute.text import TextEncoder
    from dynaroute.training.digits import train_digits
    from dynaroute.training.pipeline import train
    from dynaroute.training.sst2 import SST2TrainConfig, train_sst2
    from dynaroute.training.supernet import SupernetTrainConfig
    from dynaroute.training.text import TextTrainConfig
