"""dynaroute.progress: whole lines off a terminal, tqdm's bar on one, off with TQDM_DISABLE=1."""

from __future__ import annotations

import io

import pytest

from dynaroute import progress
from dynaroute.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_bar(stream: io.StringIO, steps: int = 2000, **kwargs: object) -> str:
    bar = progress_bar(range(steps), desc="train", unit="step", stream=stream, **kwargs)
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")  # tqdm redraws on each, by default
    return stream.getvalue()


def test_off_a_terminal_the_bar_writes_whole_lines_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 3600.0)  # no interval passes inside the loop
    out = run_bar(io.StringIO())
    assert "\r" not in out and out.endswith("\n")
    lines = out.splitlines()
    # The first state and the final one: not one line per step, nor per set_postfix.
    assert 2 <= len(lines) <= 3, lines
    assert lines[0].startswith("train:   0%") and "2000/2000" in lines[-1]


def test_every_line_is_whole_when_each_step_is_due(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = run_bar(io.StringIO(), steps=50, mininterval=0)
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) >= 50 and all(line.startswith("train:") for line in lines)


def test_on_a_terminal_it_is_tqdm_s_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = run_bar(Terminal(), steps=10)
    assert "\r" in out and "10/10" in out


@pytest.mark.parametrize("value", ["1", "true"])
def test_tqdm_disable_switches_every_bar_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TQDM_DISABLE", value)
    assert run_bar(io.StringIO(), steps=10) == ""
    assert run_bar(Terminal(), steps=10) == ""


def test_disabled_by_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert run_bar(io.StringIO(), steps=10, enabled=False) == ""
