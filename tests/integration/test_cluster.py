"""A real two-node Ray cluster on this machine (`ray start --head`, then `ray start --address`
with a custom resource), the gateway joined to it with experts pinned to the second node.
Killing that node must lose no request (its routes fall back to experts on the head), and
when the node returns the pinned experts serve again. Ray's token authentication stays on:
every process of the cluster carries the token, and a driver without it is refused.

The nodes get their own temp dirs and process groups, so that the test ends exactly the
processes it started (never `ray stop`, which would end every Ray on the machine)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from dynaroute.bundle import Bundle
from dynaroute.client import Client
from dynaroute.data import load_digits_splits
from tests.serving import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_mentioning(text: str) -> list[int]:
    """PIDs of processes whose command line contains `text` (a temp dir of ours)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _pids_in_session(sid: int) -> list[int]:
    """PIDs of the processes in session `sid` (a `ray start` we launched with a new session)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is dead, only not yet reaped
                pids.append(int(d.name))
    return pids


class RayNode:
    """One `ray start --block` in its own session and temp dir. `kill()` ends it the hard way
    (SIGKILL to its process group and to every process running out of its temp dir, workers
    included), as a machine failure would."""

    def __init__(self, temp_dir: Path, env: dict[str, str], *args: str):
        self.temp_dir = temp_dir
        temp_dir.mkdir(parents=True)
        self.log_path = temp_dir.with_suffix(".log")
        cmd = [
            RAY, "start", "--block", "--temp-dir", str(temp_dir), "--num-cpus", "1", "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()), *args,
        ]  # fmt: skip
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _pids(self) -> set[int]:
        """Every process of this node: its session (workers set their own process group but keep
        the session of `ray start`), plus anything running out of its temp dir."""
        return set(_pids_in_session(self.proc.pid)) | set(_pids_mentioning(str(self.temp_dir)))

    def _signal_all(self, sig: int) -> None:
        for pid in self._pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        # Until none is left (bounded): a process can still be listed for a moment after SIGKILL,
        # and the raylet may have forked a worker between listing and signalling.
        deadline = time.monotonic() + 15
        self._signal_all(signal.SIGKILL)
        while self._pids() and time.monotonic() < deadline:
            time.sleep(0.1)
            self._signal_all(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM (Ray drains for up to 30 s, which a test does not need), then SIGKILL what is left."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Load:
    """Requests sent one after another from a thread, each pinned to one subnet; every reply
    (or error) is kept with its time."""

    address: str
    subnet: str
    replies: list[tuple[float, list[str], list[str]]] = field(default_factory=list)  # (t, subnets, fallbacks)
    latencies_s: list[float] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        x = load_digits_splits().test.x
        with Client(self.address, timeout_s=60) as client:
            i = 0
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.infer(x[i % len(x)], id=str(i), subnet=self.subnet)
                    self.replies.append((time.monotonic(), list(r.route.subnets), list(r.route.fallbacks)))
                    self.latencies_s.append(time.monotonic() - t0)
                except grpc.RpcError as e:
                    self.errors.append((time.monotonic(), f"{e.code().name}: {e.details()}"))
                i += 1
                time.sleep(0.02)

    def first_after(self, t: float, pinned: bool) -> float | None:
        """Time of the first reply after t served by the pinned subnet (or by a fallback)."""
        for when, subnets, fallbacks in self.replies:
            if when > t and (subnets == [self.subnet] and not fallbacks) == pinned:
                return when
        return None


def _wait(cond, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def _metric(metrics_address: str, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        m = re.match(rf"{name}\{{([^}}]*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


def test_node_loss_falls_back_and_recovers(
    digits_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = Bundle.load(digits_bundle_dir)
    pinned_subnet = bundle.full_subnet
    infos = bundle.subnet_infos
    remote = [s["name"] for s in infos if s["width"] >= 0.75]
    local = [s["name"] for s in infos if s["width"] < 0.75]
    assert pinned_subnet in remote and local
    placement = tmp_path / "placement.json"
    placement.write_text(
        json.dumps(
            {
                "actors": [
                    {"name": "head-experts", "subnets": local, "num_cpus": 0.25},
                    {"name": "node2-experts", "subnets": remote, "num_cpus": 0.25, "resources": {"node2": 0.01}},
                ]
            }
        )
    )

    # Short temp dirs: Ray's unix socket paths must stay under 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="drc", dir="/tmp"))
    token = base / "ray_token"
    token.write_text(secrets.token_hex(32))
    ray_env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # Detect a dead node in ~3 s rather than Ray's default ~30 s.
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for k, v in ray_env.items():
        monkeypatch.setenv(k, v)  # for the gateway subprocess, which copies os.environ
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = {**os.environ}

    port = _free_port()
    address = f"127.0.0.1:{port}"
    node2_args = ("--address", address, "--resources", '{"node2": 1}')
    head = RayNode(base / "head", env, "--head", "--port", str(port), "--include-dashboard=false",
                   "--ray-client-server-port", str(_free_port()))  # fmt: skip
    nodes = [head]
    server = None
    load = None
    intruder = None
    try:
        nodes.append(RayNode(base / "node2", env, *node2_args))
        server = ServerProcess.start(digits_bundle_dir, "--ray-address", address, "--placement", str(placement))
        # Both nodes take part: the node2 experts could only be placed there.
        assert _metric(server.metrics_address, "dynaroute_expert_replicas_live", expert="node2-experts") == 1

        # Ray's token authentication is on: a driver with another token is refused (it retries
        # for ~20 s before giving up, so it runs beside the load and is checked at the end).
        intruder = subprocess.Popen(
            [sys.executable, "-c", f"import ray; ray.init(address='{address}'); print('CONNECTED')"],
            env={**env, "RAY_AUTH_TOKEN": "not-the-token"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        load = Load(server.grpc_address, pinned_subnet)
        thread = threading.Thread(target=load.run, daemon=True)
        thread.start()
        _wait(lambda: len(load.replies) >= 20, 60, "no replies before the node loss")
        assert all(s == [pinned_subnet] and not f for _, s, f in load.replies), load.replies[:5]

        t_kill = time.monotonic()
        nodes[1].kill()
        _wait(lambda: load.first_after(t_kill, pinned=False) is not None, 60, "no fallback after the node loss")
        t_fallback = load.first_after(t_kill, pinned=False)
        n_at_restart = len(load.replies)
        time.sleep(2)  # keep serving from the head alone for a while

        t_restart = time.monotonic()
        nodes.append(RayNode(base / "node2b", env, *node2_args))
        _wait(lambda: load.first_after(t_restart, pinned=True) is not None, 120, "pinned experts never came back")
        t_back = load.first_after(t_restart, pinned=True)
        time.sleep(1)
        load.stop.set()
        thread.join(70)

        out, _ = intruder.communicate(timeout=120)
        assert intruder.returncode != 0 and "CONNECTED" not in out, out[-2000:]
        assert "Unauthenticated" in out or "InvalidAuthToken" in out, out[-2000:]

        assert not load.errors, f"requests lost: {load.errors[:5]}"
        fallbacks = [f for _, _, f in load.replies if f]
        assert fallbacks and all(f[0].startswith(f"{pinned_subnet}->") for f in fallbacks)
        assert len(load.replies) > n_at_restart
        # After the node returned, the pinned subnet answers again, with no fallback.
        last = load.replies[-1]
        assert last[1] == [pinned_subnet] and not last[2]
        assert _metric(server.metrics_address, "dynaroute_fallbacks_total", reason="expert_unavailable") > 0
        assert _metric(server.metrics_address, "dynaroute_expert_replicas_live", expert="node2-experts") == 1
        print(
            f"\ncluster: {len(load.replies)} requests, 0 lost, {len(fallbacks)} served by fallback; "
            f"node loss -> first fallback reply {t_fallback - t_kill:.2f} s; "
            f"node restart -> pinned experts serving again {t_back - t_restart:.2f} s; "
            f"slowest reply {max(load.latencies_s):.2f} s, median {statistics.median(load.latencies_s):.3f} s"
        )
        # The test's Ray did not become this machine's default cluster, which a plain `ray.init()`
        # elsewhere would join: its address file stays in its own temp dir.
        default = Path("/tmp/ray/ray_current_cluster")
        assert not (default.exists() and default.read_text().strip().endswith(f":{port}"))
    finally:
        if load is not None:
            load.stop.set()
        if intruder is not None and intruder.poll() is None:
            intruder.kill()
            intruder.wait()
        if server is not None:
            server.stop()
        for node in reversed(nodes):
            node.stop()
        left = [pid for node in nodes for pid in node._pids()]
        assert not left, f"processes of the test cluster are still running: {left}"
        shutil.rmtree(base, ignore_errors=True)
