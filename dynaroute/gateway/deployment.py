"""Creating the expert actors of a placement on Ray, and waiting until they have loaded."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import ray

from dynaroute.config import EngineConfig, PlacementConfig
from dynaroute.errors import UnavailableError
from dynaroute.experts.actor import ExpertActor


def create_actors(bundle_path: str | Path, placement: PlacementConfig, config: EngineConfig) -> dict[str, list[Any]]:
    """actor name -> its replicas' handles. Ray must be initialised. The bundle path is passed
    as is: each actor loads the weights from that path on its own node."""
    path = str(Path(bundle_path).resolve())
    handles: dict[str, list[Any]] = {}
    for spec in placement.actors:
        options: dict[str, Any] = {
            "num_cpus": spec.num_cpus,
            "num_gpus": spec.num_gpus,
            "max_restarts": config.max_restarts,
            # A call that was running when its actor died is not retried by Ray: the gateway
            # retries it on another replica or another subnet, which it can count.
            "max_task_retries": 0,
        }
        if spec.resources:
            options["resources"] = dict(spec.resources)
        handles[spec.name] = [
            ExpertActor.options(**options).remote(path, list(spec.subnets), config.expert_threads,
                                                  spec.backend or config.backend)
            for _ in range(spec.replicas)
        ]
    return handles


async def wait_ready(handles: dict[str, list[Any]], timeout_s: float) -> None:
    """Wait until every replica has loaded its subnets; UnavailableError naming the slow ones."""
    refs = {ref: name for name, hs in handles.items() for ref in (h.ready.remote() for h in hs)}
    done, pending = await asyncio.wait([asyncio.ensure_future(_await(r)) for r in refs], timeout=timeout_s)
    for task in done:
        task.result()  # re-raise an actor's constructor error (bad bundle path, unknown subnet)
    if pending:
        for task in pending:
            task.cancel()
        raise UnavailableError(
            f"{len(pending)} expert actor(s) were not ready after {timeout_s} s; check the cluster's free "
            f"resources (`ray status`) against the placement's num_cpus / num_gpus / resources"
        )


async def _await(ref: Any) -> Any:
    return await ref


def kill_actors(handles: dict[str, list[Any]]) -> None:
    for hs in handles.values():
        for h in hs:
            ray.kill(h, no_restart=True)
