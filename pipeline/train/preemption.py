"""Preemption: SIGTERM, SIGUSR1 or SIGINT → finish the step, save, commit, stop within a grace period.

The handler only sets a flag (and starts a watchdog); the loop reads the flag at every step
boundary, and all ranks agree on it through the step's all-reduce, so they save the same step
together even when the signal reached only some of them. If saving does not finish within
``checkpoint.preempt_grace_s`` (a hung collective, a slow filesystem), the watchdog ends the process
with 143 (the code of a SIGTERM death) instead of letting the scheduler's SIGKILL find it. SIGINT
(Ctrl-C) is the same request from a person: the command then exits 130 after the commit, and a
second Ctrl-C aborts at once (KeyboardInterrupt; the last committed checkpoint stays the newest).

Handlers can only be installed from the main thread; inside a Ray Train worker (whose loop runs in a
thread) the flag is never set and preemption is Ray's business.

The ranks that our own `pretrain train` starts under torchrun talk back to it through a private
folder (``REPORTS_ENV``): ``ready-R`` once rank R has its handlers (before that, a signal makes the
parent stop the ranks at once instead of forwarding it), and ``error-R.json``: the one line and exit
code of the error rank R stops with, which the parent prints once instead of every rank printing it
under torchrun's report.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from pipeline.storage import open_storage

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_GRACE_EXCEEDED = 143
REPORTS_ENV = "PRETRAIN_RANK_REPORTS"


class Preemption:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> bool:
        """Catch SIGTERM/SIGUSR1/SIGINT; False (and nothing installed) outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return True

    def uninstall(self) -> None:
        self.disarm()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None:
            if signum == signal.SIGINT:  # Ctrl-C twice: stop now
                raise KeyboardInterrupt
            return
        self.signal_name = signal.Signals(signum).name
        self._watchdog = threading.Timer(self.grace_s, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        print(f"preemption: no committed checkpoint {self.grace_s:g} s after {self.signal_name} "
              f"(checkpoint.preempt_grace_s); exiting {EXIT_GRACE_EXCEEDED} without one", file=sys.stderr, flush=True)
        os._exit(EXIT_GRACE_EXCEEDED)

    def disarm(self) -> None:
        """The checkpoint is committed: the watchdog is no longer needed."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


# ---------------------------------------------------------------------------- talking to the parent


def mark_ready(rank: int) -> None:
    """Rank ``rank`` has its signal handlers: the parent may forward signals to it now."""
    folder = os.environ.get(REPORTS_ENV)
    if folder:
        open_storage(folder).write_atomic(f"ready-{rank}", "")


def report_error(rank: int, message: str, exit_code: int, prefix_error: bool) -> bool:
    """Tell the parent the line this rank stops with; False when no parent listens."""
    folder = os.environ.get(REPORTS_ENV)
    if not folder:
        return False
    record = {"rank": rank, "message": message, "exit_code": exit_code, "prefix_error": prefix_error,
              "time": time.time()}
    open_storage(folder).write_atomic(f"error-{rank}.json", json.dumps(record))
    return True


def ready_ranks(folder: str) -> int:
    return sum(1 for k in open_storage(folder).list() if k.startswith("ready-"))


def first_error(folder: str) -> dict | None:
    """The earliest error a rank reported, None when none did."""
    store = open_storage(folder)
    found = []
    for key in store.list():
        if key.startswith("error-") and key.endswith(".json"):
            try:
                found.append(json.loads(store.read_text(key)))
            except (ValueError, OSError):
                continue
    return min(found, key=lambda r: r.get("time", 0.0)) if found else None
