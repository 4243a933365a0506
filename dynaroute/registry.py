"""Families found by name: one generic registry for supernets, routers and routing policies.

A bundle's manifest names the class to build (its "family"). A name is looked up, in order, as

1. a built-in short name (the names older manifests record, e.g. "slimmable_mlp", "mlp"),
   mapped to an import path and imported on lookup;
2. an import path `package.module:Class` (what new manifests record: `family_name(cls)`);
3. an entry point of the `dynaroute.families` group, from any installed distribution's
   metadata (`[project.entry-points."dynaroute.families"] my_cnn = "mypkg.cnn:SlimmableCNN"`).

Built-ins are found the way a user's family is: by import path, imported when first looked up,
so no module is imported for the side effect of registering itself. Like timm's
`_registry.py`, this module imports nothing of dynaroute but its exceptions, so that every
module may use it without an import cycle.

A family's package must be importable wherever a bundle is loaded: the gateway, `dynaroute
eval`, and every Ray expert actor on every node (installed there, or on PYTHONPATH / in the
Ray job's `runtime_env`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from dynaroute.errors import BundleError

ENTRY_POINT_GROUP = "dynaroute.families"

T = TypeVar("T")


class UnknownFamilyError(BundleError, LookupError):
    """A family name that is no built-in, importable path or entry point."""


def family_name(cls: type) -> str:
    """The import path `module:QualName` that finds `cls` again in any process; refused for a
    class no other process can import (defined in `__main__` or inside a function)."""
    module, qualname = cls.__module__, cls.__qualname__
    if module == "__main__" or "<locals>" in qualname:
        raise ValueError(
            f"class {qualname} (module {module}) cannot be found by name from another process; define it "
            f"at the top level of an importable module"
        )
    return f"{module}:{qualname}"


class FamilyName:
    """A class attribute that reads as the owning class's `family_name` (`SlimmableMLP.family`
    is "dynaroute.experts.mlp:SlimmableMLP"): what a manifest writer records for the family."""

    def __get__(self, obj: Any, owner: type) -> str:
        return family_name(owner)


def import_object(path: str) -> Any:
    """`package.module:Attr.Nested` -> the object; ImportError / AttributeError as Python raises."""
    module_name, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Names -> subclasses of `base` (see the module docstring for how a name is found).

    `kind` names what is looked up in error messages ("supernet family"); `builtins` maps the
    built-in short names to import paths."""

    def __init__(self, kind: str, base: type[T], builtins: Mapping[str, str], group: str = ENTRY_POINT_GROUP):
        for name, path in builtins.items():
            if ":" not in path:
                raise ValueError(f"{kind} {name!r}: built-in path {path!r} is not of the form 'package.module:Class'")
        self.kind = kind
        self.base = base
        self.builtins = dict(builtins)
        self.group = group
        self._cache: dict[str, type[T]] = {}

    def names(self) -> list[str]:
        """The built-in short names and the entry points' names (import paths are not listed)."""
        return sorted({*self.builtins, *(ep.name for ep in importlib.metadata.entry_points(group=self.group))})

    def how_found(self) -> str:
        """The sentence every lookup error ends with."""
        return (f"a {self.kind} is a built-in name ({', '.join(sorted(self.builtins))}), an import path "
                f"'package.module:Class' importable here, or an entry point in the {self.group!r} group")

    def resolve(self, name: str) -> type[T]:
        """The class `name` finds; UnknownFamilyError naming it and how families are found."""
        cls = self._cache.get(name)
        if cls is not None:
            return cls
        if not isinstance(name, str) or not name:
            raise UnknownFamilyError(f"{self.kind} {name!r} is not a name; {self.how_found()}")
        path = self.builtins.get(name)
        if path is None and ":" in name:
            path = name
        if path is None:
            eps = [ep for ep in importlib.metadata.entry_points(group=self.group) if ep.name == name]
            if not eps:
                raise UnknownFamilyError(f"unknown {self.kind} {name!r}; {self.how_found()}")
            path = eps[0].value
        try:
            obj = import_object(path)
        except (ImportError, AttributeError) as e:
            raise UnknownFamilyError(
                f"{self.kind} {name!r}: cannot import {path!r} ({type(e).__name__}: {e}); {self.how_found()}"
            ) from e
        if not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise UnknownFamilyError(
                f"{self.kind} {name!r}: {path!r} is {obj!r}, not a subclass of {self.base.__module__}."
                f"{self.base.__qualname__}"
            )
        self._cache[name] = obj
        return obj

    def build(self, name: str, config: Mapping[str, Any]) -> T:
        """An untrained instance of family `name` from its manifest config: `cls.from_config(config)`.
        A config the family refuses (TypeError / ValueError) is a BundleError naming the family."""
        cls = self.resolve(name)
        try:
            return cls.from_config(dict(config))  # type: ignore[attr-defined]
        except (TypeError, ValueError) as e:
            raise BundleError(f"bad config for {self.kind} {name!r}: {e}") from e
