"""Is the dynamic BERT's FLOPs saving real time? Requests/s through the gateway, same load.

    .venv/bin/python benchmarks/bench_text_serving.py --bundle runs/sst2_full \
        [--data data/sst2] [--budget-quality Q | --budget-target-accuracy A]

Starts `dynaroute serve` on the bundle (local Ray, free ports), then sends SST-2 dev sentences
with 32 requests in flight over one channel, first with the full subnet pinned, then at the
dynamic budget (by default the calibrated point within 0.5 points of the full model's
validation accuracy), and prints requests/s, accuracy and mean FLOPs share for each and the
ratio of the two throughputs (issue 5's bar: at least 2x). With --repeats R the two runs
alternate R times on the same server and the medians are reported (a shared machine's load
drifts; alternating keeps both routes under the same drift). With --cpu it also prints, per
route, the CPU milliseconds each process spent per request (the gateway, the expert actors, this
load generator), read from /proc (Linux), to show where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
from loadgen import dynamic_budget

from dynaroute.bundle import Bundle
from dynaroute.client import AsyncClient
from dynaroute.data import read_sst2
from dynaroute.demo import start_server

CONCURRENCY = 32


async def run(address: str, texts: list[str], labels: np.ndarray, **budget: object) -> dict[str, float]:
    """Every sentence once, CONCURRENCY callers with one request in flight each."""
    correct = 0
    ratios: list[float] = []
    async with AsyncClient(address, timeout_s=120) as client:
        await asyncio.gather(*(client.infer(text=t, **budget) for t in texts[:CONCURRENCY]))  # warm-up
        todo = iter(range(len(texts)))

        async def caller() -> None:
            nonlocal correct
            for i in todo:
                reply = await client.infer(text=texts[i], **budget)
                correct += int(reply.outputs.label == labels[i])
                ratios.append(reply.cost.flops_ratio)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - t0
    return {"rps": len(texts) / elapsed, "accuracy": correct / len(texts), "flops_ratio": float(np.mean(ratios))}


def cpu_seconds() -> dict[int, tuple[float, str]]:
    """pid -> (user + system CPU seconds so far, command line) of every process on the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ").strip()
        except OSError:  # the process ended meanwhile
            continue
        out[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick, cmd)
    return out


def cpu_ms_per_request(before: dict, after: dict, requests: int, server_pid: int) -> dict[str, float]:
    """CPU ms per request between two `cpu_seconds` readings, by role."""
    roles: dict[str, float] = {}
    for pid, (seconds, cmd) in after.items():
        spent = seconds - before.get(pid, (0.0, ""))[0]
        role = ("gateway" if pid == server_pid else "load generator" if pid == os.getpid()
                else "expert actors" if "ExpertWorker" in cmd else "other")
        roles[role] = roles.get(role, 0.0) + 1000 * spent / requests
    return roles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/sst2_full")
    parser.add_argument("--data", default="data/sst2", help="folder with dev.tsv")
    parser.add_argument("--placement", default=None, help="placement JSON passed to `dynaroute serve`")
    parser.add_argument("--n", type=int, default=872, help="dev sentences to send per run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating pinned/dynamic runs (medians reported)")
    parser.add_argument("--cpu", action="store_true", help="CPU ms per request by process role (from /proc)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-quality", type=float, default=None)
    budget.add_argument("--budget-target-accuracy", type=float, default=None)
    args = parser.parse_args()

    bundle = Bundle.load(args.bundle)
    texts, labels = read_sst2(Path(args.data) / "dev.tsv", limit=args.n)
    dynamic = dynamic_budget(bundle, args.budget_quality, args.budget_target_accuracy, backend="torch")

    extra = ["--placement", args.placement] if args.placement else []
    proc, address = start_server(Path(args.bundle), extra_args=extra)
    runs: dict[str, list[dict[str, float]]] = {"pinned": [], "routed": []}
    cpu: dict[str, list[dict[str, float]]] = {"pinned": [], "routed": []}
    budgets = {"pinned": {"subnet": bundle.full_subnet}, "routed": dynamic}
    try:
        for _ in range(max(1, args.repeats)):
            for name, budget in budgets.items():
                before = cpu_seconds() if args.cpu else {}
                runs[name].append(asyncio.run(run(address, texts, labels, **budget)))
                if args.cpu:  # the warm-up requests are counted too: CONCURRENCY more
                    cpu[name].append(cpu_ms_per_request(before, cpu_seconds(), len(texts) + CONCURRENCY, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    for name, rs in runs.items():
        print(f"{name} req/s per run: " + ", ".join(f"{r['rps']:.1f}" for r in rs))
    for name, readings in cpu.items():
        if readings:
            roles = sorted({role for r in readings for role in r})
            medians = {role: float(np.median([r.get(role, 0.0) for r in readings])) for role in roles}
            print(f"{name} CPU ms per request (median): " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    pinned, routed = ({k: float(np.median([r[k] for r in rs])) for k in rs[0]} for rs in runs.values())

    budget_text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in dynamic.items())
    print(f"{bundle.name}: {len(texts)} SST-2 dev sentences, {CONCURRENCY} in flight, through gRPC + Ray; "
          f"medians of {max(1, args.repeats)} alternating runs")
    print(f"{'route':<44} {'req/s':>8} {'accuracy':>9} {'FLOPs/full':>11}")
    for name, r in ((f"pinned full subnet {bundle.full_subnet}", pinned), (f"dynamic ({budget_text})", routed)):
        print(f"{name:<44} {r['rps']:>8.1f} {r['accuracy']:>9.2%} {r['flops_ratio']:>11.1%}")
    ratio = routed["rps"] / pinned["rps"]
    print(f"dynamic / full throughput: {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'missed'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
