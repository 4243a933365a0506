"""A real Prometheus (Debian's binary) scrapes a live gateway under a short load, with the
deploy/ rules loaded: every dashboard query and every recording rule returns data, and every
rule evaluates without error."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from dynaroute.client import AsyncClient
from dynaroute.data import load_digits_splits

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_prometheus"),
]

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dynaroute.json"
# Counters that only move on events a healthy gateway does not have (a fallback needs an
# expert to fail: tests/integration/test_cluster.py makes one happen and checks the counter).
EVENT_ONLY = ("dynaroute_fallbacks_total",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """`prometheus` on 127.0.0.1:<free port>, scraping one target every second."""

    def __init__(self, tmp: Path, target: str):
        self.port = _free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROM / "rules" / "recording.yml"), str(PROM / "rules" / "alerts.yml")],
            "scrape_configs": [{"job_name": "dynaroute-gateway", "static_configs": [{"targets": [target]}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.tmp = tmp

    def get(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.tmp / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError("prometheus did not become ready:\n" + (self.tmp / "prometheus.log").read_text())

    def query(self, expr: str) -> list[dict]:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", f"{expr}: {reply}"
        return reply["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def dashboard_targets(model: str, rate_interval: str) -> list[tuple[str, str]]:
    """(panel title, expr) for every panel target, with the dashboard's variables filled in."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel["targets"]:
            expr = t["expr"].replace("$__rate_interval", rate_interval).replace("$model", model)
            out.append((panel["title"], expr))
    return out


def recording_rules() -> list[str]:
    groups = yaml.safe_load((PROM / "rules" / "recording.yml").read_text())["groups"]
    return [r["record"] for g in groups for r in g["rules"]]


def has_finite_value(result: list[dict]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


async def send_load(address: str, x: np.ndarray, n: int, concurrency: int = 8) -> list[str]:
    """n requests over a mix of budgets, `concurrency` at a time; returns the labels answered."""
    qualities = (0.0, 0.3, 0.6, 1.0)
    sem = asyncio.Semaphore(concurrency)
    async with AsyncClient(address, timeout_s=30) as client:

        async def one(i: int) -> str:
            async with sem:
                reply = await client.infer(x[i % len(x)], id=str(i), quality=qualities[i % len(qualities)])
                return reply.outputs.label_name

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_dashboard_and_recording_rules_return_data(digits_server, tmp_path: Path) -> None:
    prom = Prometheus(tmp_path, digits_server.metrics_address)
    try:
        prom.wait_ready()
        # Rates need a scrape from before the load: wait for the first successful one.
        deadline = time.monotonic() + 60
        while not prom.query('up{job="dynaroute-gateway"} == 1'):
            assert time.monotonic() < deadline, "prometheus never scraped the gateway"
            time.sleep(0.5)
        x = load_digits_splits().test.x
        # prometheus-client creates a labelled series on its first increment, and rate() cannot
        # count the increase that made a series appear: a first round creates the series, the
        # measured load comes a few scrapes later.
        asyncio.run(asyncio.wait_for(send_load(digits_server.grpc_address, x, n=40), timeout=60))
        time.sleep(3)
        t0 = time.monotonic()
        labels = asyncio.run(asyncio.wait_for(send_load(digits_server.grpc_address, x, n=240), timeout=120))
        assert len(labels) == 240 and all(labels)
        load_s = time.monotonic() - t0

        # Wait until Prometheus has scraped the load and evaluated every recording rule on it.
        records = recording_rules()
        deadline = time.monotonic() + 60
        missing = records
        while missing and time.monotonic() < deadline:
            time.sleep(1)
            missing = [r for r in records if not has_finite_value(prom.query(r))]
        assert not missing, f"recording rules without data: {missing}"

        rate_interval = f"{int(load_s + 30)}s"  # covers the whole load and a few scrapes either side
        empty = []
        for title, expr in dashboard_targets(digits_server.model, rate_interval):
            result = prom.query(expr)
            if not has_finite_value(result) and not any(m in expr for m in EVENT_ONLY):
                empty.append((title, expr))
        assert not empty, f"dashboard queries without data: {empty}"

        # Every panel shows something, including those holding an event-only query.
        for title in {t for t, _ in dashboard_targets(digits_server.model, rate_interval)}:
            exprs = [e for t, e in dashboard_targets(digits_server.model, rate_interval) if t == title]
            assert any(has_finite_value(prom.query(e)) for e in exprs), f"panel {title!r} has no data"

        # The alert rules loaded and evaluate cleanly on live data; none fires on a healthy gateway
        # (the latency SLO aside, which a loaded 2-core CI machine may miss).
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert {r["name"] for r in rules} >= set(records) | {"DynarouteExpertDown", "DynarouteHighErrorRate",
                                                             "DynarouteSloAtFloor"}
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        firing = {r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"}
        assert not firing - {"DynarouteLatencySLO"}, firing

        saved = prom.query("dynaroute:flops_saved_ratio:rate5m")
        print(f"load: 240 requests in {load_s:.1f} s; FLOPs saved ratio {float(saved[0]['value'][1]):.3f}")
    finally:
        prom.stop()
