"""Recovery without a human (launch.max_restarts) on one machine: our own torchrun and Ray Train.

A rank is SIGKILLed mid-run; the launcher restarts the whole group, which resumes from the last
COMMIT, logs ``launch/restart`` (metrics.jsonl and the W&B run, offline here: no server) and
finishes with exit 0 and, step for step, the losses of an uninterrupted run. The two-node Slurm
case is in test_slurm_two_nodes.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.recovery import (descends_from, first_step_after, kill_all, losses, rank_pids, restarts, trained_step,
                              wait_for)
from helpers.wandb_log import offline_runs, read_run
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20


def _train(trained_run, run: Path, *extra: str) -> list[str]:
    sets = [f"run_dir={run}", f"train.max_steps={STEPS}", "train.log_interval_steps=1",
            "checkpoint.save_interval_steps=4", "checkpoint.keep_last=100", "tracking.mode=offline", *extra]
    return [sys.executable, "-m", "pipeline.cli", "train", str(trained_run["run_dir"] / "config.yaml"),
            *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def reference(trained_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run(_train(trained_run, run, "train.nproc_per_node=2"), cwd=ROOT, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _kill_midrun_and_finish(cmd: list[str], victims, run: Path, timeout: float = 400) -> tuple[subprocess.Popen, str, float]:
    """Start ``cmd``; at step 6 SIGKILL ``victims(pid of cmd)``; wait for the end."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        wait_for(lambda: trained_step(run) >= 6 or proc.poll() is not None, 300, "step 6")
        killed_at = kill_all(wait_for(lambda: victims(proc.pid), 30, "the rank to kill"))
        out = proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, out, killed_at


def _assert_recovered(run: Path, reference: Path, proc, out: str, killed_at: float, capsys, what: str) -> None:
    assert proc.returncode == 0, out[-5000:]
    step, took = first_step_after(run, killed_at)
    with capsys.disabled():
        print(f"\n[{what}] SIGKILL of one rank → first step after it (step {step}): {took:.1f} s")
    assert [n for _, n in restarts(run)] == [1], out[-3000:]
    assert losses(run) == losses(reference)
    assert ckpt.latest_committed(run / "checkpoints").step == STEPS
    logged = read_run(offline_runs(run)[-1])  # the same W&B run, resumed: it holds the restart too
    assert any(row.get("launch/restart") == 1 for row in logged["history"]), "no launch/restart row in W&B"


def test_own_torchrun_restarts_a_killed_rank_and_finishes_with_the_same_losses(trained_run, reference, tmp_path, capsys):
    run = tmp_path / "run"
    cmd = _train(trained_run, run, "train.nproc_per_node=2", "launch.max_restarts=1")
    proc, out, killed_at = _kill_midrun_and_finish(cmd, lambda _: rank_pids("RANK=1", cmdline_has=str(run)), run)
    _assert_recovered(run, reference, proc, out, killed_at, capsys, "own torchrun")
    assert "automatic restart 1 of 1 (launch.max_restarts)" in out


def _ray_worker_pids(driver: int) -> list[int]:
    """One of the Ray Train workers this driver's embedded Ray started (their process title names
    the actor)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes()
                    and descends_from(int(proc.name), driver)):
                found.append(int(proc.name))
        except OSError:
            continue
    return sorted(found)[-1:]


# slow: the default run covers Ray Train recovery across two nodes (tests/e2e/test_ray_two_nodes.py)
@pytest.mark.slow
def test_ray_train_restarts_a_killed_worker_and_finishes_with_the_same_losses(trained_run, reference, tmp_path, capsys):
    run = tmp_path / "run"
    cmd = _train(trained_run, run, "launch.max_restarts=1") + ["--backend", "ray", "--num-workers", "2"]
    proc, out, killed_at = _kill_midrun_and_finish(cmd, _ray_worker_pids, run)
    _assert_recovered(run, reference, proc, out, killed_at, capsys, "Ray Train")
