"""dynaroute.logs: one format for every line of a command, text or JSON."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from dynaroute.logs import JsonFormatter

PROGRAM = r"""
import logging, os, sys
from dynaroute import logs
logs.configure(sys.argv[1], sys.argv[2])
if sys.argv[2] == "json":
    logs.capture_stderr()
logging.getLogger("dynaroute.gateway.x").info("an info line", extra={"model": "digits"})
logging.getLogger("grpc._cython.cygrpc").warning("a library's warning")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("dynaroute.y").exception("it failed")
logs.announce("dynaroute.gateway.server", "dynaroute: serving model=m grpc=h:1", model="m", grpc="h:1")
logs.error_line("dynaroute.cli", "dynaroute serve: bad flag")
sys.stderr.flush()
os.write(2, b"E1203 15:22:04.042101   16203 posix_engine_listener.cc:186] Closing acceptor. Failed accept4\n")
os.write(2, b"a plain line from native code\n")
"""


def run(level: str, fmt: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROGRAM, level, fmt], capture_output=True, text=True, timeout=60,
                          check=True)


def test_json_form_makes_every_line_of_both_streams_an_object() -> None:
    done = run("info", "json")
    err = [json.loads(line) for line in done.stderr.splitlines()]  # every line parses
    out = [json.loads(line) for line in done.stdout.splitlines()]
    for record in err + out:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert record["time"].endswith("+00:00")
    by_message = {r["message"]: r for r in err}
    assert by_message["an info line"]["model"] == "digits"  # extra fields are kept
    assert by_message["an info line"]["logger"] == "dynaroute.gateway.x"
    assert by_message["a library's warning"]["level"] == "WARNING"
    assert "ZeroDivisionError" in by_message["it failed"]["exception"]
    assert by_message["dynaroute serve: bad flag"]["level"] == "ERROR"
    core = by_message["Closing acceptor. Failed accept4"]  # gRPC's C core, outside logging
    assert core["level"] == "ERROR" and core["logger"] == "stderr"
    assert core["source"] == "posix_engine_listener.cc:186"
    assert by_message["a plain line from native code"]["logger"] == "stderr"
    (ready,) = out
    assert ready["message"] == "dynaroute: serving model=m grpc=h:1"
    assert ready["model"] == "m" and ready["grpc"] == "h:1"


def test_text_form_keeps_status_lines_plain_and_the_level_filters() -> None:
    done = run("warning", "text")
    assert done.stdout == "dynaroute: serving model=m grpc=h:1\n"
    err = done.stderr.splitlines()
    assert not any("an info line" in line for line in err)  # below --log-level warning
    assert any(line.endswith("WARNING grpc._cython.cygrpc: a library's warning") for line in err)
    assert "dynaroute serve: bad flag" in err
    assert any("Closing acceptor" in line for line in err)  # text form leaves native lines alone


def test_json_formatter_leaves_out_private_record_fields() -> None:
    record = logging.makeLogRecord({"name": "ray", "levelno": 20, "levelname": "INFO", "msg": "m %s",
                                    "args": ("x",), "_ray_timestamp_ns": 1, "node": "n1"})
    out = json.loads(JsonFormatter().format(record))
    assert out["message"] == "m x" and out["node"] == "n1" and "_ray_timestamp_ns" not in out
    assert set(out) == {"time", "level", "logger", "message", "node"}
