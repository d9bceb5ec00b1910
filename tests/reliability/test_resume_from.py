"""A corrupt newest checkpoint blocks the resume with one line that says how to fall back
(``--set checkpoint.resume_from=STEP`` or moving it aside); ``checkpoint.resume_from`` then trains
on from the earlier step (bit for bit the run it would have been), sets the bad one aside instead of
deleting it, and rewinds only once: a restart with the setting still there continues from what the
rewound run saved."""

from __future__ import annotations

import pytest

from reliability.harness import train_losses
from reliability.training_faults import assert_one_line, copy_run, flip_byte, run_cli, spawned, tripwire
from pipeline.data.shards import sha256_file
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e


def test_corrupt_newest_says_how_to_fall_back_and_resume_from_trains_on(reference, tmp_path):
    cfg, run_dir = copy_run(reference.run_dir, tmp_path, "run", train={"max_steps": 8})
    root = run_dir / "checkpoints"
    bad = root / ckpt.tag_for(8)
    flip_byte(bad / "model.safetensors")
    env, log = tripwire(tmp_path)
    # (with max_steps 8 there would be nothing to resume: a run at its budget does nothing)
    refused, took = run_cli("train", str(cfg), "--set", "train.max_steps=9", env=env)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert_one_line(refused.stderr, "corrupt file", "model.safetensors", "--set checkpoint.resume_from=6",
                    "(committed: 6)", f"move {bad} aside")
    assert took < 5 and not spawned(log)

    proc, _ = run_cli("train", str(cfg), "--set", "checkpoint.resume_from=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "set aside step_00000008" in proc.stdout and f"resumed from {root / ckpt.tag_for(6)} at step 6" in proc.stdout
    aside = sorted((root / ".aside").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("step_00000008.") and (aside[0] / "COMMIT").is_file()
    assert [c.step for c in ckpt.committed_checkpoints(root)] == [6, 8]
    ckpt.verify_checkpoint(root / ckpt.tag_for(8))
    assert ckpt.latest_committed(root).state().rewound_to == 6
    # steps 7 and 8 again, exactly as the uninterrupted run trained them
    rerun = dict(train_losses(run_dir))
    assert {s: rerun[s] for s in (7, 8)} == {s: reference.losses[s] for s in (7, 8)}
    assert sha256_file(root / ckpt.tag_for(8) / "model.safetensors") == reference.final_weights_sha256

    # the setting left in place rewinds no more: the run is at max_steps, nothing to do
    again, _ = run_cli("train", str(cfg), "--set", "checkpoint.resume_from=6")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(list((root / ".aside").iterdir())) == 1


def test_resume_from_a_step_that_is_not_committed_is_refused_naming_the_steps(reference, tmp_path):
    cfg, run_dir = copy_run(reference.run_dir, tmp_path, "run", train={"max_steps": 10})
    env, log = tripwire(tmp_path)
    proc, took = run_cli("train", str(cfg), "--set", "checkpoint.resume_from=5", env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_line(proc.stderr, "checkpoint.resume_from=5", "committed steps: 6, 8")
    assert took < 5 and not spawned(log)
    assert [c.step for c in ckpt.committed_checkpoints(run_dir / "checkpoints")] == [6, 8]
