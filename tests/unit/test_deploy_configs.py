"""The files under deploy/ are valid and consistent with the code: Prometheus accepts the
config and rules (promtool), the alerts fire on the inputs they are meant for, every
dashboard panel has a query, and every metric and label they name is declared in
dynaroute/metrics.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dynaroute.json"

# A selector `metric{...}` or a bare metric name; recording rules are `level:metric:ops`.
_METRIC = re.compile(r"\b(dynaroute_[a-z0-9_]+)(\{[^}]*\})?")
_RECORDED = re.compile(r"\b(dynaroute:[a-z0-9_:]+)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")

promtool = pytest.mark.usefixtures("require_promtool")


def declared_series() -> dict[str, tuple[str, ...]]:
    """Every series name dynaroute/metrics.py exposes (counters with `_total`, histograms with
    `_bucket`, `_sum`, `_count`), mapped to the metric's label names."""
    from prometheus_client.metrics import MetricWrapperBase

    import dynaroute.metrics as metrics

    out: dict[str, tuple[str, ...]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        (family,) = obj.describe()
        # prometheus-client keeps label names only on the wrapper; `le` is added to buckets.
        labels = tuple(obj._labelnames)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}[family.type]
        for s in suffixes:
            out[family.name + s] = labels + (("le",) if s == "_bucket" else ())
    return out


def rule_groups(name: str) -> list[dict]:
    return yaml.safe_load((PROM / "rules" / name).read_text())["groups"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def all_exprs() -> list[tuple[str, str]]:
    exprs = dashboard_queries()
    for f in ("recording.yml", "alerts.yml"):
        for g in rule_groups(f):
            exprs += [(r.get("record") or r["alert"], r["expr"]) for r in g["rules"]]
    return exprs


@promtool
def test_promtool_accepts_config_and_rules() -> None:
    for cmd in (
        ["promtool", "check", "config", str(PROM / "prometheus.yml")],
        ["promtool", "check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml")))],
    ):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr


@promtool
def test_alerts_fire_on_their_inputs() -> None:
    """promtool's rule unit tests: an expert with no live replica, a high error ratio, a slow
    p99 and an SLO controller held at its floors fire their alerts; a healthy gateway fires none."""
    res = subprocess.run(
        ["promtool", "test", "rules", str(PROM / "tests" / "rules_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_scrapes_gateway_and_ray() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["dynaroute-gateway"]["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    assert "/tmp/ray/prom_metrics_service_discovery.json" in jobs["ray"]["file_sd_configs"][0]["files"]


def test_every_dashboard_panel_has_a_query() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "model"}
    titles = [p["title"] for p in dash["panels"]]
    assert len(titles) == len(set(titles)) >= 10
    for p in dash["panels"]:
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["expr"].strip(), f"panel {p['title']!r} has an empty query"
    # What a user looks for on the dashboard is there.
    text = " ".join(titles).lower()
    for want in ("request rate", "latency", "flops per request", "saved", "subnet", "escalations", "fallbacks",
                 "batch size", "queue depth", "expert health", "slo controller", "budgets lowered"):  # fmt: skip
        assert want in text, f"no panel about {want!r}"


def test_metrics_and_labels_used_are_declared() -> None:
    declared = declared_series()
    recorded = {r["record"] for g in rule_groups("recording.yml") for r in g["rules"]}
    for where, expr in all_exprs():
        for name, selector in _METRIC.findall(expr):
            assert name in declared, f"{where}: {name} is not declared in dynaroute/metrics.py"
            for label in _MATCHER.findall(selector or ""):
                assert label in declared[name], f"{where}: {name} has no label {label!r}"
        for name in _RECORDED.findall(expr):
            assert name in recorded, f"{where}: {name} is not a recording rule in recording.yml"
        # `by (...)` must group by labels the metric has (or `le` for quantiles).
        for group in re.findall(r"by \(([^)]*)\)", expr):
            names = [n for n, _ in _METRIC.findall(expr)]
            for label in (s.strip() for s in group.split(",")):
                assert any(label in declared[n] for n in names) or not names, f"{where}: no metric has {label!r}"


def test_kuberay_exposes_gateway_and_gpu_workers() -> None:
    docs = [d for f in sorted((DEPLOY / "kuberay").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    cluster = next(d for d in docs if d["kind"] in ("RayCluster", "RayService"))
    spec = cluster["spec"].get("rayClusterConfig", cluster["spec"])
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    gateway = next(c for c in head if "dynaroute serve" in " ".join(c.get("command", []) + c.get("args", [])))
    command = " ".join(gateway.get("command", []) + gateway.get("args", []))
    assert "--ray-address auto" in command and "--host 0.0.0.0" in command
    # Listening on all interfaces is only done with TLS and a token.
    assert "--tls-cert" in command and "--auth-token-file" in command
    assert {p["containerPort"] for p in gateway["ports"]} >= {50051, 8000, 9464}
    assert "--http-port 8000" in command
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000, "scheme": "HTTPS"}
    groups = spec["workerGroupSpecs"]
    limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups]
    assert any("nvidia.com/gpu" in lim for lim in limits), "no worker group asks for nvidia.com/gpu"
    # Ray's token auth stays on in every Ray container.
    for c in head + [g["template"]["spec"]["containers"][0] for g in groups]:
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"], c["name"]
    service = next(d for d in docs if d["kind"] == "Service")
    assert {p["port"] for p in service["spec"]["ports"]} >= {50051, 8000, 9464}


def test_ray_cluster_launcher_config_is_valid() -> None:
    """Ray's own schema accepts deploy/ray/cluster.yaml (no cluster is started)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text()))
    validate_config(config)
    assert config["provider"]["type"] == "local"
    head_commands = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_commands and "dynaroute serve" in head_commands


def test_ray_placement_example_is_valid() -> None:
    """The example placement parses and places every subnet of the default digits supernet once."""
    from dynaroute.config import PlacementConfig
    from dynaroute.experts.mlp import MLPConfig
    from dynaroute.experts.spec import SubnetSpec

    placement = PlacementConfig.from_file(DEPLOY / "ray" / "placement.json")
    c = MLPConfig()
    placement.check_subnets([SubnetSpec(w, d, 0).name for w in c.widths for d in range(1, c.num_blocks + 1)])
    pinned = [a for a in placement.actors if a.num_gpus > 0 and "gpu_node" in a.resources]
    assert pinned, "the example pins no expert to GPU nodes"
