"""Ctrl-C and SIGTERM in `pretrain prepare`: one line, exit 130 / 143, nothing committed, resumable.

Inside `interruptible()` the first SIGINT or SIGTERM raises `Interrupted` in the driver wherever it
is. `Interrupted` is a BaseException, as KeyboardInterrupt is, so no ``except Exception`` of ours or
of a library swallows it; the open atomic writes drop their ``.tmp`` files on the way out, and the
stage records of the stages already finished stay, so the next run resumes from them. Because a
library may still turn the exception into an error of its own, or a dying worker pool may raise
first, whatever ends the run after a signal is reported as the signal; and `check()` refuses to
write a stage record or the manifest once a signal has arrived, so nothing done after it is ever
committed. A second signal while the first one unwinds exits at once.

The local executor's forked workers must not run the driver's handler: right after each fork they
ignore SIGINT (the terminal sends Ctrl-C to the whole process group; the driver stops them) and
take the default action for SIGTERM (a scheduler's SIGTERM to the group ends them quietly).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: int | None = None  # the first signal of the current interruptible() block
_state = {"active": False, "who": "pretrain", "exit_code": 1}  # inside interruptible(); for messages
_abandoned: list[threading.Thread] = []  # helper threads a signal left behind (maybe in native code)


class Interrupted(BaseException):
    """Raised in the driver by SIGINT / SIGTERM (like KeyboardInterrupt, not an Exception)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class PrepareInterrupted(PipelineError):
    """`pretrain prepare` stopped by a signal: exit 128 + its number, one line."""

    prefix_error = False

    def __init__(self, what: str, signum: int, resumes: str, after_commit: bool = False):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} after {what} had finished (its result is committed)" if after_commit
                         else f"interrupted by {name} during {what}; nothing was committed, and {resumes}")


def _handler(signum, frame) -> None:
    global _received
    if _received is not None:  # a second signal: stop unwinding, go now, and take the workers along
        os.write(2, f"{_state['who']}: interrupted again ({signal.Signals(signum).name}); exiting at once, "
                    f"nothing was committed\n".encode())
        for child in multiprocessing.active_children():
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGKILL)
        os._exit(128 + _received)
    _received = signum
    raise Interrupted(signum)


def _in_forked_child() -> None:
    if _state["active"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _state["active"] = False


os.register_at_fork(after_in_child=_in_forked_child)


def _exit_if_abandoned() -> None:
    """At exit after `in_thread` was interrupted: a thread still in native code (the tokenizer trainer,
    or the thread it iterates our texts on) would abort the interpreter's shutdown when it next takes
    the GIL (glibc's "FATAL: exception not rethrown"); end the process here instead, with the exit
    code of the signal. Registered at import, so it runs after the exit handlers registered later
    (Ray's shutdown, which stops Ray's own processes)."""
    if _abandoned:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_state["exit_code"])


atexit.register(_exit_if_abandoned)


def at(step: str) -> None:
    """Name the step the run is in, for the message of a signal (``the tokenizer stage``)."""
    _state["at"] = step


def check() -> None:
    """Raise `Interrupted` if a signal has arrived (called before each commit: stage record, manifest)."""
    if _received is not None:
        raise Interrupted(_received)


def in_thread(work: Callable[[threading.Event], T], name: str) -> T:
    """``work(stop)`` in a helper thread while this thread waits, free to run the signal handlers.

    Native code that calls back into Python from threads of its own (the tokenizer trainer pulls our
    generator of texts on a Rust thread) would otherwise hold a signal until it returns. When the
    wait is interrupted, ``stop`` is set so that ``work`` can end early; what it still does is
    dropped (a daemon thread, ended with the process by `_exit_if_abandoned`)."""
    result: dict = {}
    stop, finished = threading.Event(), threading.Event()

    def target() -> None:
        try:
            result["value"] = work(stop)
        except BaseException as exc:  # handed to the waiting thread
            result["error"] = exc
        finally:
            finished.set()

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:  # an Event, not Thread.join: a signal inside join marks a running thread stopped (Python 3.11)
        while not finished.wait(0.1):
            pass
    except BaseException:
        stop.set()
        finished.wait(1.0)  # the generator's cleanup (stopping the workers) runs on its next item
        if not _abandoned:  # registered last, so it runs first: before the other exit handlers wake
            atexit.register(logging.disable, logging.CRITICAL)  # the thread up (its logs are noise now)
        _abandoned.append(thread)  # it, or a thread the native code started, may still be running
        raise
    if "error" in result:
        raise result["error"]
    return result["value"]


def _after(signum, frame) -> None:
    """A signal once the work is committed, while the process exits: said, not obeyed (the exit
    takes a moment; a second signal ends it at once)."""
    if _state.get("late"):
        os._exit(128 + signum)
    _state["late"] = True
    os.write(2, f"{_state['who']}: {signal.Signals(signum).name} after the work was committed; "
                f"finishing the exit\n".encode())


def committed() -> None:
    """The work's commit point has passed (the manifest is written): from here to the exit a signal
    is said, not obeyed, so nothing can report "nothing was committed" over a committed result."""
    if _state["active"] and threading.current_thread() is threading.main_thread():
        _state["late"] = False
        for s in SIGNALS:
            signal.signal(s, _after)
        # once the interpreter finalizes, Python restores the default handlers (a signal then kills
        # the process: -2 over a committed result); the exit is under way, so from the first exit
        # handler on, a signal is ignored (registered last, this handler runs first)
        atexit.register(_ignore_late_signals)


def _ignore_late_signals() -> None:
    for s in SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def interruptible(who: str, what: str, resumes: str, until_exit: bool = False) -> Iterator[None]:
    """Turn SIGINT / SIGTERM inside the block into one `PrepareInterrupted` line (``what`` was
    interrupted; ``resumes`` says what the next run does). A no-op outside the main thread.

    ``until_exit`` (a command line: the process ends after the block): once the block has finished,
    a signal during the exit is one line instead of Python's default (a traceback, or a kill that
    hides the committed result behind exit 130)."""
    global _received
    try:
        previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    _received, done = None, False
    _state.update(active=True, who=who, at="", late=False)
    try:
        try:
            yield
            done = True
        finally:
            _state["active"] = False
            for s, h in previous.items():
                signal.signal(s, _after if until_exit and done else h)
    except BaseException:
        if _received is None:
            raise
        signum, _received = _received, None
        _state["exit_code"] = 128 + signum
        if done:  # the signal came after the work was committed
            raise PrepareInterrupted(what, signum, "", after_commit=True) from None
        where = f"{what} ({_state['at']})" if _state.get("at") else what
        raise PrepareInterrupted(where, signum, resumes) from None
    _received = None
