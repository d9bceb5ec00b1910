"""A rank dies, or its launcher does: nothing hangs and nothing is left running.

- SIGKILL of one worker rank: the job exits non-zero within the collective timeout
  (``train.dist_timeout_s``) with an error naming the failed rank, and the next start resumes from
  the newest committed checkpoint.
- SIGKILL of the job's process group (`pretrain train` and so its torchrun): the ranks die with it
  at once and write nothing more, so the next `pretrain train`, which takes the dead holder's run
  lock over, never trains beside an orphan.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from reliability.harness import Trainer, alive, checkpoint_dirs, logged_steps, wait_for
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e

DIST_TIMEOUT_S = 20
LONG = {"train": {"max_steps": 5000, "dist_timeout_s": DIST_TIMEOUT_S}, "checkpoint": {"keep_last": 2}}


def _rank_pid(trainer: Trainer, rank: int) -> int:
    def find():
        for pid in trainer.ranks():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        return None

    return wait_for(find, 60, 0.1, f"rank {rank}'s process")


def test_killed_rank_fails_the_job_within_the_collective_timeout_and_the_next_start_resumes(tiny):
    cfg, run_dir = tiny.config("rank-death", **LONG)
    trainer = Trainer(cfg, run_dir.parent / "rank-death.log")
    try:
        wait_for(lambda: logged_steps(run_dir) >= 5 or trainer.proc.poll() is not None, 300, 0.05, "step 5")
        victim = _rank_pid(trainer, 1)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        rc = trainer.wait(DIST_TIMEOUT_S + 60)
        took = time.monotonic() - killed_at
    finally:
        trainer.kill_all()
    out = trainer.output()
    assert rc != 0, out[-3000:]
    assert took <= DIST_TIMEOUT_S + 15, f"took {took:.0f}s to give up after rank 1 died"
    assert not [p for p in trainer.seen if alive(p)], "processes left running"
    assert "rank: 1" in out and ("-9" in out or "SIGKILL" in out), out[-3000:]

    committed = sorted(ckpt.committed_step(run_dir / "checkpoints" / n) for n, c in checkpoint_dirs(run_dir).items() if c)
    for step in committed:
        ckpt.verify_checkpoint(run_dir / "checkpoints" / ckpt.tag_for(step))
    newest = committed[-1]
    restart = Trainer(cfg, run_dir.parent / "rank-death.restart.log", args=("--set", f"train.stop_at_step={newest + 2}"))
    try:
        assert restart.wait(300) == 0, restart.output()[-3000:]
    finally:
        restart.kill_all()
    assert f"resumed from {run_dir / 'checkpoints' / ckpt.tag_for(newest)} at step {newest}" in restart.output()
    assert ckpt.latest_committed(run_dir / "checkpoints").step == newest + 2


def test_ranks_die_with_their_launcher_and_write_nothing_after(tiny):
    cfg, run_dir = tiny.config("launcher-death", **LONG)
    trainer = Trainer(cfg, run_dir.parent / "launcher-death.log")
    try:
        wait_for(lambda: logged_steps(run_dir) >= 3 or trainer.proc.poll() is not None, 300, 0.05, "step 3")
        assert trainer.proc.poll() is None, trainer.output()[-3000:]
        ranks = trainer.ranks()
        assert len(ranks) == 2, ranks
        survivors, written = trainer.crash(run_dir)
    finally:
        trainer.kill_all()
    assert not survivors, f"ranks {survivors} outlived their launcher"
    assert not written, f"files written after the launcher died: {written}"
