"""What the HTTP/REST path costs beside gRPC: KServe v2 over both transports, one server.

    .venv/bin/python benchmarks/bench_rest.py [--bundle artifacts/digits] [--rounds 3]

Starts `dynaroute serve --http-port` on the digits bundle (local Ray, free ports) and sends
one-row requests with the full subnet pinned (every call costs the same) through stock
clients: tritonclient.grpc.aio (KServe over gRPC), tritonclient.http.aio with binary tensors
(its default) and with JSON `data` both ways; and through bare clients, which show the
transports with less client code in the way: the generated grpc.aio stub with raw tensor
bytes, and an aiohttp session posting JSON as curl would. At concurrency 1 and 32 it reports
requests/s, p50 and p99 (client-side), each the median over `--rounds` rounds that take
the transports in turn, so that a noisy machine weighs on all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from dynaroute.bundle import Bundle
from dynaroute.data import load_digits_splits

READY = re.compile(r"dynaroute: serving model=(\S+) grpc=(\S+) metrics=\S+ http=(\S+)")


def start_server(bundle: Path, timeout_s: float = 300.0) -> tuple[subprocess.Popen, str, str]:
    """`dynaroute serve --http-port 0`; returns it, its gRPC and its HTTP address once ready."""
    cmd = [sys.executable, "-m", "dynaroute", "serve", str(bundle), "--port", "0", "--metrics-port", "0",
           "--http-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    found: list[tuple[str, str]] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := READY.search(line):
                found.append((m.group(2), m.group(3)))
                ready.set()
            if "ERROR" in line or "Error" in line:
                print(f"  [server] {line.rstrip()}", flush=True)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"dynaroute serve did not become ready (exit code {proc.poll()})")
    return proc, *found[0]


Call = Callable[[np.ndarray], Awaitable[object]]


async def grpc_caller(address: str, model: str, subnet: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import tritonclient.grpc.aio as tc

    client = tc.InferenceServerClient(address)

    async def call(x: np.ndarray) -> object:
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return await client.infer(model, [inp], parameters={"subnet": subnet})

    return call, client.close


async def http_caller(address: str, model: str, subnet: str, binary: bool
                      ) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import tritonclient.http.aio as th

    client = th.InferenceServerClient(address, conn_limit=64)
    outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "label", "confidence")]

    async def call(x: np.ndarray) -> object:
        inp = th.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        return await client.infer(model, [inp], outputs=outputs, parameters={"subnet": subnet})

    return call, client.close


async def raw_grpc_caller(address: str, model: str, subnet: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """The bare grpc.aio stub (tritonclient's generated one), raw tensor bytes: no client library."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.aio.insecure_channel(address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def call(x: np.ndarray) -> object:
        req = service_pb2.ModelInferRequest(model_name=model)
        req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(x.astype("<f4").tobytes())
        req.parameters["subnet"].string_param = subnet
        return await stub.ModelInfer(req)

    return call, channel.close


async def raw_http_caller(address: str, model: str, subnet: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """A bare aiohttp session posting JSON, as `curl` would: no client library."""
    import json

    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    url = f"http://{address}/v2/models/{model}/infer"

    async def call(x: np.ndarray) -> object:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
                "parameters": {"subnet": subnet}}
        async with session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}) as r:
            r.raise_for_status()
            return json.loads(await r.read())

    return call, session.close


async def measure(make: Callable[[], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]], x: np.ndarray,
                  n: int, concurrency: int) -> tuple[float, float, float]:
    """`concurrency` callers, each with one request in flight, `n` requests in all (after a
    warm-up); returns requests/s, p50 and p99 in ms."""
    call, close = await make()
    try:
        await asyncio.gather(*(call(x[i % len(x)][None]) for i in range(max(concurrency, 20))))
        times: list[float] = []
        todo = iter(range(n))

        async def caller() -> None:
            for i in todo:
                t0 = time.perf_counter()
                await call(x[i % len(x)][None])
                times.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    finally:
        await close()
    return n / elapsed, float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="artifacts/digits")
    parser.add_argument("--n", type=int, default=500, help="requests per concurrency-1 measurement")
    parser.add_argument("--n-concurrent", type=int, default=2000, help="requests per concurrency-32 measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each over every transport in turn")
    args = parser.parse_args()

    path = Path(args.bundle)
    if not (path / "manifest.json").is_file():
        from dynaroute.training.digits import train_digits

        train_digits(path)
    bundle = Bundle.load(path)
    x = load_digits_splits().test.x.astype(np.float32)
    proc, grpc_address, http_address = start_server(path)
    model, subnet = bundle.name, bundle.full_subnet
    systems = {
        "KServe gRPC (tritonclient.grpc.aio)": lambda: grpc_caller(grpc_address, model, subnet),
        "KServe REST, binary tensors": lambda: http_caller(http_address, model, subnet, binary=True),
        "KServe REST, JSON data": lambda: http_caller(http_address, model, subnet, binary=False),
        "KServe gRPC, bare grpc.aio stub": lambda: raw_grpc_caller(grpc_address, model, subnet),
        "KServe REST, bare aiohttp JSON": lambda: raw_http_caller(http_address, model, subnet),
    }
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        for concurrency, n in ((1, args.n), (32, args.n_concurrent)):
            for _ in range(args.rounds):
                for name, make in systems.items():
                    results.setdefault((name, concurrency), []).append(asyncio.run(measure(make, x, n, concurrency)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)

    print(f"digits bundle {model!r}, subnet {subnet} pinned, one row per request, {args.rounds} rounds "
          f"(median), {os.cpu_count()} CPUs")
    print(f"{'transport':<38} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for concurrency in (1, 32):
        base = None  # the first transport, tritonclient's gRPC: the others are given relative to it
        for name in systems:
            rps, p50, p99 = (float(np.median(v)) for v in zip(*results[(name, concurrency)], strict=True))
            rel = "" if base is None else f"  ({rps / base[0]:.2f}x gRPC's req/s, p50 {p50 - base[1]:+.2f} ms)"
            base = base or (rps, p50)
            print(f"{name:<38} {concurrency:>4} {rps:>8.0f} {p50:>8.2f} {p99:>8.2f}{rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
