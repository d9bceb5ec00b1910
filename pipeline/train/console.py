"""What `pretrain train` says besides its step lines: the start-up phases with their times, one
closing summary, and no third-party warning that our own calls trigger.

Start-up is timed from the moment `pretrain train` (or `pretrain demo`) began, passed to the ranks
in ``STARTED_ENV``: "start ranks" is everything before a rank's `train()` runs (torchrun, the
ranks' imports, the process group), then verify data, build model, DeepSpeed init, resume, step 0
validation and the first optimizer step, each said once by rank 0 when the first step is done.

The warnings kept off the console are listed below by library, message and category, never "all
warnings"; each is one our code cannot avoid and that says nothing about the user's run. They are
written, once per rank and message, to ``RUN_DIR/THIRD_PARTY_LOG`` instead, which the summary names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field

from pipeline.rundir import RunDir
from pipeline.units import format_duration

STARTED_ENV = "PRETRAIN_STARTED_AT"  # time.time() when the command began (set by the parent)
THIRD_PARTY_LOG = "logs/third_party.log"

# DeepSpeed's logger: lines about choices this pipeline makes for every run
DEEPSPEED_LINES = (
    # we hand DeepSpeed a torch.optim.AdamW (tests/dist check it under every ZeRO stage)
    re.compile(r"You are using ZeRO with an untested optimizer"),
)
# Python warnings: (category, message) raised inside DeepSpeed or torch by calls DeepSpeed makes
WARNINGS = (
    # ZeRO calls a deprecated torch collective on every step, once per rank
    (FutureWarning, re.compile(r"all_gather_into_tensor.* is deprecated")),
    (FutureWarning, re.compile(r"reduce_scatter_tensor.* is deprecated")),
)


class _Quiet(logging.Filter):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(p.search(msg) for p in DEEPSPEED_LINES):
            self.sink(f"{record.name} {record.levelname}: {msg}")
            return False
        return True


class ThirdParty:
    """Routes the known third-party lines of this rank to the run's log file, each message once."""

    def __init__(self, run_dir: str, rank: int):
        self.run, self.rank = RunDir(run_dir), rank
        self.seen: set[str] = set()
        self._show = warnings.showwarning
        self._filter = _Quiet(self.write)

    def write(self, line: str) -> None:
        if line in self.seen:
            return
        self.seen.add(line)
        with contextlib.suppress(OSError):  # a log of other libraries' chatter never stops a run
            self.run.storage.append_text(THIRD_PARTY_LOG, f"rank {self.rank}: {line.strip()}\n")

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if any(issubclass(category, c) and p.search(text) for c, p in WARNINGS):
            self.write(f"{category.__name__} ({os.path.basename(filename)}:{lineno}): {text}")
            return
        self._show(message, category, filename, lineno, file, line)

    def install(self) -> ThirdParty:
        for category, pattern in WARNINGS:  # shown every time, so that each reaches _showwarning
            warnings.filterwarnings("always", message=".*" + pattern.pattern, category=category)
        warnings.showwarning = self._showwarning
        logging.getLogger("DeepSpeed").addFilter(self._filter)
        return self

    def uninstall(self) -> None:
        warnings.showwarning = self._show
        logging.getLogger("DeepSpeed").removeFilter(self._filter)


@dataclass
class Phases:
    """Start-up phases of this rank, each timed from the end of the one before (`mark`); said once,
    after the first step. ``saving_s``: time spent in checkpoints and validation after that."""

    started: float = field(default_factory=lambda: float(os.environ.get(STARTED_ENV) or time.time()))
    times: dict[str, float] = field(default_factory=dict)
    said: bool = False
    saving_s: float = 0.0

    def __post_init__(self):
        self.last = time.time()
        if self.last - self.started > 0.05:  # launched by a parent: torchrun, imports, the process group
            self.times["start ranks"] = self.last - self.started

    def mark(self, name: str) -> None:
        """Phase ``name`` ends now (ignored once the start-up was said: a rollback rebuilds)."""
        now = time.time()
        if not self.said:
            self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now

    def startup_s(self) -> float:
        return sum(self.times.values())

    def line(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.times.items() if seconds >= 0.05)
        return f"start-up: {self.startup_s():.1f}s to the end of the first step ({parts})"

    def first_step_done(self, say) -> None:
        if not self.said:
            self.mark("first step")
            self.said = True
            say(self.line())

    @contextlib.contextmanager
    def saving(self):
        t0 = time.time()
        try:
            yield
        finally:
            self.saving_s += time.time() - t0


def _metric_rows(run: RunDir) -> list[dict]:
    if not run.storage.exists(RunDir.METRICS):
        return []
    rows = []
    for line in run.storage.read_text(RunDir.METRICS).splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            rows.append(row) if isinstance(row, dict) else None
    return rows


def summary(run_dir: str, phases: Phases, steps: int, tokens: int, newest: str | None) -> str:
    """The closing block of `pretrain train`: wall time by phase, tokens, final losses, rates, where
    everything is. Losses and rates come from this run's metrics.jsonl (the same rows W&B gets)."""
    run = RunDir(run_dir)
    rows = _metric_rows(run)
    last = lambda key: next((r[key] for r in reversed(rows) if key in r), None)  # noqa: E731
    tok_s = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]
    mfu = last("train/mfu")
    loss, val = last("train/loss"), last("val/loss")
    wall_s = time.time() - phases.started
    saving_s = phases.saving_s
    training_s = max(0.0, wall_s - phases.startup_s() - saving_s)
    rate = f"{sum(tok_s) / len(tok_s):,.0f} tokens/s" if tok_s else "no throughput logged"
    lines = [
        f"train finished: step {steps}, {tokens / 1e6:.2f}M tokens in {format_duration(wall_s)} "
        f"(start-up {phases.startup_s():.1f}s, steps {format_duration(training_s)}, "
        f"checkpoints and validation {saving_s:.1f}s)",
        f"  final loss:   train {_num(loss)}, validation {_num(val)}; {rate}"
        + (f", MFU {100 * mfu:.1f}%" if mfu else ""),
        f"  checkpoint:   {newest or 'none committed'}",
        f"  metrics:      {run.metrics}",
    ]
    if run.storage.exists(THIRD_PARTY_LOG):
        lines.append(f"  other libraries' known warnings, kept off the console: {run.path(THIRD_PARTY_LOG)}")
    return "\n".join(lines)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
