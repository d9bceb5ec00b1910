"""Resume planning on checkpoint directories laid out as training writes them (no engine needed):
only committed checkpoints count, and a checkpoint that cannot continue this run is refused."""

import json

import pytest

from pipeline.config import load_config
from pipeline.train import checkpoint as ckpt
from pipeline.train.resume import TrainState, plan_resume

pytestmark = pytest.mark.unit

SHA = "ab" * 32


def commit(root, step, **state):
    tmp = root / f".tmp-{ckpt.tag_for(step)}"
    tmp.mkdir(parents=True)
    info = {"step": step, "consumed_samples": 8 * step, "data_manifest_sha256": SHA, "world_size": 2,
            "zero_stage": 2, "global_batch_size": 8} | state
    (tmp / "trainer_state.json").write_text(json.dumps(info))
    return ckpt.commit(root, tmp, step, keep_last=10)


def cfg(tmp_path, *overrides):
    return load_config(None, [f"run_dir={tmp_path}", "train.global_batch_size=8", "train.micro_batch_size_per_gpu=2",
                              "train.zero_stage=2", *overrides])


def test_resume_plans_from_the_newest_committed_checkpoint_only(tmp_path):
    root = tmp_path / "checkpoints"
    commit(root, 2)
    (root / ckpt.tag_for(4)).mkdir()  # renamed, never committed (crash before COMMIT)
    (root / f".tmp-{ckpt.tag_for(6)}").mkdir()  # written by some ranks only
    plan = plan_resume(cfg(tmp_path), 2, SHA)
    assert plan.checkpoint.step == 2 and not plan.universal


def test_a_world_size_or_stage_change_goes_through_a_universal_checkpoint(tmp_path):
    commit(tmp_path / "checkpoints", 2)
    assert plan_resume(cfg(tmp_path), 1, SHA).universal
    assert plan_resume(cfg(tmp_path, "train.zero_stage=1"), 2, SHA).universal
    assert not plan_resume(cfg(tmp_path), 2, SHA).universal


@pytest.mark.parametrize(("state", "overrides", "match"), [
    ({"data_manifest_sha256": "cd" * 32}, [], "different dataset"),
    ({"global_batch_size": 16}, [], "global_batch_size"),
    ({}, ["train.zero_stage=0"], "ZeRO-1 ↔ ZeRO-2"),
    ({}, ["train.zero_stage=3"], "ZeRO-1 ↔ ZeRO-2"),
])
def test_a_checkpoint_that_cannot_continue_this_run_is_refused(tmp_path, state, overrides, match):
    commit(tmp_path / "checkpoints", 2, **state)
    with pytest.raises(ckpt.CheckpointError, match=match):
        plan_resume(cfg(tmp_path, *overrides), 2, SHA)


def test_a_tampered_newest_checkpoint_is_refused_not_skipped(tmp_path):
    final = commit(tmp_path / "checkpoints", 2)
    (final / "trainer_state.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json"):
        plan_resume(cfg(tmp_path), 2, SHA)


def test_skipped_batch_ranges_are_stepped_over():
    s = TrainState(consumed_samples=16, skipped_batches=[[16, 24], [24, 40], [64, 72]])
    assert s.next_trainable() == 40
    s.consumed_samples = 48
    assert s.next_trainable() == 48
