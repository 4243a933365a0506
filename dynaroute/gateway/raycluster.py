"""The Ray that `dynaroute serve` runs on: a private local one, or a cluster it is told to join.

Without an address the gateway always starts its own Ray (`address="local"`): a plain
`ray.init()` would join whatever it finds (RAY_ADDRESS, or the address file an earlier
`ray start` left behind, stale or not) and can retry a dead address for minutes, deaf to
SIGTERM while it does. The local Ray listens on loopback only, its dashboard off.

With an address, one short probe comes first, so that the common mistakes answer in seconds
with one line instead of Ray's retries and a traceback: nothing listening there, or a cluster
that wants a token while this process has token authentication off.

Then `placement_wait` checks the placement against the cluster's nodes: an actor that no node
can hold would wait for resources forever.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from dynaroute import logs
from dynaroute.config import PlacementConfig

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0


def start_local_ray(num_cpus: int | None) -> None:
    """Start a Ray of this process's own, bound to 127.0.0.1, with no dashboard."""
    # On Linux Ray turns a loopback node address into the machine's external one and binds its
    # servers (GCS, raylet, workers) there and on every interface. This switch (named for the
    # platforms where loopback is its default) keeps the node on 127.0.0.1. Ray reads it when
    # imported, and Ray's own processes inherit it.
    if "ray" in sys.modules:
        log.warning("ray was imported before the local Ray was set up: it may listen beyond loopback")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray starts its workers at nice 15 so that drivers come first. Here the workers (the
    # experts) are the work: at nice 15 beside a busy gateway, an expert restarted under load
    # waited 40 to 58 s for CPU to import torch and load its subnets. The raylet reads this.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    logs.adopt_ray_logs()  # Ray's driver-side lines in this process's log format
    ray.init(
        address="local",  # never RAY_ADDRESS or an address file: those are for --ray-address
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        log_to_driver=False,
    )


def join_ray(address: str) -> None:
    """Join the Ray cluster at `address`; ConnectionError with one line saying what to fix."""
    import ray

    logs.adopt_ray_logs()
    probe(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"could not join the Ray cluster at {address}: {first}") from None


def _token_auth_on() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token"


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Check that a Ray GCS answers at host:port and, when this process has token
    authentication off, that it does not require a token. Other forms of address (`auto`,
    `ray://...`) and TLS clusters are left to Ray."""
    import grpc

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address or os.environ.get("RAY_USE_TLS", "0") not in ("", "0"):
        return
    channel = grpc.insecure_channel(address)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ConnectionError(
                f"no Ray cluster answers at {address} (no connection within {timeout_s:g} s): start it "
                "(deploy/ray/start-head.sh), or leave out --ray-address to serve on a local Ray of its own"
            ) from None
        if _token_auth_on():
            return
        # Any GCS method will do: without a token a token-auth GCS refuses them all.
        try:
            channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(b"", timeout=timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ConnectionError(
                    f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token, "
                    "with the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH, or RAY_AUTH_TOKEN)"
                ) from None
            # Anything else is for ray.init to report.
    finally:
        channel.close()


def actor_demands(placement: PlacementConfig) -> dict[str, dict[str, float]]:
    """actor name -> the Ray resources one replica asks for (as Ray names them)."""
    out = {}
    for a in placement.actors:
        demand = {"CPU": float(a.num_cpus), "GPU": float(a.num_gpus), **{k: float(v) for k, v in a.resources.items()}}
        out[a.name] = {k: v for k, v in demand.items() if v > 0}
    return out


def unplaceable(placement: PlacementConfig, nodes: list[dict[str, Any]]) -> list[str]:
    """One line per actor whose replica no alive node could hold even when idle (a node's
    total resources, from `ray.nodes()`), naming what it asks for."""
    totals = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    lines = []
    for name, demand in actor_demands(placement).items():
        if not any(all(t.get(k, 0.0) >= v for k, v in demand.items()) for t in totals):
            asked = ", ".join(f"{k} {v:g}" for k, v in sorted(demand.items()))
            lines.append(f"actor {name!r} asks for {asked}")
    return lines


def _describe_nodes(nodes: list[dict[str, Any]]) -> str:
    # Ray's bookkeeping resources (memory, the object store, node:<ip>) say nothing to the reader.
    def shown(k: str) -> bool:
        return not (k.startswith("node:") or k in ("memory", "object_store_memory"))

    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    return "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(t.items()) if shown(k)) or "nothing" for t in alive)


def placement_wait(
    placement: PlacementConfig,
    timeout_s: float,
    can_grow: bool,
    nodes: Callable[[], list[dict[str, Any]]] | None = None,
    poll_s: float = 1.0,
) -> None:
    """Return once every actor of the placement fits on some alive node; ValueError naming
    the resources otherwise. A cluster of this process's own (`can_grow` False) gets no new
    nodes, so that is an error at once; a joined cluster may still get one (a worker started
    after the head), so it is waited for up to `timeout_s`, saying at once what is missing."""
    if nodes is None:
        import ray

        nodes = ray.nodes
    current = nodes()
    missing = unplaceable(placement, current)
    if missing and can_grow:
        logs.error_line(
            __name__,
            f"dynaroute serve: no node of the Ray cluster can hold {'; '.join(missing)}; waiting up to {timeout_s:g} s "
            "(--ready-timeout-s) for a node that can to join",
            level=logging.WARNING,
        )
        deadline = time.monotonic() + timeout_s
        while missing and time.monotonic() < deadline:
            time.sleep(poll_s)
            current = nodes()
            missing = unplaceable(placement, current)
    if missing:
        raise ValueError(
            f"no node of the Ray cluster can hold {'; '.join(missing)} (nodes: {_describe_nodes(current) or 'none'}); "
            "change the placement (--placement) or add a node with those resources"
        )
