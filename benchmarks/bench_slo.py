"""Holding a latency objective under bursts by spending less per request (issue 12).

    .venv/bin/python benchmarks/bench_slo.py --bundle runs/sst2_bench --data data/sst2
    .venv/bin/python benchmarks/bench_slo.py --bundle runs/digits

One `dynaroute serve --slo-ms` on local Ray. First the full model's capacity (pinned, 32 in flight,
closed loop); then, for each deadline (`--deadlines`, default 1 s and 250 ms), the same open-loop
trace three times: `--low` x capacity for `--low-s`, `--factor` x capacity for `--burst-s`, back to
`--low` x for `--after-s`, every request with that deadline, labelled inputs in a fixed order
(SST-2 dev sentences, or the digits test split). The reference accuracy is the full model's on
the same inputs, answered at low load (4 in flight) before the runs. Three ways of serving it:

- full: the full subnet pinned;
- fixed: a fixed dynamic budget (`--fixed-quality`), never lowered;
- slo: quality 1 (the most accurate calibrated point) with a floor (`--floor-quality`): the SLO
  controller lowers it, down to the floor, while the queues fall behind the objective (the
  request's deadline here: `--slo-ms` is the longest deadline, the request's own is tighter).

They run on the same server: the controller only ever lowers a budget with a floor, so the full
and fixed runs are served as asked (their replies say so). Per phase: the share answered within
the deadline, effective accuracy (correct and in time, over all sent), accuracy of what was
answered, the mean FLOPs ratio of what was answered, p50 / p99 latency of what was answered; and a
plot over time per deadline (`--out`/slo_<ms>ms.png: offered load, answered in time, FLOPs ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from loadgen import Sent, capacity, closed_loop, infer_kwargs, open_loop, percentile_ms, served, steady

from dynaroute.bundle import Bundle

PHASES = ("low", "burst", "after")
SERVERS = ("full", "fixed", "slo")


def labelled_inputs(bundle: Bundle, data: str | None) -> tuple[list[Any], np.ndarray]:
    """Inputs with their labels: SST-2 dev sentences for a text bundle, the digits test split else."""
    if bundle.manifest["input"].get("kind") == "text":
        from dynaroute.data import read_sst2

        root = Path(data or bundle.manifest.get("data", {}).get("path", "data/sst2"))
        texts, labels = read_sst2(root / "dev.tsv")
        return texts, labels
    from dynaroute.data import load_digits_splits

    test = load_digits_splits().test
    return list(test.x), test.y


def budget_of(server: str, full_subnet: str, args: argparse.Namespace) -> dict[str, Any]:
    if server == "full":
        return {"subnet": full_subnet}
    if server == "fixed":
        return {"quality": args.fixed_quality}
    return {"quality": 1.0, "min_quality": args.floor_quality}


def trace(cap: float, args: argparse.Namespace) -> tuple[list[float], list[str]]:
    """Send times and the phase of each request."""
    send_at: list[float] = []
    phases: list[str] = []
    t0 = 0.0
    for phase, factor, seconds in (("low", args.low, args.low_s), ("burst", args.factor, args.burst_s),
                                   ("after", args.low, args.after_s)):
        times = steady(factor * cap, seconds)
        send_at += [t0 + t for t in times]
        phases += [phase] * len(times)
        t0 += seconds
    return send_at, phases


def phase_rows(sent: list[Sent], phases: list[str], labels: np.ndarray, deadline_s: float) -> dict[str, dict]:
    """Per phase: sent, in time, effective accuracy, accuracy of answered, FLOPs ratio, p50 / p99."""
    out = {}
    for phase in PHASES:
        rows = [s for s in sent if phases[s.index] == phase]
        ok = [s for s in rows if s.status == "OK"]
        in_time = [s for s in ok if s.latency_s <= deadline_s]
        correct = [s for s in ok if s.reply.outputs.label == labels[s.index % len(labels)]]
        correct_in_time = [s for s in in_time if s.reply.outputs.label == labels[s.index % len(labels)]]
        out[phase] = {
            "sent": len(rows),
            "in_time": len(in_time) / len(rows) if rows else float("nan"),
            "effective_accuracy": len(correct_in_time) / len(rows) if rows else float("nan"),
            "answered_accuracy": len(correct) / len(ok) if ok else float("nan"),
            "flops_ratio": float(np.mean([s.reply.cost.flops_ratio for s in ok])) if ok else float("nan"),
            "lowered": sum(s.reply.route.budget_lowered for s in ok) / len(ok) if ok else float("nan"),
            "p50_ms": percentile_ms([s.latency_s for s in ok], 50),
            "p99_ms": percentile_ms([s.latency_s for s in ok], 99),
            "statuses": {k: sum(s.status == k for s in rows) for k in sorted({s.status for s in rows})},
        }
    return out


def missed_by_second(sent: list[Sent], deadline_s: float) -> dict[int, dict[str, int]]:
    """Where in the trace the requests not answered in time were sent: per whole second, per status."""
    out: dict[int, dict[str, int]] = {}
    for s in sent:
        if s.status != "OK" or s.latency_s > deadline_s:
            status = s.status if s.status != "OK" else "LATE"
            by = out.setdefault(int(s.sent_s), {})
            by[status] = by.get(status, 0) + 1
    return out


def plot(path: Path, runs: dict[str, list[Sent]], send_at: list[float], deadline_s: float, cap: float,
         bin_s: float = 0.5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(send_at) + deadline_s
    edges = np.arange(0.0, end + bin_s, bin_s)
    mids = edges[:-1] + bin_s / 2
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    offered, _ = np.histogram(send_at, edges)
    axes[0].plot(mids, offered / bin_s, color="black", label="offered")
    axes[0].axhline(cap, color="grey", linestyle=":", label="full model's capacity")
    for name, sent in runs.items():
        done = [s.sent_s + s.latency_s for s in sent if s.status == "OK" and s.latency_s <= deadline_s]
        n, _ = np.histogram(done, edges)
        axes[1].plot(mids, n / bin_s, label=name)
        ratio = [np.mean([s.reply.cost.flops_ratio for s in sent if s.status == "OK" and lo <= s.sent_s < lo + bin_s]
                         or [np.nan]) for lo in edges[:-1]]
        axes[2].plot(mids, ratio, label=name)
    axes[0].set_ylabel("requests / s sent")
    axes[1].set_ylabel(f"answered within {deadline_s * 1e3:.0f} ms / s")
    axes[2].set_ylabel("FLOPs / full model's (answered)")
    axes[2].set_xlabel("seconds into the trace (by time sent; answered: by time answered)")
    for ax in axes:
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"bursts to {max(offered) / bin_s / cap:.1f}x the full model's capacity, {deadline_s * 1e3:.0f} ms "
                 "deadlines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(deadline_s: float, results: dict[str, dict[str, dict]]) -> None:
    print(f"\ndeadline {deadline_s * 1e3:.0f} ms")
    print(f"{'server':<6} {'phase':<6} {'sent':>5} {'in time':>8} {'eff acc':>8} {'ans acc':>8} {'FLOPs':>6} "
          f"{'lowered':>8} {'p50 ms':>7} {'p99 ms':>7}  statuses")
    for server, phases in results.items():
        for phase, r in phases.items():
            print(f"{server:<6} {phase:<6} {r['sent']:>5} {r['in_time']:>8.1%} {r['effective_accuracy']:>8.1%} "
                  f"{r['answered_accuracy']:>8.1%} {r['flops_ratio']:>6.2f} {r['lowered']:>8.1%} "
                  f"{r['p50_ms']:>7.0f} {r['p99_ms']:>7.0f}  {r['statuses']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/sst2_bench")
    parser.add_argument("--data", default=None, help="SST-2 folder with dev.tsv (text bundles)")
    parser.add_argument("--deadlines", type=float, nargs="+", default=[1.0, 0.25], help="seconds")
    parser.add_argument("--factor", type=float, default=3.0, help="burst load / the full model's capacity")
    parser.add_argument("--low", type=float, default=0.5, help="load before and after the burst / capacity")
    parser.add_argument("--low-s", type=float, default=4.0)
    parser.add_argument("--burst-s", type=float, default=8.0)
    parser.add_argument("--after-s", type=float, default=6.0)
    parser.add_argument("--backend", choices=["torch", "onnx", "int8"], default=None,
                        help="the experts' backend (default: the bundle's)")
    parser.add_argument("--fixed-quality", type=float, default=0.5)
    parser.add_argument("--floor-quality", type=float, default=0.5)
    parser.add_argument("--capacity-n", type=int, default=600)
    parser.add_argument("--capacity", type=float, default=None,
                        help="the full model's capacity in requests per second, instead of measuring it (the same "
                             "trace across runs on a noisy machine)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS),
                        help="which ways of serving to run (default all three)")
    parser.add_argument("--out", default="runs/bench_slo")
    args = parser.parse_args()
    bundle = Bundle.load(args.bundle)
    inputs, labels = labelled_inputs(bundle, args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slo_ms = max(args.deadlines) * 1e3
    report: dict[str, Any] = {"bundle": args.bundle, "args": vars(args)}
    backend = ["--backend", args.backend] if args.backend else []
    with served(Path(args.bundle), ["--slo-ms", f"{slo_ms:g}", *backend]) as address:
        full_request = {"subnet": bundle.full_subnet}

        def request_of(server: str):
            budget = budget_of(server, bundle.full_subnet, args)
            return lambda i: {**infer_kwargs(inputs[i % len(inputs)]), **budget}

        def full(i: int) -> dict[str, Any]:
            return {**infer_kwargs(inputs[i % len(inputs)]), **full_request}

        # The reference: the full model's answer to every input at low load (4 in flight).
        _, answers = asyncio.run(closed_loop(address, full, len(inputs), concurrency=4))
        full_correct = np.asarray([a.outputs.label == labels[i] for i, a in enumerate(answers)])
        cap = args.capacity or asyncio.run(capacity(address, full, args.capacity_n))
        print(f"capacity, {bundle.full_subnet} pinned, 32 in flight{' (given)' if args.capacity else ''}: "
              f"{cap:.1f} req/s; full model's accuracy at "
              f"low load {full_correct.mean():.2%} on {len(inputs)} inputs")
        report["capacity"] = cap
        send_at, phases = trace(cap, args)
        # On the burst's own inputs (they cycle through the inputs in a fixed order).
        burst_reference = float(np.mean([full_correct[i % len(inputs)] for i, p in enumerate(phases)
                                         if p == "burst"]))
        for deadline_s in args.deadlines:
            runs: dict[str, list[Sent]] = {}
            results: dict[str, dict[str, dict]] = {}
            for server in args.servers:
                time.sleep(6.0)  # the controller back at its rest level, queues empty
                runs[server] = asyncio.run(open_loop(address, request_of(server), send_at, deadline_s))
                results[server] = phase_rows(runs[server], phases, labels, deadline_s)
            print_table(deadline_s, results)
            if "slo" in results:
                b = results["slo"]["burst"]
                print(f"target at {args.factor:g}x: slo answers {b['in_time']:.1%} in time (>= 99%), effective "
                      f"accuracy {b['effective_accuracy']:.2%} vs the full model's at low load on the same inputs "
                      f"{burst_reference:.2%} (within 2 points: "
                      f"{'met' if b['effective_accuracy'] >= burst_reference - 0.02 else 'not met'})"
                      + (f"; full answers {results['full']['burst']['in_time']:.1%} in time (< 50%)"
                         if "full" in results else ""))
                print("slo, not in time, per second of the trace (sent, status):",
                      missed_by_second(runs["slo"], deadline_s))
            plot(out / f"slo_{deadline_s * 1e3:.0f}ms.png", runs, send_at, deadline_s, cap)
            report[f"{deadline_s * 1e3:.0f}ms"] = {
                "burst_reference_accuracy": burst_reference, "results": results,
                "missed_by_second": {name: missed_by_second(sent, deadline_s) for name, sent in runs.items()},
            }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        print(f"\nwrote {out / 'report.json'} and the plots beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
