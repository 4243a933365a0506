"""The package's public API: every exported name resolves, and `import dynaroute` stays light."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys

import dynaroute


def test_every_public_name_resolves_to_the_object_its_module_defines():
    assert set(dynaroute.__all__) == {"__version__", *dynaroute._EXPORTS}
    for name, module in dynaroute._EXPORTS.items():
        assert getattr(dynaroute, name) is getattr(importlib.import_module(module), name), name
    assert {"SubnetSpec", "Bundle", "Budget", "Client", "AsyncClient", "RayEngine", "EngineConfig",
            "PlacementConfig", "train_digits"} <= set(dir(dynaroute))
    assert dynaroute.__version__ == importlib.metadata.version("dynaroute")


def test_import_is_light_and_the_client_does_not_load_ray_or_torch():
    code = (
        "import sys, dynaroute\n"
        "heavy = ('ray', 'torch', 'grpc', 'numpy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "from dynaroute import Client, EngineConfig\n"
        "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))\n"
        "try:\n"
        "    dynaroute.NoSuchName\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    lines = out.stdout.splitlines()
    assert lines[0] == "[]"  # nothing heavy on `import dynaroute`
    assert lines[1] == "[]", "a client process must not pull in Ray or torch"
    assert "has no attribute 'NoSuchName'" in lines[2]
