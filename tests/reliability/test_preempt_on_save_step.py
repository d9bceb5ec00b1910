"""A preemption whose save falls on a regular save step still validates: that step's ``val/loss``
is logged as on any other save step (with checkpoint.save_interval_steps 1 every step is one; the
fault hook sends SIGTERM to the job right after step 2's commit). A preemption between save steps
saves without validating, as before."""

from __future__ import annotations

import pytest

from reliability.harness import Trainer
from reliability.training_faults import rows
from pipeline.config import PipelineConfig
from pipeline.train import checkpoint as ckpt
from pipeline.train.loop import SavePolicy, Verdict


@pytest.mark.unit
def test_the_save_policy_validates_a_preemption_on_a_save_step_only():
    cfg = PipelineConfig(checkpoint={"save_interval_steps": 4}, train={"max_steps": 10})
    policy = SavePolicy(cfg, end_step=10, rank=0)
    preempt = Verdict(loss=1.0, nonfinite=False, preempt=True, save_due=False)
    assert (policy.due(4, preempt).validate, policy.due(4, preempt).stop) == (True, True)
    assert (policy.due(10, preempt).validate, policy.due(5, preempt).validate) == (True, False)
    assert policy.due(5, Verdict(1.0, False, False, False)) is None


@pytest.mark.e2e
def test_a_preemption_save_on_a_save_step_logs_that_steps_validation(tiny, tmp_path):
    cfg, run_dir = tiny.config("preempt-save-step", checkpoint={"save_interval_steps": 1, "keep_last": 8,
                                                                "preempt_grace_s": 60.0})
    trainer = Trainer(cfg, tmp_path / "preempt.log", fault="signal_after_commit:2",
                      env={"PRETRAIN_FAULT_SIGNAL": "SIGTERM", "PRETRAIN_FAULT_TARGET": "launcher"})
    try:
        rc = trainer.wait(300)
    finally:
        trainer.kill_all()
    out = trainer.output()
    assert trainer.fault_hit() and rc == 0, out[-3000:]
    newest = ckpt.latest_committed(run_dir / "checkpoints")
    assert 2 < newest.step < 8 and newest.state().stopped_by == "SIGTERM", out[-3000:]
    assert f"step {newest.step}: SIGTERM: saving and stopping (preemption)" in out
    assert f"step {newest.step}: validation loss" in out
    val = [r["step"] for r in rows(run_dir) if "val/loss" in r]
    assert val == list(range(0, newest.step + 1)), val  # step 0, then every save step up to the preempted one
