"""Logging for every `dynaroute` command: one format for all of a process's lines.

`configure(level, fmt)` gives the root logger one stderr handler, in `text` (time, level,
logger, message) or `json` (one object per line: `time`, `level`, `logger`, `message`, the
fields passed as `extra=` and `exception` when there is a traceback). Every library that logs
through `logging` (grpc's Python side, Ray's driver side once `adopt_ray_logs` has run)
propagates to that handler, so that its lines read the same as the gateway's own. gRPC's C
core and Ray's own processes write their own files and streams, outside Python's logging.

The status lines a command prints on stdout for scripts (`dynaroute: serving ...`) go through
`announce`, and one-line errors on stderr through `error_line`: plain in text form, as it has
always been, and as the same JSON objects as the logs in json form.

What bypasses Python's logging and writes to file descriptor 2 itself (gRPC's C core, e.g.
"E1203 15:22:04.042101 16203 posix_engine_listener.cc:186] Closing acceptor ..." when the
server shuts its listener; a traceback) is made JSON too in json form: `capture_stderr` puts
a pipe under descriptor 2 and a thread that passes JSON lines on and wraps every other line in
an object of logger `stderr`, so that a log collector reading JSON never meets a plain line.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord has; anything else on a record was passed as `extra=`. Ray's record
# factory adds private fields (`_ray_timestamp_ns`): names with a leading underscore are left out.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

_format = "text"
_configured = False
# An absl / glog line (gRPC's C core): severity letter, MMDD, time, thread, file:line] message.
_NATIVE_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ (\S+:\d+)\] ?(.*)$")
_NATIVE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC, milliseconds), level, logger, message,
    then the record's extra fields and its exception, if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}; expected one of {list(FORMATS)}")
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure(level: str = "info", fmt: str = "text") -> None:
    """One stderr handler on the root logger, at `level`, in `fmt`; replaces any before it."""
    global _format, _configured
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r}; expected one of {list(LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn lines in the same format
    _format = fmt
    _configured = True
    if "ray" in sys.modules:
        adopt_ray_logs()


def is_configured() -> bool:
    """Whether `configure` has run in this process (a command, not a library caller)."""
    return _configured


def adopt_ray_logs() -> None:
    """Send the `ray` logger's records to the root handler. Importing ray gives that logger a
    handler of its own (its own format) and stops it propagating; call this after `import ray`."""
    ray_logger = logging.getLogger("ray")
    for old in list(ray_logger.handlers):
        ray_logger.removeHandler(old)
    ray_logger.propagate = True


def _emit(stream: TextIO, logger: str, level: int, message: str, fields: dict[str, Any]) -> None:
    if _format == "json":
        record = logging.makeLogRecord({"name": logger, "levelno": level, "levelname": logging.getLevelName(level),
                                        "msg": message, **fields})
        line = JsonFormatter().format(record)
    else:
        line = message
    print(line, file=stream, flush=True)


def announce(logger: str, message: str, **fields: Any) -> None:
    """A status line for scripts on stdout (whatever the log level): `message` as it is in
    text form, a JSON log object with `fields` in json form."""
    _emit(sys.stdout, logger, logging.INFO, message, fields)


def error_line(logger: str, message: str, level: int = logging.ERROR, **fields: Any) -> None:
    """A command's one-line error (or warning) on stderr: `message` in text form, a JSON log
    object at `level` in json form."""
    _emit(sys.stderr, logger, level, message, fields)


def _native_line_as_json(text: str) -> str:
    """A line written to descriptor 2 outside logging, as a JSON log object (JSON lines pass)."""
    if text.startswith("{"):
        try:
            json.loads(text)
            return text
        except ValueError:
            pass
    fields: dict[str, Any] = {}
    level, message = logging.WARNING, text
    if m := _NATIVE_LINE.match(text):
        level, message, fields["source"] = _NATIVE_LEVELS[m.group(1)], m.group(3), m.group(2)
    record = logging.makeLogRecord({"name": "stderr", "levelno": level, "levelname": logging.getLevelName(level),
                                    "msg": message, **fields})
    return JsonFormatter().format(record)


def capture_stderr() -> None:
    """Make every line written to file descriptor 2 a JSON object (see the module docstring);
    for json form, once per process. The pipe is drained and descriptor 2 restored at exit."""
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    out = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace")

    def pump() -> None:
        with os.fdopen(read_end, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    out.write(_native_line_as_json(line.rstrip("\n")) + "\n")
                except (OSError, ValueError):  # the real stderr is gone: keep draining, or writers would block
                    continue

    thread = threading.Thread(target=pump, name="dynaroute-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end in this process: the pump reads to its end
        thread.join(timeout=2.0)  # a child process still holding the pipe would keep it open

    atexit.register(restore)
