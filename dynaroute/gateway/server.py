"""`dynaroute serve DIR`: the grpc.aio gateway on Ray, serving a bundle or a folder of bundles.

Start-up: join or start Ray, open the gRPC port with health NOT_SERVING, start every model of
the repository (gateway.repository: each its own router in this process and experts as Ray
actors), then report SERVING and print one ready line (the models and ports, for scripts and
tests that pass port 0). With --http-port, the KServe v2 HTTP/REST port (gateway.rest) opens
beside the gRPC port, before the models start, and closes after they have drained. Health has a
service per model too (its name), SERVING while the model serves. SIGTERM or SIGINT drains:
health turns NOT_SERVING, new requests get UNAVAILABLE, in-flight ones finish, the connections
are cut (a call still arriving fails as UNAVAILABLE), the server stops, the actors are killed,
and Ray is shut down if this process started it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dynaroute import logs, metrics
from dynaroute._proto import dynaroute_pb2, dynaroute_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from dynaroute.config import EngineConfig, ServerConfig
from dynaroute.errors import BundleError, UnavailableError
from dynaroute.gateway.decoding import DecodeGuardInterceptor
from dynaroute.gateway.kserve import KServeServicer
from dynaroute.gateway.native import NativeServicer
from dynaroute.gateway.repository import Repository, bundles_in

log = logging.getLogger(__name__)

NATIVE_SERVICE = dynaroute_pb2.DESCRIPTOR.services_by_name["Dynaroute"].full_name
KSERVE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICES = ("", NATIVE_SERVICE, KSERVE_SERVICE)  # "" is the whole server
APIS = {NATIVE_SERVICE: "native", KSERVE_SERVICE: "kserve"}  # service -> metrics `api` label
# The unary inference methods, whose undecodable requests count in dynaroute_requests_total
# (InferStream's messages are counted by its servicer, one by one).
UNARY_INFERENCE = {f"/{NATIVE_SERVICE}/Infer": "native", f"/{NATIVE_SERVICE}/InferBatch": "native",
                   f"/{KSERVE_SERVICE}/ModelInfer": "kserve"}


async def quiesce(models: Repository, limit_s: float, quiet_s: float = 0.5) -> None:
    """Keep answering (UNAVAILABLE, the models are draining) until no call has come for
    `quiet_s`, at most `limit_s`. gRPC core answers calls that had arrived but not yet reached
    a handler when the server stops with CANCELLED (grpc/grpc#41785); this lets them reach one."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and time.monotonic() - models.last_call < quiet_s:
        await asyncio.sleep(quiet_s / 4)


def _socket_fds(port: int) -> list[int]:
    """This process's file descriptors of TCP sockets whose local port is `port` (the listener and
    every accepted connection), from /proc (Linux; elsewhere none are found)."""
    inodes: set[str] = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:  # "sl local_address rem_address st ... inode ..."; the address is "HEX_IP:HEX_PORT"
            fields = row.split()
            if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    fds = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:[") and link[len("socket:[") : -1] in inodes:
            fds.append(int(name))
    return fds


def sever_connections(port: int) -> int:
    """Shut down (not close: gRPC still owns the descriptors) the listener and every connection
    on `port`, so that each call still arriving fails on the client as UNAVAILABLE (connection
    lost, or refused). Stopping the gRPC server with clients still sending would instead answer
    the calls it had accepted but not yet handed to a handler with CANCELLED (grpc/grpc#41785).
    gRPC logs once that its acceptor closed. Returns how many sockets were shut."""
    count = 0
    for fd in _socket_fds(port):
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:  # a duplicate: closing it leaves gRPC's open
                sock.shutdown(socket.SHUT_RDWR)
            count += 1
        except OSError:  # already closed, or not connected
            continue
    return count


def _set_health(servicer: health.aio.HealthServicer, status: int) -> asyncio.Future:
    return asyncio.gather(*(servicer.set(name, status) for name in HEALTH_SERVICES))


class ServerState:
    """Whether the server as a whole is ready: its models started, not draining. (A model's own
    readiness is the repository's: one model loading or unloading leaves the server ready.)"""

    def __init__(self) -> None:
        self.started = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining


def build_server(
    config: ServerConfig, models: Repository, state: ServerState
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The gRPC server with both APIs, health (NOT_SERVING until told, a service per model as
    the repository says) and reflection; bound, not started. Returns it, its health servicer
    and the bound port."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    # Calls that name no model (an undecodable message, a refused token) are labelled with the
    # only model's name, "unknown" when there are several.
    if config.auth_token_file:  # first: a refused call is never decoded
        from dynaroute.gateway.security import BearerTokenInterceptor, count_rejected, read_token_file

        on_rejected = count_rejected(APIS, lambda: models.label(""))
        interceptors.append(BearerTokenInterceptor(read_token_file(config.auth_token_file), on_rejected=on_rejected))

    def on_undecodable(method: str) -> None:
        if method in UNARY_INFERENCE:
            metrics.record_refused(models.label(""), UNARY_INFERENCE[method], grpc.StatusCode.INVALID_ARGUMENT)

    interceptors.append(
        DecodeGuardInterceptor(APIS, per_message=[f"/{NATIVE_SERVICE}/InferStream"], on_undecodable=on_undecodable)
    )
    # The transport accepts up to 4x the limit so that a merely too-large request reaches the
    # servicers and gets INVALID_ARGUMENT naming the limit; beyond that gRPC itself refuses it
    # (RESOURCE_EXHAUSTED) before reading it into memory.
    transport_limit = 4 * config.max_message_bytes
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", transport_limit),
            ("grpc.max_send_message_length", transport_limit),
            ("grpc.so_reuseport", 0),  # a busy port is an error, not a silent share
        ],
    )
    dynaroute_pb2_grpc.add_DynarouteServicer_to_server(
        NativeServicer(models, config.max_message_bytes, lambda: state.ready, config.max_stream_inflight), server
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeServicer(models, config.max_message_bytes, lambda: state.ready), server
    )
    health_servicer = health.aio.HealthServicer()

    async def on_change(name: str, serving: bool) -> None:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING if serving and not state.draining
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)

    models.on_change = on_change
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (NATIVE_SERVICE, KSERVE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        from dynaroute.gateway.security import server_credentials

        creds = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the gRPC port {address}")
    return server, health_servicer, port


async def serve(bundle: str | Path, config: ServerConfig, engine_config: EngineConfig) -> int:
    """Run the gateway on a bundle or a folder of bundles (`bundle`) until SIGTERM / SIGINT,
    then drain and stop. Ray must be initialised."""
    from prometheus_client import start_http_server

    from dynaroute.gateway.engine import RayEngine

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    models = Repository(bundle, engine_config, RayEngine.start)
    state = ServerState()
    server, health_servicer, port = build_server(config, models, state)
    metrics_server, _ = start_http_server(config.metrics_port, config.metrics_host)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    rest = None
    try:
        http: dict[str, str] = {}  # the HTTP port's address on the starting and ready lines, when it is on
        if config.http_port is not None:
            from dynaroute.gateway.rest import RestServer

            rest = RestServer(models, config, lambda: state.ready)
            http["http"] = f"{config.host}:{await rest.start()}"
        shown_http = "".join(f" http={a}" for a in http.values())
        logs.announce(__name__, f"dynaroute: starting bundle={bundle} grpc={config.host}:{port}{shown_http}",
                      bundle=str(bundle), grpc=f"{config.host}:{port}", **http)
        await models.load_all()
        state.started = True
        # What start-up allocated (torch, Ray, the router, the tokenizer: millions of objects)
        # lives as long as the server. Left to the collector, every full collection walks it
        # and stalls the event loop for ~250 ms, which was the whole tail of refusal latency
        # under overload (p99 234 ms against 1.4 ms p50); frozen, a full collection takes ~5 ms.
        # (Models loaded later are not frozen: freezing then would keep a replaced engine's
        # cyclic garbage for good.)
        gc.freeze()
        if not stop.is_set():  # a SIGTERM while the actors started: go straight to shutting down
            await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
            metrics_address = f"{config.metrics_host}:{metrics_server.server_port}"
            names = ",".join(models.names)
            logs.announce(
                __name__, f"dynaroute: serving model={names} grpc={config.host}:{port} metrics={metrics_address}"
                f"{shown_http}", model=names, grpc=f"{config.host}:{port}", metrics=metrics_address, **http,
            )
            await stop.wait()
        log.info("draining: health NOT_SERVING, finishing in-flight requests")
    finally:
        state.draining = True
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        await models.drain()
        await quiesce(models, config.grace_s)
        # Every call in flight has been answered; calls still coming are cut at the socket, so
        # that none is answered CANCELLED by the server's stop.
        if rest is not None:
            await rest.stop()
        sever_connections(port)
        await server.stop(config.grace_s)
        await models.close()
        metrics_server.shutdown()
        metrics_server.server_close()
    logs.announce(__name__, "dynaroute: stopped")
    return 0


def configs_from_args(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    from dynaroute.config import PlacementConfig, SloConfig

    server = ServerConfig(
        host=args.host, port=args.port, http_port=args.http_port, metrics_host=args.metrics_host,
        metrics_port=args.metrics_port, max_message_bytes=args.max_message_bytes, grace_s=args.grace_s,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
    )
    placement = PlacementConfig.from_file(args.placement) if args.placement else None
    engine = EngineConfig(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, placement=placement,
                          ready_timeout_s=args.ready_timeout_s, max_queue_size=args.max_queue_size,
                          slo=SloConfig(objective_ms=args.slo_ms, lower_at=args.slo_lower_at,
                                        restore_at=args.slo_restore_at, hold_s=args.slo_hold_s),
                          backend=getattr(args, "backend", None))
    return server, engine


def main_serve(args: argparse.Namespace) -> int:
    """`dynaroute serve`: check the bundles and the placement, start a local Ray (or join
    --ray-address), serve until SIGTERM, clean up, exit 0."""
    from dynaroute.bundle import Bundle
    from dynaroute.gateway import raycluster

    # What can be checked without Ray is checked first: starting or joining Ray takes seconds
    # to tens of seconds, and a typo should not wait for it.
    try:
        server_config, engine_config = configs_from_args(args)
        bundles = [Bundle.load(path) for path in bundles_in(Path(args.bundle)).values()]
        placement = engine_config.placement  # --placement places every model's subnets
        for bundle in bundles:
            try:
                if placement is not None:
                    placement.check_subnets([s["name"] for s in bundle.subnet_infos])
                # Every backend an actor will use, with its graphs' checksums, before Ray starts.
                default = engine_config.backend or bundle.default_backend
                for backend, subnets in ([(a.backend or default, a.subnets) for a in placement.actors] if placement
                                         else [(default, None)]):
                    bundle.check_backend(backend, subnets)
            except ValueError as e:
                raise ValueError(f"model {bundle.name!r}: {e}") from None
    except (BundleError, ValueError) as e:
        logs.error_line(__name__, f"dynaroute serve: {e}")
        return 2
    started_ray = args.ray_address is None
    try:
        if started_ray:
            raycluster.start_local_ray(args.ray_num_cpus)
        else:
            raycluster.join_ray(args.ray_address)
        from dynaroute.gateway.engine import RayEngine

        for bundle in bundles:
            placement = engine_config.placement or RayEngine.default_placement(bundle, engine_config)
            raycluster.placement_wait(placement, engine_config.ready_timeout_s, can_grow=not started_ray)
        return asyncio.run(serve(args.bundle, server_config, engine_config))
    except (BundleError, OSError, ValueError, UnavailableError) as e:  # Ray, a busy port, bad TLS files, slow experts
        logs.error_line(__name__, f"dynaroute serve: {e}")
        return 1
    finally:
        if started_ray:
            import ray

            ray.shutdown()
