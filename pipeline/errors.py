"""Every error a user can cause or meet, and the exit code it ends a command with.

One base class, `PipelineError`, carries ``exit_code``; the CLI prints ``pretrain CMD: message`` on
one line and exits with it. No module lists exit codes by hand.

    exit 1  UserError       corrupt or missing input, a failed submission, nothing to evaluate
    exit 2  ConfigError     a config field, an option or a combination of them is wrong
    exit 3  LockHeld        another live process holds the run (or dataset) directory's lease
    exit 4  Halted          training stopped itself; the last committed checkpoint is intact
    128+N   Interrupted     signal N stopped the command (130: SIGINT, 143: SIGTERM); it resumes

`CorruptFile` is the one class for a file whose bytes cannot be what we wrote: a bad hash, bad UTF-8,
a wrong JSON type, a missing key. Each layer's errors (ManifestError, CheckpointError, …) subclass
the class of their exit code, and the corrupt-file variants subclass both.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_CONFIG_ERROR = 2
EXIT_LOCKED = 3
EXIT_HALTED = 4


class PipelineError(Exception):
    """Base of every error the CLI reports in one line; ``exit_code`` is what the command exits with."""

    exit_code = EXIT_USER_ERROR
    #: printed as ``pretrain CMD: error: message`` (False: ``pretrain CMD: message``)
    prefix_error = True


class UserError(PipelineError, ValueError):
    """Bad input the user can fix: the message names the file or record and the way out."""


class ConfigError(PipelineError, ValueError):
    """A user mistake in a config or on the command line: the message names the file and the field."""

    exit_code = EXIT_CONFIG_ERROR
    prefix_error = False


class LockHeld(PipelineError, RuntimeError):
    """Another live process holds the lease on the directory."""

    exit_code = EXIT_LOCKED
    prefix_error = False


class Halted(PipelineError, RuntimeError):
    """Training cannot go on (e.g. every recent step was skipped); the last committed checkpoint is intact."""

    exit_code = EXIT_HALTED
    prefix_error = False


class Interrupted(PipelineError, RuntimeError):
    """A signal stopped the command; the message says what was kept and how the next run resumes."""

    prefix_error = False

    def __init__(self, signum: int, message: str):
        self.signum, self.exit_code = int(signum), 128 + int(signum)
        super().__init__(message)


class DiskFull(UserError):
    """The filesystem ran out of space while writing; nothing half-written was committed."""

    def __init__(self, path, needs_bytes: int | None, free_bytes: int | None, what: str = ""):
        self.path = str(path)
        needs = f"needs ~{needs_bytes / 1e6:,.0f} MB" if needs_bytes else "needs more"
        free = f"{free_bytes / 1e6:,.0f} MB free" if free_bytes is not None else "free space unknown"
        super().__init__(f"no space left on device writing {path} ({needs}, {free}){what}")


class CorruptFile(UserError):
    """A file that is not what was written: bad hash, bad UTF-8, wrong JSON type, missing key."""

    def __init__(self, path, why: str):
        self.path, self.why = str(path), why
        super().__init__(f"corrupt file {path}: {why}")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` folded onto one line and cut to ``limit`` characters (for messages quoting other tools)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
