"""Preemption: SIGTERM (or SIGUSR1, Slurm's warning) to `pretrain train` mid-run → every rank finishes
its step, a checkpoint is committed, and the process exits 0 within checkpoint.preempt_grace_s;
the next `pretrain train` resumes from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 60


def trained_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return max((json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train/loss" in line),
               default=0)


@pytest.mark.parametrize(("signum", "nproc"), [(signal.SIGTERM, 2), (signal.SIGUSR1, 1)],
                         ids=["SIGTERM-to-torchrun-parent-2-ranks", "SIGUSR1-single-process"])
def test_signal_commits_a_checkpoint_and_exits_0_within_the_grace_period(trained_run, tmp_path, signum, nproc):
    run = tmp_path / "run"
    sets = [f"run_dir={run}", "train.max_steps=100000", "checkpoint.save_interval_steps=100000",
            "train.log_interval_steps=1", f"train.nproc_per_node={nproc}", f"checkpoint.preempt_grace_s={GRACE_S}",
            "tracking.mode=disabled", "train.seq_len=32", "train.micro_batch_size_per_gpu=2",
            "eval.max_samples=8", "eval.micro_batch_size=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", str(trained_run["run_dir"] / "config.yaml"),
         *[a for s in sets for a in ("--set", s)]],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while trained_steps(run) < 2:  # mid-run: past startup, training steps
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=GRACE_S + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - sent
    assert proc.returncode == 0, out[-4000:]
    assert elapsed < GRACE_S
    assert "saving and stopping (preemption)" in out
    latest = ckpt.latest_committed(run / "checkpoints")
    assert latest is not None and latest.step >= 2
    state = latest.trainer_state()
    assert state["consumed_samples"] == latest.step * 8 and state["world_size"] == nproc
    if signum != signal.SIGTERM:
        return
    # the next firing picks it up
    again = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", str(trained_run["run_dir"] / "config.yaml"),
         *[a for s in sets for a in ("--set", s)], "--set", f"train.stop_at_step={latest.step + 1}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {latest.path} at step {latest.step}" in again.stdout
    assert ckpt.latest_committed(run / "checkpoints").step == latest.step + 1
