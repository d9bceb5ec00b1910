"""Preemption: SIGTERM (or SIGUSR1) → the step finishes, a checkpoint is saved and committed within
``checkpoint.preempt_grace_s``, the job exits 0, and the restart continues the uninterrupted run.

The signal is sent by the fault hook right after step 2's commit (so it always lands mid-run, even
in an 8-step run): to the `pretrain train` process, as Slurm or Kubernetes do, or to rank 0 alone
(the other rank learns of it through the step's all-reduce).
"""

from __future__ import annotations

import time

import pytest

from reliability.harness import Trainer, checkpoint_dirs, restart_and_compare
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e

GRACE_S = 30.0


def _preempt(tiny, reference, name: str, signal_name: str, target: str) -> None:
    cfg, run_dir = tiny.config(name, checkpoint={"preempt_grace_s": GRACE_S})
    trainer = Trainer(cfg, run_dir.parent / f"{name}.log", fault="signal_after_commit:2",
                      env={"PRETRAIN_FAULT_SIGNAL": signal_name, "PRETRAIN_FAULT_TARGET": target})
    try:
        rc = trainer.wait(300)
    finally:
        trainer.kill_all()
    out = trainer.output()
    assert trainer.fault_hit(), f"the signal was never sent\n{out[-3000:]}"
    took = time.time() - float(trainer.marker.read_text())
    assert rc == 0, f"preempted run exited {rc}\n{out[-3000:]}"
    assert took < GRACE_S, f"{took:.1f}s from {signal_name} to exit, grace is {GRACE_S}s"
    assert "preemption" in out, out[-3000:]
    dirs = checkpoint_dirs(run_dir)
    steps = sorted(ckpt.committed_step(run_dir / "checkpoints" / n) for n, c in dirs.items() if c)
    newest = steps[-1]
    assert 2 < newest < 8, f"the preemption checkpoint is missing: committed {steps}"
    assert not [n for n, c in dirs.items() if not c], f"uncommitted debris after a clean preemption: {dirs}"
    ckpt.verify_checkpoint(run_dir / "checkpoints" / ckpt.tag_for(newest))
    assert f"checkpoint committed: {run_dir / 'checkpoints' / ckpt.tag_for(newest)}" in out
    restart_and_compare(reference, cfg, run_dir, newest, f"{signal_name} to {target}")


def test_sigterm_to_the_job_saves_commits_exits_0_and_resumes_exactly(tiny, reference):
    _preempt(tiny, reference, "preempt-sigterm", "SIGTERM", "launcher")


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, target", [("SIGUSR1", "launcher"), ("SIGTERM", "self")])
def test_preemption_signal_variants_save_and_resume_exactly(tiny, reference, signal_name, target):
    _preempt(tiny, reference, f"preempt-{signal_name}-{target}", signal_name, target)
