"""The training loop's state, and the sample digests that prove what each rank read.

`TrainState` is what the loop advances step by step: step, consumed samples, W&B run id, data
manifest hash, this rank's sample digest, the skip counters, the spike detector's window, the
global sample ranges never trained on and the data eras. A checkpoint stores it as
``trainer_state.json`` (train/records.py's `TrainerState`, written and read by train/resume.py).

Sample digests prove which samples each rank read: ``sha256(previous ‖ source ids ‖ sample ids)``
chained over every micro-batch of a *segment* (steps trained on one world size). A resume on another
world size closes the segment into ``data_segments`` and starts a new chain, so a test can recompute
every segment from the pure sampling functions and check that the segments tile the sample stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


def empty_digest() -> str:
    return hashlib.sha256().hexdigest()


def digest_update(digest: str, src: np.ndarray, ids: np.ndarray) -> str:
    """Chain a rank's sample digest: sha256(previous digest ‖ source ids ‖ sample ids)."""
    payload = np.asarray(src, dtype=np.int64).tobytes() + np.asarray(ids, dtype=np.int64).tobytes()
    return hashlib.sha256(digest.encode() + payload).hexdigest()


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    wandb_run_id: str | None = None
    data_manifest_sha256: str = ""
    sample_digest: str = field(default_factory=empty_digest)  # this rank's, for the current segment
    segment_start_step: int = 0
    data_segments: list[dict] = field(default_factory=list)  # closed: start/end step, world, digests
    skipped_batches: list[list[int]] = field(default_factory=list)  # [start, end) sample positions
    data_eras: list[dict] = field(default_factory=list)  # eras.Era records: the dataset grew mid-run
    skip_counts: dict[str, int] = field(default_factory=dict)
    consecutive_skips: int = 0
    spike_history: list[float] = field(default_factory=list)

    def next_trainable(self) -> int:
        """``consumed_samples`` moved past any skipped batch range that starts at it."""
        moved = True
        while moved:
            moved = False
            for start, end in self.skipped_batches:
                if start <= self.consumed_samples < end:
                    self.consumed_samples, moved = end, True
        return self.consumed_samples
