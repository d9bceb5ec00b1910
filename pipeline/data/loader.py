"""Deterministic, resumable sampling over a prepared split.

The order of samples is a pure function of (seed, epoch, global sample index), and which samples a
rank reads for a step is a pure function of ``consumed_samples``. A run resumed on another number
of ranks with the same global batch therefore continues exactly where it stopped.

GPT samples are windows of ``seq_len + 1`` tokens cut from the split's token stream (documents
joined by their end-of-document token): sample i covers tokens [i·seq_len, i·seq_len + seq_len].
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from pipeline.data.shards import IndexedShard, ShardError


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The visiting order of all samples in one epoch."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    perm = rng.permutation(num_samples)
    perm.setflags(write=False)
    return perm


def sample_ids(seed: int, num_samples: int, start: int, count: int) -> np.ndarray:
    """Sample ids at global positions [start, start + count) of the endless, epoch-shuffled stream."""
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_samples)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = epoch_permutation(seed, int(epoch), num_samples)[offsets[sel]]
    return out


def rank_positions(consumed_samples: int, micro_step: int, rank: int, world_size: int, micro_batch: int) -> tuple[int, int]:
    """(start, count) of the global positions one rank reads for one micro-step.

    A step covers positions [consumed, consumed + global_batch); micro-step m of that step gives
    rank r the slice that starts at consumed + (m·world + r)·micro.
    """
    return consumed_samples + (micro_step * world_size + rank) * micro_batch, micro_batch


class GPTSamples:
    """Fixed-length causal-LM samples from one split: (input_ids, labels) shifted by one token."""

    def __init__(self, prefix: str | Path, seq_len: int):
        self.shard = IndexedShard(prefix)
        self.seq_len = seq_len
        self.num_samples = (self.shard.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise ShardError(
                f"{prefix}: {self.shard.num_tokens} tokens cannot fill one sample of {seq_len + 1}; "
                f"lower train.seq_len or prepare more data"
            )

    def __len__(self) -> int:
        return self.num_samples

    def window(self, sample_id: int) -> np.ndarray:
        start = int(sample_id) * self.seq_len
        return np.asarray(self.shard.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def batch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(np.stack([self.window(i) for i in ids]))  # (B, T+1)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
