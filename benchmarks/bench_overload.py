"""Overload and expert restarts on the real server (issue 10 items 8 and 9).

    .venv/bin/python benchmarks/bench_overload.py --bundle runs/sst2_bench [--factor 3] [--deadline-s 1]

1. Capacity: the full subnet (pinned), 32 requests in flight, closed loop: requests per second.
2. Overload: an open loop at `--factor` times that capacity for `--seconds`, every request with a
   `--deadline-s` deadline. Prints what came back (OK, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
   other), the rate of successes against capacity, the p50 / p99 latency of successes and of
   refusals. Admission control's targets: successes >= 0.9x capacity, p99 of successes under the
   deadline, refusals answered within 50 ms.
3. Restart: an open loop at half the capacity; the expert process that runs the full subnet is
   killed (SIGKILL); prints the seconds until the full subnet answers again without a fallback.

A text bundle makes the experts, not the gateway, the bottleneck (a digits request costs the
gateway more than the experts). Train a small one with
`dynaroute train sst2 --data DIR --out runs/sst2_bench --max-examples 400 --steps 2 --max-length 48`
(accuracy does not matter here; the full model's cost is a real MiniLM's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadgen import Sent, capacity, percentile_ms, served, steady
from loadgen import open_loop as open_loop_at

from dynaroute.bundle import Bundle

SENTENCES = [
    "a gripping , funny and moving film that never lets its audience go",
    "the plot is thin and the jokes fall flat for most of its running time",
    "an intelligent , beautifully acted drama about families and what holds them together",
    "it is a dull , plodding picture that mistakes length for depth",
]


def pinned(subnet: str) -> Callable[[int], dict[str, Any]]:
    """The i-th request: one of SENTENCES, `subnet` pinned."""
    return lambda i: {"text": SENTENCES[i % len(SENTENCES)], "subnet": subnet}


async def open_loop(address: str, subnet: str, rate: float, seconds: float, deadline_s: float,
                    on_reply: Callable[[float, object], None] | None = None) -> list[Sent]:
    """Requests evenly spaced at `rate` for `seconds`, `subnet` pinned (loadgen.open_loop)."""
    return await open_loop_at(address, pinned(subnet), steady(rate, seconds), deadline_s, on_reply)


def expert_pids() -> list[int]:
    """Ray expert actor processes on this machine (descendants of the server we started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::ExpertWorker"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def restart(address: str, subnet: str, rate: float, seconds: float) -> dict:
    before = {p: cpu_ticks(p) for p in expert_pids()}
    await open_loop(address, subnet, rate, 3.0, 10.0)
    busiest = max(before, key=lambda p: cpu_ticks(p) - before[p])  # the one that ran `subnet`
    replies: list[tuple[float, bool]] = []
    killed_at: list[float] = []

    async def kill_later() -> None:
        await asyncio.sleep(3.0)
        os.kill(busiest, signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = asyncio.create_task(kill_later())
    results = await open_loop(address, subnet, rate, seconds, 10.0,
                              on_reply=lambda t, r: replies.append((t, bool(r.route.fallbacks))))
    await killer
    t_kill = killed_at[0]
    fell_back = [t for t, f in replies if f and t > t_kill]
    back = [t for t, f in replies if not f and fell_back and t > fell_back[0]]
    return {"killed_pid": busiest, "fallback_replies": len(fell_back),
            "back_after_s": (back[0] - t_kill) if back else None,
            "statuses": Counter(r.status for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/sst2_bench")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load / capacity")
    parser.add_argument("--deadline-s", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the overload and restart runs")
    parser.add_argument("--capacity-n", type=int, default=600)
    args = parser.parse_args()
    bundle = Bundle.load(args.bundle)
    subnet = bundle.full_subnet
    with served(Path(args.bundle)) as address:
        cap = asyncio.run(capacity(address, pinned(subnet), args.capacity_n))
        print(f"capacity, {subnet} pinned, 32 in flight: {cap:.1f} req/s")
        rate = args.factor * cap
        res = asyncio.run(open_loop(address, subnet, rate, args.seconds, args.deadline_s))
        statuses = Counter(r.status for r in res)
        ok = [r.latency_s for r in res if r.status == "OK"]
        refused = [r.latency_s for r in res if r.status == "RESOURCE_EXHAUSTED"]
        print(f"overload: {args.factor:g}x capacity ({rate:.0f} req/s offered) for {args.seconds:g} s, "
              f"{args.deadline_s:g} s deadlines, {len(res)} requests: {dict(statuses)}")
        ok_rate = len(ok) / args.seconds
        print(f"  successes {ok_rate:.1f} req/s = {ok_rate / cap:.2f}x capacity (target >= 0.9x); p50 "
              f"{percentile_ms(ok, 50):.0f} ms, p99 {percentile_ms(ok, 99):.0f} ms "
              f"(target < {args.deadline_s * 1e3:.0f})")
        print(f"  refusals p50 {percentile_ms(refused, 50):.1f} ms, p99 {percentile_ms(refused, 99):.1f} ms "
              "(target < 50 ms)")
        r = asyncio.run(restart(address, subnet, 0.5 * cap, args.seconds))
        print(f"restart: killed expert pid {r['killed_pid']} under {0.5 * cap:.0f} req/s; "
              f"{r['fallback_replies']} replies served by a fallback; the full subnet answered again "
              f"{r['back_after_s'] if r['back_after_s'] is None else round(r['back_after_s'], 1)} s after the kill "
              f"(target < 10 s); statuses {dict(r['statuses'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
