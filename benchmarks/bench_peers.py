"""Is dynaroute faster than what a user would pick instead? (issue 14)

    .venv/bin/python benchmarks/bench_peers.py --bundle runs/sst2_full [--data data/sst2] \\
        [--repeats 3] [--requests N | --seconds S] [--systems torch ort-int8 rayserve dynaroute-int8-dynamic ...] \\
        [--budget-quality Q | --budget-target-accuracy A] [--threads T] [--out results.json]

One load generator drives every system with the same SST-2 dev sentences (data/sst2/dev.tsv,
in file order), 32 requests in flight (a closed loop: each caller sends its next sentence when
its reply comes), one round of 32 to warm up before each run. The systems:

- `torch`: the bundle's full subnet in this process, torch eager, sentences batched up to 32 as
  they arrive (dynaroute's MicroBatcher, the same rule as the gateway's) and padded to the
  batch's longest (dynamic padding);
- `ort-fp32`, `ort-int8`: the same, on ONNX Runtime: the full subnet exported as one graph
  (`dynaroute.experts.backends.export_model`, checked within 1e-4 of torch) and that graph with
  ONNX Runtime's dynamic int8 quantisation (`quantize_int8`, the int8 backend's), as a user
  would build them; no early-exit stages;
- `rayserve`: the full subnet behind Ray Serve (benchmarks/peers_rayserve.py): a deployment with
  `@serve.batch(max_batch_size=32)`, gRPC ingress through Ray Serve's gRPCOptions with
  dynaroute's own servicer, so the same client sends to it (with Ray Serve's `application`
  metadata);
- `dynaroute-B-full`, `dynaroute-B-dynamic` for each backend B in torch, onnx, int8:
  `dynaroute serve BUNDLE --backend B` (real Ray, real gRPC, the default placement), with the
  full subnet pinned (`subnet=`, as bench_text_serving.py's "pinned") and at the dynamic budget
  (by default the calibrated point within 0.5 points of the full model's validation accuracy on
  that backend's calibration; --budget-quality / --budget-target-accuracy). The bundle must be
  exported for onnx and int8; `dynaroute export` is run here when it is not (note that it makes
  int8 the bundle's default backend; every server here is given --backend).

The in-process systems and the Ray Serve replica use --threads torch / ONNX Runtime threads
(default: torch's default, one per core), as a user's would; dynaroute's experts run one thread
each on the two replicas of its default placement (every subnet on both, so every route can use
both cores). Every server is started once and stays up; each
repeat runs every system once, in turn (the machine's load drifts; alternating keeps every
system under the same drift), and the medians over repeats are reported. The servers at rest
beside a run cost it a little CPU (the idle CPU column); --one-server-at-a-time starts each
server for its own runs only, and alternates systems only with those of the same server.

Per system: requests/s, p50 / p99 latency (ms, client side), accuracy on the sentences answered,
FLOPs as a share of the full model's (dynaroute replies carry it; static systems are 1), and
idle memory: RSS and PSS summed over the server's process tree (psutil, after warm-up, before
any load), for in-process systems of a process that only loads the model and answers one batch
(benchmarks/peers_probe.py); and each server's CPU use at rest (in cores, all servers idle,
measured together over 5 s), which is what it takes from the others' runs. Then the two
ratios: (a) best dynaroute dynamic req/s over the best static alternative's (torch, ort-fp32,
ort-int8, rayserve), with the accuracy difference; (b) dynaroute with the full subnet pinned on
backend B over in-process B (torch, onnx = ort-fp32, int8 = ort-int8). Results go to --out
(default: BUNDLE/bench_peers.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import torch
from loadgen import dynamic_budget
from peers_probe import tree_cpu_seconds, tree_memory
from peers_rayserve import METADATA as RAYSERVE_METADATA

from dynaroute.bundle import Bundle
from dynaroute.client import AsyncClient, make_request
from dynaroute.data import read_sst2
from dynaroute.demo import start_server, start_until
from dynaroute.experts.backends import OnnxBackend, export_model, quantize_int8
from dynaroute.export import made_inputs
from dynaroute.gateway.batcher import MicroBatcher
from dynaroute.text import TextEncoder

CONCURRENCY = 32
MAX_BATCH_SIZE = 32
MAX_WAIT_MS = 2.0  # dynaroute serve's default --max-wait-ms, for every batcher here
HERE = Path(__file__).resolve().parent
IDLE_CPU_S = 5.0
BACKENDS = ("torch", "onnx", "int8")
IN_PROCESS = {"torch": "torch", "onnx": "ort-fp32", "int8": "ort-int8"}  # backend -> the in-process system
STATIC = ("torch", "ort-fp32", "ort-int8", "rayserve")
SYSTEMS = (*STATIC, *(f"dynaroute-{b}-{route}" for b in BACKENDS for route in ("full", "dynamic")))
LABELS = {
    "torch": "in-process torch",
    "ort-fp32": "in-process ONNX Runtime fp32",
    "ort-int8": "in-process ONNX Runtime int8",
    "rayserve": "Ray Serve (gRPC, @serve.batch 32)",
    **{f"dynaroute-{b}-full": f"dynaroute {b}, full pinned" for b in BACKENDS},
    **{f"dynaroute-{b}-dynamic": f"dynaroute {b}, dynamic" for b in BACKENDS},
}
RAYSERVE_READY = re.compile(r"rayserve: serving grpc=(\S+)")

Infer = Callable[[str], Awaitable[tuple[int, float]]]  # sentence -> (label, FLOPs / full)


# --- the systems ----------------------------------------------------------------------------------

class System(ABC):
    """Something that answers sentences: `caller()` gives, inside a running event loop, the
    coroutine function that answers one."""

    memory: dict[str, int] | None = None  # idle RSS / PSS bytes
    pid: int | None = None  # a server's process (None: in this one)
    idle_cpu: float | None = None  # a server's CPU use at rest, in cores

    @abstractmethod
    def caller(self) -> Any:  # an async context manager yielding an Infer
        ...


class InProcess(System):
    """A model in this process: `predict(sentences) -> labels`, run in a worker thread on
    batches that the MicroBatcher forms from the sentences in flight."""

    def __init__(self, predict: Callable[[list[str]], list[int]]):
        self.predict = predict

    @asynccontextmanager
    async def caller(self) -> AsyncIterator[Infer]:
        async def run_batch(texts: list[str]) -> list[int]:
            return await asyncio.to_thread(self.predict, texts)

        batcher: MicroBatcher[str, int] = MicroBatcher(run_batch, max_batch_size=MAX_BATCH_SIZE,
                                                       max_wait_ms=MAX_WAIT_MS, max_queue_size=1 << 16)

        async def infer(text: str) -> tuple[int, float]:
            return (await batcher.submit(text)).value, 1.0

        try:
            yield infer
        finally:
            await batcher.close()


class Served(System):
    """A gRPC server speaking dynaroute.v1 (dynaroute serve, or Ray Serve with our servicer);
    `budget`: the keyword arguments of each `AsyncClient.infer`."""

    def __init__(self, address: str, pid: int, budget: dict[str, Any], static: bool,
                 metadata: tuple[tuple[str, str], ...] = ()):
        self.address, self.pid, self.budget, self.static, self.metadata = address, pid, budget, static, metadata

    @asynccontextmanager
    async def caller(self) -> AsyncIterator[Infer]:
        async with AsyncClient(self.address) as client:
            async def infer(text: str) -> tuple[int, float]:
                request = make_request(text=text, **self.budget)
                reply = await client.stub.Infer(request, timeout=120, metadata=self.metadata)
                return int(reply.outputs.label), 1.0 if self.static else float(reply.cost.flops_ratio)

            yield infer


def torch_predict(bundle: Bundle, encoder: TextEncoder) -> Callable[[list[str]], list[int]]:
    model = bundle.extract(bundle.full_subnet).eval()

    def predict(texts: list[str]) -> list[int]:
        with torch.no_grad():
            return model(encoder.encode(texts)).argmax(-1).tolist()

    return predict


def ort_predict(path: Path, encoder: TextEncoder, threads: int) -> Callable[[list[str]], list[int]]:
    session = OnnxBackend().session(path, threads)

    def predict(texts: list[str]) -> list[int]:
        ids, mask = encoder.encode(texts)
        (logits,) = session.run(None, {"in0": ids.numpy(), "in1": mask.numpy()})
        return logits.argmax(-1).tolist()

    return predict


def export_full(bundle: Bundle, folder: Path) -> dict[str, Path]:
    """The full subnet as one ONNX graph, fp32 and int8, in `folder`; fp32 is checked within
    1e-4 of torch on sentences of several lengths."""
    import onnxruntime as ort

    model = bundle.extract(bundle.full_subnet).eval()
    fp32 = export_model(model, made_inputs(bundle, 1), made_inputs(bundle, 3, seed=1))
    paths = {"fp32": folder / "full-fp32.onnx", "int8": folder / "full-int8.onnx"}
    paths["fp32"].write_bytes(fp32)
    paths["int8"].write_bytes(quantize_int8(fp32))
    ids, mask = made_inputs(bundle, 8)
    (got,) = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"]).run(
        None, {"in0": ids.numpy(), "in1": mask.numpy()})
    with torch.no_grad():
        diff = float(np.abs(got - model((ids, mask)).numpy()).max())
    if diff > 1e-4:
        raise RuntimeError(f"the exported full model's logits differ from torch's by {diff:.3g} (> 1e-4)")
    return paths


def probe_memory(system: str, bundle: Path, threads: int, model: Path | None = None) -> dict[str, int]:
    cmd = [sys.executable, str(HERE / "peers_probe.py"), system, str(bundle), "--threads", str(threads)]
    out = subprocess.run([*cmd, *(["--model", str(model)] if model else [])], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- the load generator ---------------------------------------------------------------------------

async def drive(system: System, texts: list[str], labels: np.ndarray, requests: int | None,
                seconds: float | None) -> dict[str, float]:
    """CONCURRENCY callers, each with one request in flight, through the sentences in order
    (cycling), until `requests` were sent or `seconds` passed; after one warm-up round."""
    async with system.caller() as infer:
        await asyncio.gather(*(infer(texts[i % len(texts)]) for i in range(CONCURRENCY)))
        latency: list[float] = []
        correct, flops = 0, 0.0
        sent = 0
        t0 = time.perf_counter()
        stop_at = t0 + seconds if seconds else float("inf")

        async def one_caller() -> None:
            nonlocal sent, correct, flops
            while (requests is None or sent < requests) and time.perf_counter() < stop_at:
                i, sent = sent % len(texts), sent + 1
                start = time.perf_counter()
                label, ratio = await infer(texts[i])
                latency.append(time.perf_counter() - start)
                correct += int(label == labels[i])
                flops += ratio

        await asyncio.gather(*(one_caller() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - t0
    ms = np.asarray(latency) * 1e3
    n = len(latency)
    return {"requests": n, "seconds": elapsed, "rps": n / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "accuracy": correct / n, "flops_ratio": flops / n}


# --- the run --------------------------------------------------------------------------------------

def ensure_exported(bundle_path: Path, backends: set[str], data: Path) -> None:
    """Run `dynaroute export` for each backend in `backends` that the bundle lacks."""
    for backend in ("onnx", "int8"):
        if backend in backends and backend not in Bundle.load(bundle_path).backends:
            print(f"exporting {bundle_path} for {backend} (once) ...", flush=True)
            subprocess.run([sys.executable, "-m", "dynaroute", "export", str(bundle_path), "--backend", backend,
                            "--data", str(data), "--repeats", "3"], check=True, stdout=subprocess.DEVNULL)


def stop(proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """SIGTERM to a server, then SIGKILL to it and to whatever of its process tree (its Ray) is
    left once it has exited or `timeout_s` has passed."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def build(args: argparse.Namespace, names: list[str], bundle: Bundle, folder: Path,
          procs: list[subprocess.Popen], failed: dict[str, str]) -> dict[str, System]:
    """The systems called `names`, started (servers: appended to `procs`, for stopping). A server
    that does not start is left out, its systems in `failed` with the reason, so that one peer's
    trouble does not cost the others' figures."""
    systems: dict[str, System] = {}
    encoder = TextEncoder.from_bundle(bundle)
    if "torch" in names:
        systems["torch"] = InProcess(torch_predict(bundle, encoder))
        systems["torch"].memory = probe_memory("torch", bundle.root, args.threads)
    if {"ort-fp32", "ort-int8"} & set(names):
        print("exporting the full model as one ONNX graph, fp32 and int8 ...", flush=True)
        graphs = export_full(bundle, folder)
        for kind in ("fp32", "int8"):
            if f"ort-{kind}" in names:
                systems[f"ort-{kind}"] = InProcess(ort_predict(graphs[kind], encoder, args.threads))
                systems[f"ort-{kind}"].memory = probe_memory("onnx", bundle.root, args.threads, graphs[kind])
    if "rayserve" in names:
        print("starting Ray Serve ...", flush=True)
        try:
            proc, ready = start_until([sys.executable, str(HERE / "peers_rayserve.py"), str(bundle.root),
                                       "--threads", str(args.threads)], RAYSERVE_READY, "Ray Serve", tag="rayserve")
        except RuntimeError as e:
            failed["rayserve"] = str(e)
        else:
            procs.append(proc)
            systems["rayserve"] = Served(ready.group(1), proc.pid, {}, static=True, metadata=RAYSERVE_METADATA)
            systems["rayserve"].memory = tree_memory(proc.pid)
    for backend in BACKENDS:
        routes = [r for r in ("full", "dynamic") if f"dynaroute-{backend}-{r}" in names]
        if not routes:
            continue
        print(f"starting dynaroute serve --backend {backend} ...", flush=True)
        try:
            proc, address = start_server(bundle.root, extra_args=["--backend", backend])
        except RuntimeError as e:
            failed.update({f"dynaroute-{backend}-{r}": str(e) for r in routes})
            continue
        procs.append(proc)
        budgets = {"full": {"subnet": bundle.full_subnet},
                   "dynamic": dynamic_budget(bundle, args.budget_quality, args.budget_target_accuracy, backend)}
        for route in routes:
            systems[f"dynaroute-{backend}-{route}"] = Served(address, proc.pid, budgets[route], static=False)
        # Idle: after a warm-up of each route (experts load their modules lazily on first use).
        for route in routes:
            asyncio.run(drive(systems[f"dynaroute-{backend}-{route}"], ["warm up"] * CONCURRENCY,
                              np.zeros(CONCURRENCY), CONCURRENCY, None))
        memory = tree_memory(proc.pid)
        for route in routes:
            systems[f"dynaroute-{backend}-{route}"].memory = memory
    idle_cpu(list(systems.values()))
    return {n: systems[n] for n in names if n in systems}


