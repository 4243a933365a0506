"""Model families by name, so that a bundle's manifest can say which class to build."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dynaroute.experts.base import DynamicModel
from dynaroute.experts.mlp import MLPConfig, SlimmableMLP

# family -> (config from dict, model from config)
_FAMILIES: dict[str, tuple[Callable[[dict], Any], Callable[[Any], DynamicModel]]] = {
    SlimmableMLP.family: (MLPConfig.from_dict, SlimmableMLP),
}


def register_family(name: str, config_from_dict: Callable[[dict], Any], build: Callable[[Any], DynamicModel]) -> None:
    _FAMILIES[name] = (config_from_dict, build)


def build_model(family: str, config: dict) -> DynamicModel:
    """Build an untrained supernet of `family` from its manifest config."""
    _load_optional_families()
    if family not in _FAMILIES:
        raise ValueError(f"unknown supernet family {family!r}; expected one of {sorted(_FAMILIES)}")
    from_dict, build = _FAMILIES[family]
    return build(from_dict(config))


def _load_optional_families() -> None:
    # The text family imports `tokenizers`, an optional extra: register it only when present.
    try:
        import dynaroute.experts.bert  # noqa: F401
    except ImportError:
        pass
