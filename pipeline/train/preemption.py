"""Preemption: SIGTERM or SIGUSR1 → finish the step, save, commit, exit 0 within a grace period.

The handler only sets a flag (and starts a watchdog); the loop reads the flag at every step
boundary, and all ranks agree on it through the step's all-reduce, so they save the same step
together even when the signal reached only some of them. If saving does not finish within
``checkpoint.preempt_grace_s`` (a hung collective, a slow filesystem), the watchdog ends the process
with 143 (the code of a SIGTERM death) instead of letting the scheduler's SIGKILL find it.

Handlers can only be installed from the main thread; inside a Ray Train worker (whose loop runs in a
thread) the flag is never set and preemption is Ray's business.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_GRACE_EXCEEDED = 143


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
        """Catch SIGTERM/SIGUSR1; False (and nothing installed) outside the main thread."""
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
