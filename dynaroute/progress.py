"""Progress bars for training and evaluation: tqdm on a terminal, plain lines in a log.

On a terminal a bar redraws itself in place, as tqdm does. Anywhere else (a file, a pipe, a
CI log) each redraw would be one more carriage-return segment of one endless line, so there
the bar writes one complete line per `LOG_INTERVAL_S` (and its first and last state) instead;
in a `dynaroute` command (dynaroute.logs configured) each line is a log record of logger
`dynaroute.progress`, in the command's log format (text or JSON).
`TQDM_DISABLE=1` switches every bar off, read when each bar is made: tqdm reads its own
`TQDM_*` variables once, at import, and only for arguments that a caller leaves out.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm as std_tqdm
from tqdm.auto import tqdm

from dynaroute import logs

LOG_INTERVAL_S = 10.0  # off a terminal: at most one line per this many seconds (TQDM_MININTERVAL overrides)


class _Lines:
    """A file for tqdm that turns its in-place redraws into whole lines: it drops the carriage
    returns and padding tqdm writes to overdraw the previous state, and ends each with a newline."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream  # None: to the log, as records of `dynaroute.progress`
        self.encoding = getattr(stream, "encoding", "utf-8")

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if not line:  # tqdm's blank writes (its closing newline, clearing a bar) carry nothing
            return len(text)
        if self._stream is None:
            logging.getLogger(__name__).info(line)
        else:
            self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._stream is not None:
            self._stream.flush()


class _LineBar(std_tqdm):
    """A bar that writes lines: a new postfix or description waits for the next line rather
    than forcing one (tqdm redraws at once on each, by default: a line per step in a log)."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)


def disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, unit: str = "it", enabled: bool = True,
                 stream: TextIO | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar over `iterable` (kwargs go to tqdm: total, initial, ...), off when not
    `enabled` or when TQDM_DISABLE=1; one line per interval when `stream` (default stderr)
    is not a terminal, to the log when the stream is the default one and logging is set up."""
    to_log = stream is None and logs.is_configured()
    stream = sys.stderr if stream is None else stream
    disable = not enabled or disabled_by_env()
    if not disable and not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("file", _Lines(None if to_log else stream))
        kwargs.setdefault("ascii", True)
        if "TQDM_MININTERVAL" not in os.environ:  # passed here, it would override the variable
            kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("miniters", 1)  # check the time at every step: a line is due after the interval
        return _LineBar(iterable, desc=desc, unit=unit, disable=False, **kwargs)
    return tqdm(iterable, desc=desc, unit=unit, disable=disable, file=stream, **kwargs)
