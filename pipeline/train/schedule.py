"""Learning-rate schedules as pure functions of the step.

The loop sets ``lr = optim.lr × lr_multiplier(step)`` on the optimizer before every update, where
``step`` counts optimizer steps taken so far (skipped ones included, as in Megatron). So the LR needs
no state of its own in a checkpoint and is the same after any resume, on any number of ranks.
A run resumed with another schedule continues from the LR it had reached (`Schedule`, below),
recorded in the checkpoint, so that too is the same after any later resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import OptimConfig
from pipeline.train.records import LRSchedule


def warmup(step: int, warmup_steps: int) -> float | None:
    """Linear warmup: (step + 1) / warmup_steps while step < warmup_steps, else None."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    return None


def cosine(progress: float, min_ratio: float) -> float:
    """1 → min_ratio along half a cosine as progress goes 0 → 1."""
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(progress: float, min_ratio: float) -> float:
    """1 → min_ratio in a straight line as progress goes 0 → 1."""
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def wsd(step: int, max_steps: int, decay_fraction: float, min_ratio: float) -> float:
    """Warmup-stable-decay after warmup: 1 until the last ``decay_fraction`` of max_steps, then linear
    to min_ratio at max_steps (Hu et al., MiniCPM 2024)."""
    decay_steps = max(1, round(decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return 1.0
    return linear((step - decay_start) / decay_steps, min_ratio)


def lr_multiplier(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The share of ``optim.lr`` used by update number ``step`` (0-based) of a ``max_steps`` run."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    w = warmup(step, optim.warmup_steps)
    if w is not None:
        return w
    if optim.schedule == "wsd":
        return wsd(step, max_steps, optim.wsd_decay_fraction, optim.min_lr_ratio)
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    if optim.schedule == "linear":
        return linear(progress, optim.min_lr_ratio)
    return cosine(progress, optim.min_lr_ratio)


# ---------------------------------------------------------------------------- continued runs
#
# A run resumed with another schedule (a larger train.max_steps, another warmup or kind) would jump
# to where the new schedule is at that step. `optim.on_resume_schedule_change` says what to do
# instead; the checkpoint records the schedule it was trained under (train/records.py LRSchedule),
# and a run that started its schedule over records where (the rebase), so later resumes continue
# the same curve exactly.

SCHEDULE_FIELDS = (("schedule", "optim.schedule"), ("lr", "optim.lr"), ("warmup_steps", "optim.warmup_steps"),
                   ("max_steps", "train.max_steps"), ("min_lr_ratio", "optim.min_lr_ratio"),
                   ("wsd_decay_fraction", "optim.wsd_decay_fraction"))


@dataclass(frozen=True)
class Rebase:
    """Where a continued run's schedule starts over: ``mode`` (continue | restart) from update
    number ``step``, at the LR ``lr`` the old schedule had reached there."""

    mode: str
    step: int
    lr: float


def _shape(progress: float, schedule: str) -> float:
    """1 → 0 as progress goes 0 → 1: half a cosine, or a straight line."""
    return cosine(progress, 0.0) if schedule == "cosine" else linear(progress, 0.0)


def rebased_lr(step: int, optim: OptimConfig, max_steps: int, rebase: Rebase) -> float:
    """The LR of update ``step`` (≥ rebase.step) of a schedule started over at ``rebase``.

    continue: from rebase.lr, decay over the steps left to ``max_steps`` to the floor (lr ×
    min_lr_ratio, or rebase.lr when that is already lower); no warmup, so no jump. restart: a
    linear warmup from rebase.lr to optim.lr over optim.warmup_steps, then the decay to the floor.
    wsd holds its start value until the last wsd_decay_fraction of max_steps."""
    s = step - rebase.step
    start, begin = rebase.lr, rebase.step
    if rebase.mode == "restart":
        w = optim.warmup_steps
        if w and s < w:
            return rebase.lr + (optim.lr - rebase.lr) * (s + 1) / w
        start, begin = optim.lr, rebase.step + w
    floor = min(start, optim.lr * optim.min_lr_ratio)
    if optim.schedule == "wsd":
        decay_start = max(begin, max_steps - max(1, round(optim.wsd_decay_fraction * max_steps)))
        if step < decay_start:
            return start
        return floor + (start - floor) * linear((step - decay_start) / max(1, max_steps - decay_start), 0.0)
    return floor + (start - floor) * _shape((step - begin) / max(1, max_steps - begin), optim.schedule)


@dataclass(frozen=True)
class Schedule:
    """The LR of every update of a run: ``optim`` over ``max_steps``, started over at ``rebase``."""

    optim: OptimConfig
    max_steps: int
    rebase: Rebase | None = None

    def lr(self, step: int) -> float:
        if self.rebase is not None and step >= self.rebase.step:
            return rebased_lr(step, self.optim, self.max_steps, self.rebase)
        return self.optim.lr * lr_multiplier(step, self.optim, self.max_steps)

    def record(self) -> LRSchedule:
        o, r = self.optim, self.rebase
        return LRSchedule(schedule=o.schedule, lr=o.lr, warmup_steps=o.warmup_steps, max_steps=self.max_steps,
                          min_lr_ratio=o.min_lr_ratio, wsd_decay_fraction=o.wsd_decay_fraction,
                          rebase_mode=r.mode if r else None, rebase_step=r.step if r else None,
                          rebase_lr=r.lr if r else None)

    @classmethod
    def recorded(cls, saved: LRSchedule, optim: OptimConfig) -> Schedule:
        """The schedule a checkpoint was trained under (``optim`` fills the fields it does not record)."""
        old = optim.model_copy(update={"schedule": saved.schedule, "lr": saved.lr, "warmup_steps": saved.warmup_steps,
                                       "min_lr_ratio": saved.min_lr_ratio,
                                       "wsd_decay_fraction": saved.wsd_decay_fraction})
        rebase = (Rebase(saved.rebase_mode, saved.rebase_step, saved.rebase_lr)
                  if saved.rebase_mode and saved.rebase_step is not None and saved.rebase_lr is not None else None)
        return cls(old, saved.max_steps, rebase)


def schedule_changes(saved: LRSchedule | None, optim: OptimConfig, max_steps: int) -> list[str]:
    """How this config's schedule differs from the one a checkpoint recorded ("train.max_steps 8 → 16")."""
    if saved is None:  # written before schedules were recorded: nothing to compare with
        return []
    now = Schedule(optim, max_steps).record()
    return [f"{name} {getattr(saved, key)} → {getattr(now, key)}" for key, name in SCHEDULE_FIELDS
            if getattr(saved, key) != getattr(now, key)]


def resumed(saved: LRSchedule | None, optim: OptimConfig, max_steps: int, step: int) -> tuple[Schedule, list[str]]:
    """The schedule of a run resumed at update ``step`` from a checkpoint that recorded ``saved``, and
    how the config changed it (empty: the checkpoint's schedule goes on unchanged). The caller
    refuses a change under ``on_resume_schedule_change: refuse``."""
    changed = schedule_changes(saved, optim, max_steps)
    if saved is None:
        return Schedule(optim, max_steps), changed
    before = Schedule.recorded(saved, optim)
    if not changed or optim.on_resume_schedule_change == "refuse":
        return Schedule(optim, max_steps, before.rebase), changed
    rebase = Rebase(optim.on_resume_schedule_change, step, before.lr(step))
    return Schedule(optim, max_steps, rebase), changed


def describe_change(schedule: Schedule, changed: list[str]) -> str:
    """One line for the log: what changed and what the run does about it."""
    r, o = schedule.rebase, schedule.optim
    end = schedule.lr(max(schedule.max_steps - 1, r.step if r else 0))
    how = (f"keeps the LR {r.lr:.3g} of step {r.step} and decays it to {end:.3g} by step {schedule.max_steps}"
           if r and r.mode == "continue" else
           f"warms up again from {r.lr:.3g} to {o.lr:.3g} over {o.warmup_steps} steps, then decays to {end:.3g} "
           f"by step {schedule.max_steps}" if r else "follows the new schedule")
    return (f"resume: the LR schedule differs from the checkpoint's ({', '.join(changed)}); "
            f"optim.on_resume_schedule_change={o.on_resume_schedule_change}: the run {how}")
