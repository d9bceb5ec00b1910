"""The one progress line of a long stage (prepare's passes, training's steps).

On a terminal the line is refreshed in place (a carriage return, a few times a second) and ends,
once, with its final state; anywhere else (a log file, a pipe, a scheduler's output) a plain line
is written every ``every_s`` seconds instead, so a log holds a line per interval, never a smear of
carriage returns. Any other line said while the progress line is up goes through `say`, which
erases the progress line first, so that no line is printed over another or twice.
"""

from __future__ import annotations

import sys
import time

from pipeline.units import format_duration


def fraction_line(what: str, done: int, total: int | None, unit: str, seconds: float) -> str:
    """``shards: 42.0% (1,234/2,938 documents, 410/s, ETA 0m04s)``; without a total, the count and
    rate only: ``shards: 1,234 documents (410/s)``."""
    rate = done / max(seconds, 1e-9)
    if not total:
        return f"{what}: {done:,} {unit} ({rate:,.0f}/s)"
    done = min(done, total)
    eta = (total - done) / rate if rate > 0 else None
    return (f"{what}: {100 * done / total:5.1f}% ({done:,}/{total:,} {unit}, {rate:,.0f}/s, "
            f"ETA {format_duration(eta, 'compact')})")


class ProgressLine:
    """A line refreshed in place on a TTY (``tty`` None: ask ``stream``), plain lines every
    ``every_s`` seconds through ``log`` otherwise."""

    def __init__(self, log=print, stream=None, *, every_s: float = 5.0, refresh_s: float = 0.2,
                 tty: bool | None = None):
        self.log, self.stream = log, stream or sys.stdout
        self.tty = _isatty(self.stream) if tty is None else tty
        self.every_s, self.refresh_s = every_s, refresh_s
        self.last = time.time()
        self.width = 0  # characters of the line on screen now (0: none shown)

    def show(self, text: str, force: bool = False) -> None:
        """``text`` as the current state: drawn when a refresh (TTY) or a plain line is due."""
        now = time.time()
        if not force and now - self.last < (self.refresh_s if self.tty else self.every_s):
            return
        self.last = now
        if not self.tty:
            self.log(text)
            return
        self.stream.write("\r" + text + " " * max(0, self.width - len(text)))
        self.stream.flush()
        self.width = len(text)

    def done(self, text: str) -> None:
        """The final state: on a TTY it replaces the refreshed line and ends it; elsewhere nothing
        (the stage's own closing line follows)."""
        if self.tty:
            self.stream.write("\r" + text + " " * max(0, self.width - len(text)) + "\n")
            self.stream.flush()
            self.width = 0

    def erase(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0

    def say(self, *args, **kwargs) -> None:
        """``log(...)`` with the progress line erased first (it is drawn again at the next refresh)."""
        self.erase()
        self.log(*args, **kwargs)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or a stand-in stream
        return False