def idle_cpu(systems: list[System], seconds: float = IDLE_CPU_S) -> None:
    """Each server's CPU use while all are idle, measured together over `seconds`: what a
    server at rest takes from the others' runs (they all stay up)."""
    pids = {s.pid for s in systems if s.pid is not None}
    before = {pid: tree_cpu_seconds(pid) for pid in pids}
    time.sleep(seconds)
    use = {pid: (tree_cpu_seconds(pid) - before[pid]) / seconds for pid in pids}
    for s in systems:
        s.idle_cpu = use.get(s.pid) if s.pid is not None else None


def server_groups(names: list[str]) -> list[list[str]]:
    """`names` by the server they need (the in-process systems together), in order of first use."""
    groups: dict[str, list[str]] = {}
    for n in names:
        key = "in-process" if n in IN_PROCESS.values() else n.rsplit("-", 1)[0] if n.startswith("dynaroute-") else n
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The two target ratios, from the systems that were run."""
    out: dict[str, Any] = {}
    static = {n: r for n, r in results.items() if n in STATIC}
    dynamic = {n: r for n, r in results.items() if n.endswith("-dynamic")}
    if static and dynamic:
        best_static = max(static, key=lambda n: static[n]["rps"])
        best_dynamic = max(dynamic, key=lambda n: dynamic[n]["rps"])
        out["dynamic_over_best_static"] = {
            "dynamic": best_dynamic, "static": best_static,
            "ratio": dynamic[best_dynamic]["rps"] / static[best_static]["rps"],
            "accuracy_difference": dynamic[best_dynamic]["accuracy"] - static[best_static]["accuracy"]}
    out["pinned_full_over_in_process"] = {
        b: results[f"dynaroute-{b}-full"]["rps"] / results[IN_PROCESS[b]]["rps"]
        for b in BACKENDS if f"dynaroute-{b}-full" in results and IN_PROCESS[b] in results}
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| system | req/s | p50 ms | p99 ms | accuracy | FLOPs / full | idle RSS MiB | idle PSS MiB | idle CPU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        mem = r.get("memory") or {}
        rss, pss = (f"{mem[k] / 2**20:.0f}" if k in mem else "-" for k in ("rss", "pss"))
        cpu = "-" if r.get("idle_cpu") is None else f"{r['idle_cpu']:.0%}"
        lines.append(f"| {LABELS[name]} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['accuracy']:.2%} | {r['flops_ratio']:.1%} | {rss} | {pss} | {cpu} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/sst2_full")
    parser.add_argument("--data", default="data/sst2", help="folder with dev.tsv")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), metavar="SYSTEM",
                        help=f"a subset, in the order to run them (default: all: {' '.join(SYSTEMS)})")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every system, alternated (medians)")
    size = parser.add_argument_group("run length (default: every dev sentence once per run)")
    size.add_argument("--requests", type=int, default=None, help="requests per run")
    size.add_argument("--seconds", type=float, default=None, help="seconds per run (with --requests: whichever first)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch / ONNX Runtime threads of the in-process systems and the Ray Serve replica "
                             "(default: %(default)s, torch's default here)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-quality", type=float, default=None)
    budget.add_argument("--budget-target-accuracy", type=float, default=None)
    parser.add_argument("--one-server-at-a-time", action="store_true",
                        help="start each server only for its own runs (no idle servers beside a run; systems are "
                             "then alternated only with those of the same server)")
    parser.add_argument("--out", default=None, help="results JSON (default: BUNDLE/bench_peers.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts, labels = read_sst2(Path(args.data) / "dev.tsv")
    requests = args.requests if args.requests or args.seconds else len(texts)
    bundle_path = Path(args.bundle)
    ensure_exported(bundle_path, {b for b in BACKENDS if any(n.startswith(f"dynaroute-{b}-") for n in args.systems)},
                    Path(args.data))
    bundle = Bundle.load(bundle_path)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in args.systems}
    systems: dict[str, System] = {}
    failed: dict[str, str] = {}  # system -> why it has no figures
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for group in server_groups(args.systems) if args.one_server_at_a_time else [args.systems]:
            procs: list[subprocess.Popen] = []
            try:
                systems.update(build(args, group, bundle, Path(tmp), procs, failed))
                for repeat in range(max(1, args.repeats)):
                    for name in group:
                        if name in failed:
                            continue
                        try:
                            runs[name].append(asyncio.run(drive(systems[name], texts, labels, requests,
                                                                args.seconds)))
                        except (grpc.RpcError, OSError, RuntimeError) as e:  # a server died or refused: say why
                            failed[name] = f"repeat {repeat + 1}: {e!r}"
                            print(f"  {name} failed: {failed[name]}", flush=True)
                            continue
                        r = runs[name][-1]
                        print(f"  repeat {repeat + 1} {name}: {r['rps']:.1f} req/s, p99 {r['p99_ms']:.0f} ms, "
                              f"accuracy {r['accuracy']:.2%}, FLOPs {r['flops_ratio']:.1%}", flush=True)
            finally:
                for proc in procs:
                    stop(proc)
    results = {n: {**median(rs), "memory": systems[n].memory, "idle_cpu": systems[n].idle_cpu, "runs": rs}
               for n, rs in runs.items() if rs and n not in failed}
    summary = summarise(results)
    length = " or ".join(([f"{requests} requests"] if requests else [])
                         + ([f"{args.seconds:g} s"] if args.seconds else []))
    print(f"\n{bundle.name} ({bundle_path}): SST-2 dev sentences, {CONCURRENCY} in flight, {length} per run, "
          f"medians of {max(1, args.repeats)} alternating runs, {args.threads} threads for in-process and Ray Serve")
    print(table(results))
    for name, why in failed.items():
        print(f"no figures for {LABELS[name]}: {why}")
    if "dynamic_over_best_static" in summary:
        s = summary["dynamic_over_best_static"]
        print(f"(a) best dynaroute dynamic ({LABELS[s['dynamic']]}) / best static alternative "
              f"({LABELS[s['static']]}): {s['ratio']:.2f}x req/s, accuracy {100 * s['accuracy_difference']:+.2f} pt")
    for b, ratio in summary["pinned_full_over_in_process"].items():
        print(f"(b) dynaroute {b}, full pinned / {LABELS[IN_PROCESS[b]]}: {ratio:.2f}x req/s")
    out = Path(args.out) if args.out else bundle_path / "bench_peers.json"
    out.write_text(json.dumps({
        "bundle": str(bundle_path), "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "concurrency": CONCURRENCY, "threads": args.threads, "repeats": max(1, args.repeats),
        "one_server_at_a_time": args.one_server_at_a_time,
        "requests_per_run": requests, "seconds_per_run": args.seconds,
        "budgets": {n: s.budget for n, s in systems.items() if isinstance(s, Served)},
        "wall_s": time.perf_counter() - started, "systems": results, "failed": failed, "summary": summary},
        indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
