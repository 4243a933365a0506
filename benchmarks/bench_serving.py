"""Serving overhead and throughput for the digits bundle on this machine.

    .venv/bin/python benchmarks/bench_serving.py [--bundle artifacts/digits] [--address HOST:PORT]

Prints p50 / p99 latency at concurrency 1 and throughput at concurrency 32 through gRPC + Ray
(the full subnet pinned, and a dynamic budget), beside the same subnet called in-process, and
the ratios against the targets: at most 3 ms added to p50 at concurrency 1; at least 1,000
requests/s at concurrency 32. Without --address it starts `dynaroute serve` itself (local Ray,
free ports) and stops it with SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path

import numpy as np
import torch

from dynaroute.bundle import Bundle
from dynaroute.client import AsyncClient, Client
from dynaroute.data import load_digits_splits
from dynaroute.demo import start_server

TARGET_ADDED_P50_MS = 3.0
TARGET_RPS = 1000.0


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50) * 1e3), float(np.percentile(seconds, 99) * 1e3)


def in_process(bundle: Bundle, x: np.ndarray, n: int) -> tuple[float, float, float]:
    """The full subnet called directly: p50 / p99 of one example, and rows/s at batch 32.
    On one torch thread, as the expert actors run (EngineConfig.expert_threads): on a busy
    machine torch's thread pool can stall a tiny op for milliseconds, which would make the
    baseline, and so the overhead, meaningless."""
    torch.set_num_threads(1)
    model = bundle.extract(bundle.full_subnet)
    times = []
    with torch.inference_mode():
        for i in range(n):
            row = torch.as_tensor(x[i % len(x)][None])
            t0 = time.perf_counter()
            model(row)
            times.append(time.perf_counter() - t0)
        batch = torch.as_tensor(np.resize(x, (32, x.shape[1])))
        t0 = time.perf_counter()
        rounds = max(1, n // 32)
        for _ in range(rounds):
            model(batch)
        rps = rounds * 32 / (time.perf_counter() - t0)
    return (*percentiles_ms(times), rps)


def sequential(address: str, x: np.ndarray, n: int, **budget: object) -> tuple[float, float]:
    """Concurrency 1: one blocking call at a time, client-side latency."""
    times = []
    with Client(address, timeout_s=30) as client:
        for i in range(20):  # warm-up: channel, batchers, actors
            client.infer(x[i % len(x)], **budget)
        for i in range(n):
            t0 = time.perf_counter()
            client.infer(x[i % len(x)], **budget)
            times.append(time.perf_counter() - t0)
    return percentiles_ms(times)


async def concurrent(address: str, x: np.ndarray, n: int, concurrency: int, **budget: object) -> tuple[float, float]:
    """`concurrency` callers, each with one request in flight, over one asyncio channel;
    returns requests/s and the p99 latency in ms."""
    times: list[float] = []
    async with AsyncClient(address, timeout_s=60) as client:
        await asyncio.gather(*(client.infer(x[i % len(x)], **budget) for i in range(concurrency)))  # warm-up
        next_i = iter(range(n))

        async def caller() -> None:
            for i in next_i:
                t0 = time.perf_counter()
                await client.infer(x[i % len(x)], **budget)
                times.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return n / elapsed, percentiles_ms(times)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="artifacts/digits")
    parser.add_argument("--address", default=None, help="a running server (default: start one)")
    parser.add_argument("--n", type=int, default=1000, help="requests per concurrency-1 measurement")
    parser.add_argument("--n-concurrent", type=int, default=4000, help="requests per concurrency-32 measurement")
    parser.add_argument("--quality", type=float, default=0.5, help="the dynamic budget")
    args = parser.parse_args()

    path = Path(args.bundle)
    if not (path / "manifest.json").is_file():
        from dynaroute.training.digits import train_digits

        train_digits(path)
    bundle = Bundle.load(path)
    x = load_digits_splits().test.x
    ip50, ip99, irps = in_process(bundle, x, args.n)

    proc = None
    address = args.address
    if address is None:
        proc, address = start_server(path)
    try:
        pinned = {"subnet": bundle.full_subnet}
        dynamic = {"quality": args.quality}
        rows = []
        for name, budget in ((f"pinned {bundle.full_subnet}", pinned), (f"dynamic quality={args.quality}", dynamic)):
            p50, p99 = sequential(address, x, args.n, **budget)
            rps, cp99 = asyncio.run(concurrent(address, x, args.n_concurrent, 32, **budget))
            rows.append((name, p50, p99, rps, cp99))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)

    print(f"digits bundle {bundle.name!r}, full subnet {bundle.full_subnet}, {bundle.full_flops:,} FLOPs/example")
    print(f"{'path':<32} {'c=1 p50 ms':>11} {'c=1 p99 ms':>11} {'c=32 req/s':>11} {'c=32 p99 ms':>12}")
    print(f"{'in-process (batch 1 / 32)':<32} {ip50:>11.3f} {ip99:>11.3f} {irps:>11.0f} {'-':>12}")
    for name, p50, p99, rps, cp99 in rows:
        print(f"{'gRPC + Ray, ' + name:<32} {p50:>11.3f} {p99:>11.3f} {rps:>11.0f} {cp99:>12.2f}")
    print("targets:")
    for name, p50, _, rps, _ in rows:
        added = p50 - ip50
        print(
            f"  {name}: p50 added {added:.2f} ms = {added / TARGET_ADDED_P50_MS:.2f}x the {TARGET_ADDED_P50_MS:.0f} ms "
            f"budget ({'met' if added <= TARGET_ADDED_P50_MS else 'MISSED'}); {rps:.0f} req/s = "
            f"{rps / TARGET_RPS:.2f}x the {TARGET_RPS:.0f} req/s target ({'met' if rps >= TARGET_RPS else 'MISSED'})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
