"""Step guards: non-finite loss or gradient, loss spikes, and too many skipped steps in a row.

How a step is skipped without touching weights or optimizer moments:
- every rank agrees on the step's loss before its last backward (one all-reduce; see loop.py);
- a step the guards reject has its last backward *poisoned* (loss × NaN). Under ZeRO 1-3 and fp16,
  DeepSpeed then finds a non-finite gradient norm, discards the gradients and returns before the
  optimizer runs (``engine.skipped_steps`` counts it). Under ZeRO-0 with fp32/bf16 DeepSpeed would
  apply it, so `hold_nonfinite_step` checks the (already all-reduced) gradients and tells our
  optimizer to skip its next step;
- a gradient that turns non-finite by itself (finite loss) takes the same two paths.

Fault injection, for tests only (read from the environment of every rank; never set in production):
- ``PRETRAIN_FAULT_NAN_AT_STEP=3[,7]``: the loss of optimizer step 3 (1-based) becomes NaN on the
  ranks in ``PRETRAIN_FAULT_RANKS`` (comma-separated; default: all);
- ``PRETRAIN_FAULT_SPIKE_AT_SAMPLE=40``: the step whose global batch holds sample position 40 has its
  loss multiplied by ``PRETRAIN_FAULT_SPIKE_FACTOR`` (default 20) on every rank. Tied to data, not to
  the step, so a rollback that skips the batch also removes the spike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pipeline.errors import Halted

NAN_AT_STEP = "PRETRAIN_FAULT_NAN_AT_STEP"
FAULT_RANKS = "PRETRAIN_FAULT_RANKS"
SPIKE_AT_SAMPLE = "PRETRAIN_FAULT_SPIKE_AT_SAMPLE"
SPIKE_FACTOR = "PRETRAIN_FAULT_SPIKE_FACTOR"


class TrainingHalted(Halted):
    """Training cannot go on (e.g. every recent step was skipped); the last committed checkpoint is intact."""


def _ints(name: str) -> set[int]:
    raw = os.environ.get(name, "")
    try:
        return {int(x) for x in raw.split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected comma-separated integers") from None


@dataclass(frozen=True)
class Faults:
    """The fault-injection hooks in effect for this rank (see the module docstring)."""

    nan_steps: frozenset[int] = frozenset()
    spike_samples: frozenset[int] = frozenset()
    spike_factor: float = 20.0
    this_rank: bool = True

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        ranks = _ints(FAULT_RANKS)
        return cls(frozenset(_ints(NAN_AT_STEP)), frozenset(_ints(SPIKE_AT_SAMPLE)),
                   float(os.environ.get(SPIKE_FACTOR, "20")), not ranks or rank in ranks)

    def apply(self, loss: torch.Tensor, step: int, batch_start: int, batch_end: int) -> torch.Tensor:
        """``loss`` of optimizer step ``step`` (1-based) whose global batch is samples [start, end)."""
        if step in self.nan_steps and self.this_rank:
            loss = loss * float("nan")
        if any(batch_start <= s < batch_end for s in self.spike_samples):
            loss = loss * self.spike_factor
        return loss


def spike_zscore(window: Sequence[float], loss: float) -> float:
    """How many standard deviations ``loss`` lies above the mean of ``window`` (population std).

    The std has a floor of 0.1% of the mean, so a flat window does not turn noise into spikes.
    """
    n = len(window)
    if n < 2:
        return 0.0
    mean = sum(window) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in window) / n)
    return (loss - mean) / max(std, 1e-3 * abs(mean), 1e-12)


@dataclass
class SpikeDetector:
    """Rolling z-score of the step loss over the last ``window_steps`` applied steps."""

    window_steps: int
    threshold: float
    history: list[float] = field(default_factory=list)

    def is_spike(self, loss: float) -> bool:
        """Judged only once the window is full; a non-finite loss is the NaN guard's business."""
        if len(self.history) < self.window_steps or not math.isfinite(loss):
            return False
        return spike_zscore(self.history, loss) > self.threshold

    def record(self, loss: float) -> None:
        """Add the loss of an applied step (skipped steps never enter the window)."""
        self.history = (self.history + [float(loss)])[-self.window_steps:]


@dataclass
class SkipCounter:
    """Skipped optimizer steps by reason, and the current run of consecutive skips."""

    max_consecutive: int
    counts: dict[str, int] = field(default_factory=lambda: {"nonfinite": 0, "overflow": 0, "spike": 0})
    consecutive: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def applied(self) -> None:
        self.consecutive = 0

    def skipped(self, reason: str, step: int) -> None:
        """Count a skip; raise TrainingHalted when too many came in a row."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingHalted(
                f"the last {self.consecutive} optimizer steps (through step {step}) were all skipped "
                f"(counts so far: {self.counts}); the loss or gradients keep coming out non-finite or "
                f"spiking. Stopped without saving: the newest committed checkpoint is the last good "
                f"state. Lower optim.lr, check the data, or raise train.max_consecutive_skips"
            )


def poison(loss: torch.Tensor) -> torch.Tensor:
    """A loss whose backward gives NaN gradients, so that DeepSpeed discards the update."""
    return loss * float("nan")


def grad_norm(parameters) -> torch.Tensor:
    """Global 2-norm of the local gradients (ZeRO-0: they are already all-reduced)."""
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def hold_nonfinite_step(engine) -> tuple[float, bool]:
    """ZeRO-0 with fp32/bf16 only, after the boundary backward and before ``engine.step()``:
    returns (grad norm, held). When the norm is not finite the optimizer is told to skip its next
    step (`engine.SkippableAdamW`), so no weight, moment or step count changes; DeepSpeed then
    clears the gradients as after any step."""
    norm = float(grad_norm(engine.module.parameters()))
    if math.isfinite(norm):
        return norm, False
    engine.optimizer.skip_next_step = True
    return norm, True
