"""`dynaroute demo` (`make demo`): the whole system on this machine in one command.

Trains the digits bundle if it is absent, serves it with `dynaroute serve` on local Ray (a
subprocess on free ports), sends the test split through the asyncio client at budgets quality
0, 0.5 and 1, prints accuracy, mean FLOPs as a share of the full model's and p50 / p99
latency per budget, then stops the server with SIGTERM and checks that it exits cleanly.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

READY = re.compile(r"dynaroute: serving model=(\S+) grpc=(\S+) metrics=(\S+)")
QUALITIES = (0.0, 0.5, 1.0)
CONCURRENCY = 16


@dataclass(frozen=True)
class BudgetRow:
    quality: float
    accuracy: float
    flops_ratio: float
    p50_ms: float
    p99_ms: float


def start_server(
    bundle: Path, timeout_s: float = 300.0, extra_args: Sequence[str] = ()
) -> tuple[subprocess.Popen, str]:
    """`dynaroute serve` as a subprocess on free ports; returns it and its gRPC address once the
    ready line appears (its output is echoed, prefixed, so that start-up problems are visible)."""
    cmd = [sys.executable, "-m", "dynaroute", "serve", str(bundle), "--port", "0", "--metrics-port", "0", *extra_args]
    proc, ready = start_until(cmd, READY, "dynaroute serve", timeout_s)
    return proc, ready.group(2)


def start_until(
    cmd: Sequence[str], ready: re.Pattern[str], what: str, timeout_s: float = 300.0, tag: str = "server"
) -> tuple[subprocess.Popen, re.Match[str]]:
    """Start `cmd` and wait for a line of its output that matches `ready`; returns the process
    and that match. Its ready line and any line that looks like an error are echoed, prefixed
    with `[tag]`. Raises RuntimeError (having killed it) when it exits or `timeout_s` passes first."""
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    found: list[re.Match[str]] = []
    event = threading.Event()

    def read() -> None:  # keeps draining the pipe for the process's life, so that it never blocks on it
        assert proc.stdout is not None
        for line in proc.stdout:
            m = None if found else ready.search(line)
            if m:
                found.append(m)
                event.set()
            if m or "ERROR" in line or "Error" in line or "stopped" in line:
                print(f"  [{tag}] {line.rstrip()}", flush=True)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not event.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not become ready (exit code {proc.poll()})")
    return proc, found[0]


async def run_budget(address: str, x: np.ndarray, y: np.ndarray, quality: float) -> BudgetRow:
    """Every test example at one budget, `CONCURRENCY` requests in flight over one channel."""
    from dynaroute.client import AsyncClient

    slots = asyncio.Semaphore(CONCURRENCY)
    latency = np.zeros(len(x))
    labels = np.zeros(len(x), dtype=np.int64)
    ratios = np.zeros(len(x))
    async with AsyncClient(address, timeout_s=60) as client:

        async def one(i: int) -> None:
            async with slots:
                t0 = time.perf_counter()
                reply = await client.infer(x[i], id=str(i), quality=quality)
                latency[i] = time.perf_counter() - t0
                labels[i] = reply.outputs.label
                ratios[i] = reply.cost.flops_ratio

        await asyncio.gather(*(one(i) for i in range(len(x))))
    return BudgetRow(
        quality, float((labels == y).mean()), float(ratios.mean()),
        float(np.percentile(latency, 50) * 1e3), float(np.percentile(latency, 99) * 1e3),
    )


def format_table(rows: list[BudgetRow], n: int) -> str:
    lines = [
        f"{n} test examples, {CONCURRENCY} in flight, through gRPC + Ray",
        f"{'quality':>8} {'accuracy':>9} {'FLOPs / full':>13} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r.quality:>8.1f} {r.accuracy:>9.2%} {r.flops_ratio:>13.1%} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f}"
        )
    return "\n".join(lines)


def main_demo(args: argparse.Namespace) -> int:
    from dynaroute.data import load_digits_splits

    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        from dynaroute.training.digits import train_digits

        print(f"training the digits bundle into {bundle} (once) ...", flush=True)
        train_digits(bundle)
    print(f"serving {bundle} on local Ray ...", flush=True)
    proc, address = start_server(bundle)
    try:
        test = load_digits_splits().test
        rows = [asyncio.run(run_budget(address, test.x, test.y, q)) for q in QUALITIES]
        print(format_table(rows, len(test)), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    print(f"server stopped with SIGTERM, exit code {code}", flush=True)
    return 0 if code == 0 else 1
