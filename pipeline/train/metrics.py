"""Training speed and health: tokens/s, TFLOP/s per device, MFU, data-wait share, peak memory, ETA.

The arithmetic is pure (`throughput`, `format_eta`, `console_line`); `Meter` only keeps time and
the loop feeds it. FLOPs come from the config (`models/flops.py`), not from a profiler, so MFU is
comparable across runs and launchers.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from pipeline.units import format_duration

# Dense peak TFLOP/s per device (no sparsity) for the compute dtype. fp32 training runs its matmuls
# in TF32 on Ampere and later (torch's allow_tf32 for cuDNN; set matmul precision "high" for GEMMs).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},  # SXM; the PCIe card peaks at 756 bf16
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
}


def peak_tflops(configured: float | None, precision: str, device_name: str | None) -> float | None:
    """``train.peak_tflops_per_device`` if set, else the table's entry for this GPU; None on CPU or an
    unknown device (MFU is then not reported rather than guessed)."""
    if configured is not None:
        return configured
    if not device_name:
        return None
    for key, by_precision in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return by_precision[precision]
    return None


def device_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def peak_memory_gib() -> float:
    """This process's peak: CUDA max allocated on GPU, else the max resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def throughput(*, steps: int, seconds: float, data_seconds: float, global_batch: int, seq_len: int,
               world_size: int, flops_per_token: float, peak: float | None) -> dict[str, float]:
    """Rates over a window of ``steps`` optimizer steps that took ``seconds`` of wall time."""
    seconds = max(seconds, 1e-9)
    samples_per_s = steps * global_batch / seconds
    tokens_per_s = samples_per_s * seq_len
    tflops = tokens_per_s * flops_per_token / world_size / 1e12
    out = {
        "train/samples_per_s": samples_per_s,
        "train/tokens_per_s": tokens_per_s,
        "train/tflops_per_device": tflops,
        "train/data_wait_share": min(1.0, data_seconds / seconds),
        "train/step_time_s": seconds / max(steps, 1),
    }
    if peak:
        out["train/mfu"] = tflops / peak
    return out


#: the console's ETA: "0m59s", "1h02m", "2d01h" (units.py holds the one duration formatter)
format_eta = functools.partial(format_duration, style="compact")


def console_line(step: int, max_steps: int, m: dict[str, float], eta_s: float | None) -> str:
    """One progress line: step, loss, LR, grad norm, speed, MFU, data wait, memory, skips, ETA."""
    parts = [f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)"]
    if "train/loss" in m:
        parts.append(f"loss {m['train/loss']:.4f}")
    parts.append(f"lr {m['train/lr']:.2e}")
    if "train/grad_norm" in m:
        parts.append(f"gnorm {m['train/grad_norm']:.3g}")
    if "train/loss_scale" in m:
        parts.append(f"scale {m['train/loss_scale']:g}")
    parts.append(f"{m['train/tokens_per_s']:,.0f} tok/s")
    parts.append(f"{m['train/tflops_per_device']:.3g} TFLOP/s/dev")
    if "train/mfu" in m:
        parts.append(f"MFU {100 * m['train/mfu']:.1f}%")
    parts.append(f"data {100 * m['train/data_wait_share']:.0f}%")
    parts.append(f"mem {m['train/peak_memory_gib']:.2f} GiB")
    if m.get("train/skipped_steps"):
        parts.append(f"skipped {m['train/skipped_steps']:.0f}")
    if eta_s is not None:
        parts.append(f"ETA {format_eta(eta_s)}")
    return " | ".join(parts)


@dataclass
class Meter:
    """Wall time of the steps since the last log line, with the part spent waiting for data."""

    steps: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    _t0: float | None = None
    _recent_step_s: float | None = None  # smoothed step time, for the ETA

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def add_data_time(self, seconds: float) -> None:
        self.data_seconds += seconds

    def end_step(self, loss: float | None) -> None:
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        self.steps += 1
        self.seconds += dt
        if loss is not None:
            self.losses.append(loss)
        a = 0.1
        self._recent_step_s = dt if self._recent_step_s is None else (1 - a) * self._recent_step_s + a * dt

    def eta_s(self, steps_left: int) -> float | None:
        return None if self._recent_step_s is None else steps_left * self._recent_step_s

    def reset(self) -> None:
        self.steps, self.seconds, self.data_seconds, self.losses = 0, 0.0, 0.0, []
