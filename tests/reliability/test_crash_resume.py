"""Crash at any point: SIGKILL a 2-rank run at seeded moments, restart it, and get the same run.

Each trial kills the job once (see harness.KINDS for the moments), checks what the crash left on
disk, restarts the same command to completion and compares with the uninterrupted reference run:
the resume starts at the newest committed checkpoint, every loss of every step (those logged
before the crash and those re-run after it) equals the reference bit for bit, and the final
weights and per-rank sample digests are identical.
"""

from __future__ import annotations

import pytest

from reliability.harness import KINDS, Trainer, Trial, checkpoint_dirs, crash_at, make_trial, restart_and_compare
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e

INJECTED = {"before_commit", "commit_unrenamed", "before_latest", "in_retention"}
# the default run: a random moment in training, one inside a checkpoint write, one between
# COMMIT and `latest`
DEFAULT_TRIALS = [make_trial(11, "in_step"), make_trial(12, "in_tmp_write"), make_trial(13, "before_latest")]
# the sweep: 24 seeds, every kind four times, with seeded steps and delays
SWEEP_TRIALS = [make_trial(seed, KINDS[seed % len(KINDS)]) for seed in range(100, 124)]


def _check_crash_left(run_dir, trial: Trial) -> int:
    """What is on disk right after the crash; returns the step a restart must resume from."""
    dirs = checkpoint_dirs(run_dir)
    root = run_dir / "checkpoints"
    for name, has_commit in dirs.items():
        if has_commit:  # a COMMIT marker is a promise that every listed file is whole
            ckpt.verify_checkpoint(root / name)
            assert name.startswith("step_"), f"{trial.describe()}: a temporary directory {name} holds COMMIT"
    tag = ckpt.tag_for(trial.step)
    if trial.kind == "in_tmp_write":
        # killed while writing; a fast writer may already have renamed it (COMMIT pending or written)
        assert f".tmp-{tag}" in dirs or tag in dirs, f"{trial.describe()}: {dirs}"
    elif trial.kind == "before_commit":
        assert dirs.get(tag) is False, f"{trial.describe()}: expected {tag} without COMMIT, got {dirs}"
    elif trial.kind == "commit_unrenamed":
        assert dirs.get(tag) is False and (root / tag / "COMMIT.tmp").is_file(), f"{trial.describe()}: {dirs}"
    elif trial.kind == "before_latest":
        assert dirs.get(tag) is True, f"{trial.describe()}: {dirs}"
        latest = (root / ckpt.LATEST).read_text().strip() if (root / ckpt.LATEST).is_file() else None
        assert latest != tag, f"{trial.describe()}: `latest` already names {tag}"
    committed = [ckpt.committed_step(root / n) for n, c in dirs.items() if c]
    return max(committed, default=0)


def run_trial(tiny, reference, trial: Trial) -> None:
    cfg, run_dir = tiny.config(f"crash-{trial.seed}-{trial.kind}")
    fault = f"{trial.kind}:{trial.step}" if trial.kind in INJECTED else None
    first = Trainer(cfg, run_dir.parent / f"{run_dir.name}.1.log", fault=fault)
    try:
        crash_at(first, run_dir, trial)
    finally:
        first.kill_all()
    resume_step = _check_crash_left(run_dir, trial)
    restart_and_compare(reference, cfg, run_dir, resume_step, trial.describe())


@pytest.mark.parametrize("trial", DEFAULT_TRIALS, ids=lambda t: f"{t.kind}-{t.step}")
def test_crash_then_restart_resumes_from_last_commit_and_reproduces_losses(tiny, reference, trial):
    run_trial(tiny, reference, trial)


@pytest.mark.slow
@pytest.mark.parametrize("trial", SWEEP_TRIALS, ids=lambda t: f"seed{t.seed}-{t.kind}-{t.step}")
def test_crash_sweep_resumes_from_last_commit_and_reproduces_losses(tiny, reference, trial):
    run_trial(tiny, reference, trial)


@pytest.mark.unit
def test_tidy_finishes_a_commit_that_a_crash_cut_short(tmp_path):
    """What `pretrain train` does on a finished run: `latest` catches up, retention completes."""
    def write(step):
        tmp = tmp_path / f".tmp-{ckpt.tag_for(step)}"
        tmp.mkdir()
        (tmp / "model.safetensors").write_text(str(step))
        return tmp

    for step in (2, 4, 6):
        ckpt.commit(tmp_path, write(step), step, keep_last=10)
    (tmp_path / ckpt.LATEST).write_text(ckpt.tag_for(4) + "\n")  # crashed between COMMIT and latest
    (tmp_path / ckpt.tag_for(2) / ckpt.COMMIT).unlink()  # crashed inside retention
    ckpt.tidy(tmp_path, keep_last=2)
    assert (tmp_path / ckpt.LATEST).read_text().strip() == ckpt.tag_for(6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [ckpt.tag_for(4), ckpt.tag_for(6)]
