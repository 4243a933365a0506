"""Starting `dynaroute serve` as a subprocess on free ports, for integration and e2e tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from dynaroute.bundle import Bundle

READY = re.compile(r"dynaroute: serving model=(\S+) grpc=(\S+) metrics=(\S+)(?: http=(\S+))?")
STARTING = re.compile(r"dynaroute: starting bundle=\S+ grpc=(\S+)(?: http=(\S+))?")


@dataclass
class ServerProcess:
    """A running `dynaroute serve`; stdout lines are collected by a reader thread."""

    proc: subprocess.Popen
    model: str = ""
    grpc_address: str = ""
    metrics_address: str = ""
    http_address: str = ""  # with --http-port
    starting_address: str = ""
    lines: list[str] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)  # gRPC port open, engine starting
    ready: threading.Event = field(default_factory=threading.Event)  # engine up, health SERVING

    @classmethod
    def start(cls, bundle: Path, *extra: str, timeout_s: float = 180.0, wait: bool = True) -> ServerProcess:
        """Start it; with `wait`, return once it is ready (else once its gRPC port is open)."""
        cmd = [
            sys.executable, "-m", "dynaroute", "serve", str(bundle), "--port", "0", "--metrics-port", "0",
            "--ray-num-cpus", "2", *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        server = cls(proc)

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                server.lines.append(line.rstrip("\n"))
                if m := STARTING.search(line):
                    server.starting_address = m.group(1)
                    server.http_address = m.group(2) or ""
                    server.started.set()
                if m := READY.search(line):
                    server.model, server.grpc_address, server.metrics_address, http = m.groups()
                    server.http_address = http or ""
                    server.ready.set()

        threading.Thread(target=read, daemon=True).start()
        server.wait_for(server.ready if wait else server.started, timeout_s)
        return server

    def wait_for(self, event: threading.Event, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not event.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("dynaroute serve did not get there:\n" + "\n".join(self.lines[-60:]))

    def terminate(self) -> None:
        """SIGTERM: the server drains and exits by itself."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL only if it will not exit (then the test has failed anyway)."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return "\n".join(self.lines)


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a server's metrics endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def full_logits(bundle: Bundle, x: np.ndarray) -> np.ndarray:
    """The full subnet called in-process: what a pinned full-subnet request must answer."""
    with torch.no_grad():
        out = bundle.extract(bundle.full_subnet)(torch.as_tensor(x))
    return (out[-1] if isinstance(out, list | tuple) else out).numpy()
