"""The CLI's log lines end to end: `dynaroute serve --log-format json` writes nothing but JSON
objects (its own loggers, Ray's, gRPC's C core), and training's progress bars write whole lines,
not carriage returns, when stderr is not a terminal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from dynaroute.client import Client
from dynaroute.data import load_digits_splits

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class Lines:
    """A stream of a child process, read line by line by a thread."""

    def __init__(self, stream) -> None:  # noqa: ANN001
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:  # noqa: ANN001
        for line in stream:
            self.lines.append(line.rstrip("\n"))


def test_serve_log_format_json_writes_only_json_lines(digits_bundle_dir: Path) -> None:
    cmd = [sys.executable, "-m", "dynaroute", "serve", str(digits_bundle_dir), "--port", "0", "--metrics-port", "0",
           "--ray-num-cpus", "2", "--log-format", "json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        deadline = time.monotonic() + 180
        ready = None
        while ready is None:
            assert proc.poll() is None and time.monotonic() < deadline, "\n".join(out.lines + err.lines)
            ready = next((json.loads(x) for x in out.lines if "dynaroute: serving" in x), None)
            time.sleep(0.2)
        with Client(ready["grpc"]) as client:
            assert client.infer(load_digits_splits().test.x[0].astype(np.float32)).outputs.label_name
            raw = client.channel.unary_unary("/dynaroute.v1.Dynaroute/Infer")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as e:
                raw(b"\xff\xff\xff\xff", timeout=10)  # not protobuf: the gateway logs a warning
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.5)  # the reader threads reach the end of the pipes
    records = []
    for line in out.lines + err.lines:
        record = json.loads(line)  # every line of both streams is one JSON object
        assert {"time", "level", "logger", "message"} <= set(record), record
        records.append(record)
    assert ready["model"] == "digits" and ready["metrics"]
    assert [json.loads(x)["message"] for x in out.lines][-1] == "dynaroute: stopped"
    loggers = {r["logger"] for r in records}
    assert any(name.startswith("ray") for name in loggers), loggers  # Ray's driver-side lines, as JSON
    undecodable = [r for r in records if r["logger"] == "dynaroute.gateway.decoding"]
    assert undecodable and undecodable[0]["level"] == "WARNING", loggers
    assert any(r["logger"] == "dynaroute.gateway.server" and r["message"].startswith("draining") for r in records)
    native = [r for r in records if r["logger"] == "stderr"]  # written outside logging (gRPC's C core)
    assert all(r["level"] in ("INFO", "WARNING", "ERROR", "CRITICAL") for r in native)


def test_training_progress_off_a_terminal_is_whole_lines(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}  # the suite sets TQDM_DISABLE
    cmd = [sys.executable, "-m", "dynaroute", "train", "digits", "--out", str(tmp_path / "b"), "--epochs", "30"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr
    bars = [line for line in done.stderr.splitlines() if "dynaroute.progress: " in line]
    for stage in ("supernet", "router", "joint"):
        lines = [line for line in bars if f"progress: {stage}:" in line]
        assert lines and "100%" in lines[-1], (stage, done.stderr[-3000:])
    supernet = [line for line in bars if "progress: supernet:" in line]
    assert len(supernet) < 30  # one line per interval, not one per epoch (or per loss update)

    done = subprocess.run([*cmd[:-4], "--out", str(tmp_path / "c"), "--epochs", "2"], capture_output=True,
                          text=True, env={**env, "TQDM_DISABLE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "progress" not in done.stderr and "%|" not in done.stderr
