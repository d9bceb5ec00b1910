"""The records a checkpoint carries: ``COMMIT`` and ``trainer_state.json``, one type each.

``trainer_state.json`` holds the loop's whole state as JSON: step, consumed samples, W&B run id,
data manifest hash, the ZeRO stage, world size and global batch it was written with, the per-rank
sample digests, the skip counters, the spike detector's window, the global sample ranges never
trained on, the data eras, the LR schedule, and what stopped the run when a signal did. Keys
written by older versions may be absent; they take the defaults below. A key present with the wrong JSON type is a corrupt file.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from pipeline.errors import CorruptFile, UserError
from pipeline.records import Record


class CheckpointError(UserError):
    """A checkpoint that is missing, uncommitted or altered after it was committed."""


class CorruptCheckpoint(CheckpointError, CorruptFile):
    """A checkpoint file whose bytes are not what was committed, or a COMMIT/state that does not parse."""


def _non_negative(v: int) -> int:
    if v < 0:
        raise ValueError("must be at least 0")
    return v


class Commit(Record):
    """``COMMIT``: the step and the sha256 of every file of the checkpoint."""

    error = CorruptCheckpoint
    step: int
    files: dict[str, str]
    sizes: dict[str, int] = {}  # written by checkpoints on an object store: each object's size

    def to_dict(self) -> dict:
        data = super().to_dict()
        if not data["sizes"]:  # a local checkpoint's COMMIT stays as it always was
            del data["sizes"]
        return data

    _step = field_validator("step")(_non_negative)


class DataSegment(Record):
    """Steps trained on one world size: the per-rank sample digests that close it."""

    error = CorruptCheckpoint
    start_step: int
    end_step: int
    world_size: int | None = None
    sample_digests: list[str | None] = Field(default_factory=list)


class LRSchedule(Record):
    """The learning-rate schedule a checkpoint was trained under (train/schedule.py), so a resume can
    tell a changed schedule from the same one. ``rebase_*``: where a continued run started it over
    (``optim.on_resume_schedule_change``): mode, update number and the LR it started from."""

    error = CorruptCheckpoint
    schedule: str
    lr: float
    warmup_steps: int
    max_steps: int
    min_lr_ratio: float
    wsd_decay_fraction: float
    rebase_mode: str | None = None
    rebase_step: int | None = None
    rebase_lr: float | None = None


class TrainerState(Record):
    """``trainer_state.json``: everything besides the engine that a resume restores."""

    error = CorruptCheckpoint
    step: int
    consumed_samples: int
    wandb_run_id: str | None = None
    data_manifest_sha256: str = ""
    segment_start_step: int = 0
    data_segments: list[DataSegment] = Field(default_factory=list)
    skipped_batches: list[list[int]] = Field(default_factory=list)  # [start, end) sample positions
    data_eras: list[dict[str, Any]] = Field(default_factory=list)  # data/eras.py Era records
    skip_counts: dict[str, int] = Field(default_factory=dict)
    consecutive_skips: int = 0
    spike_history: list[float] = Field(default_factory=list)
    world_size: int | None = None
    sample_digests: list[str | None] = Field(default_factory=list)
    zero_stage: int | None = None
    global_batch_size: int | None = None
    code_version: str = ""
    model: dict[str, Any] | None = None  # the resolved ModelConfig it was trained with
    lr_schedule: LRSchedule | None = None  # None: written before schedules were recorded
    stopped_by: str | None = None  # the signal of a preemption save (SIGTERM, SIGINT, SIGUSR1)
    rewound_to: int | None = None  # written by a run resumed with checkpoint.resume_from=this step

    _counts = field_validator("step", "consumed_samples")(_non_negative)

    def check(self, path: str) -> None:
        for span in self.skipped_batches:
            if len(span) != 2 or span[0] > span[1]:
                raise self.error(path, f"key skipped_batches: {span} is not a [start, end) range")
