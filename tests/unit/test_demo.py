"""`start_until` (dynaroute/demo.py): what the demo and the benchmarks start servers with."""

from __future__ import annotations

import re
import sys

import pytest

from dynaroute.demo import start_until


def test_start_until_returns_the_ready_line_and_keeps_the_process() -> None:
    code = "import sys, time; print('loading'); print('ready at 127.0.0.1:5', flush=True); time.sleep(30)"
    proc, ready = start_until([sys.executable, "-c", code], re.compile(r"ready at (\S+)"), "the child", timeout_s=60)
    try:
        assert ready.group(1) == "127.0.0.1:5"
        assert proc.poll() is None  # still running: the caller stops it
    finally:
        proc.kill()
        proc.wait(10)


def test_start_until_raises_when_the_process_exits_first() -> None:
    with pytest.raises(RuntimeError, match="the child did not become ready"):
        start_until([sys.executable, "-c", "print('no luck')"], re.compile("ready"), "the child", timeout_s=60)
