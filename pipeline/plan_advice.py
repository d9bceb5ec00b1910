"""What `pretrain plan` says beyond the checks: epochs per source, a measured time estimate, the
CPU's own peak, and the nearest valid batch splits when the configured one does not divide.

Pure where it can be (``epochs_per_source``, ``batch_suggestions``, ``measured_tokens_per_s``);
``cpu_peak_tflops`` times a few fp32 matmuls on this machine (about 0.3 s).
"""

from __future__ import annotations

import statistics
import time

from pipeline.config import PipelineConfig

RECOMPUTE_FACTOR = 4 / 3  # activation checkpointing re-runs each block's forward: 8·N instead of 6·N


def samples_in(tokens: int, seq_len: int) -> int:
    """Training samples a source of ``tokens`` tokens holds: windows of seq_len + 1 tokens, stride seq_len."""
    return max(0, (tokens - 1) // seq_len)


def epochs_per_source(cfg: PipelineConfig, source_tokens: dict[str, int]) -> dict[str, float]:
    """Passes over each source's train split that ``max_steps × global batch`` samples make, with the
    blend weights of the config (a source too small for one sample gets none)."""
    weights = {s.resolved_name: s.weight for s in cfg.data.sources}
    samples = {n: samples_in(t, cfg.train.seq_len) for n, t in source_tokens.items()}
    usable = {n: weights.get(n, 1.0) for n, s in samples.items() if s > 0}
    total = sum(usable.values())
    budget = cfg.train.max_steps * cfg.train.global_batch_size
    return {n: budget * w / total / samples[n] for n, w in usable.items()} if total else {}


def batch_suggestions(global_batch: int, micro: int, world: int, n: int = 3) -> list[tuple[int, int]]:
    """The ``n`` (micro-batch, accumulation) pairs nearest to ``micro`` with micro × accumulation ×
    world = global_batch; empty when no micro-batch divides (the global batch must change)."""
    pairs = [(m, global_batch // (m * world)) for m in range(1, global_batch + 1)
             if global_batch % (m * world) == 0]
    return sorted(pairs, key=lambda p: (abs(p[0] - micro), -p[0]))[:n]


def global_batch_suggestions(global_batch: int, micro: int, world: int) -> list[int]:
    """The nearest global batch sizes, below and above, that ``micro`` × world divides."""
    unit = micro * world
    below = (global_batch // unit) * unit
    return sorted({b for b in (below, below + unit) if b > 0})


def measured_tokens_per_s(rows: list[dict], world_size: int | None = None) -> float | None:
    """The median of the run's recent logged ``train/tokens_per_s`` (the last 10 windows), or None."""
    rates = [r["train/tokens_per_s"] for r in rows if isinstance(r.get("train/tokens_per_s"), (int, float))]
    return statistics.median(rates[-10:]) if rates else None


def cpu_peak_tflops(size: int = 1024, seconds: float = 0.3) -> float:
    """fp32 matmul TFLOP/s of this machine's CPU (all threads torch uses), measured."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e12
