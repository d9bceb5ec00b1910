"""Signals, sent for real to `pretrain train` and `pretrain eval` started in their own sessions:

- Ctrl-C (SIGINT) in train behaves like a preemption: the step finishes, a checkpoint is committed,
  one line, exit 130, and the restart continues bit for bit; a second Ctrl-C aborts at once;
- a signal during start-up, before the ranks have handlers (in the parent, or while torchrun's ranks
  are still importing): one line, exit 128+N, nothing left running, no traceback;
- `pretrain status` tells running (live lease) from interrupted (the run's end record) and crashed
  (a lease left behind by a SIGKILLed holder);
- SIGTERM/SIGINT in `pretrain eval` and a second one in `eval --watch`: one line, exit 143/130, the
  checkpoint in progress is not recorded and the next eval job scores it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from reliability.harness import logged_steps, restart_and_compare, wait_for
from reliability.training_faults import Job, assert_one_line, copy_run, run_cli
from pipeline.eval.status import run_status
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e


def _committed(run_dir: Path) -> list[int]:
    return [c.step for c in ckpt.committed_checkpoints(run_dir / "checkpoints")]


def test_ctrl_c_commits_at_the_next_step_boundary_exits_130_and_the_restart_resumes_exactly(tiny, reference,
                                                                                           tmp_path):
    cfg, run_dir = tiny.config("sigint", train={"max_steps": 8})
    job = Job(tmp_path, "sigint", "train", str(cfg))
    try:
        wait_for(lambda: logged_steps(run_dir) >= 3 or job.proc.poll() is not None, 300, 0.01, "step 3")
        assert job.proc.poll() is None, job.stderr()[-3000:]
        assert run_status(run_dir)["phase"] == "running"
        job.signal(signal.SIGINT)
        rc = job.wait(120)
    finally:
        job.kill_all()
    assert rc == 130, job.stderr()[-3000:]
    newest = _committed(run_dir)[-1]
    assert 3 < newest < 8, _committed(run_dir)
    line = assert_one_line(job.stderr(), "SIGINT: saved and stopped", f"resumes from step {newest}")
    assert f"step {newest}: SIGINT: saving and stopping" in job.stdout(), line
    state = ckpt.latest_committed(run_dir / "checkpoints").state()
    assert state.stopped_by == "SIGINT" and state.step == newest
    status = run_status(run_dir)
    assert status["phase"] == "interrupted" and "SIGINT" in status["phase_detail"] and status["eta_s"] is None
    restart_and_compare(reference, cfg, run_dir, newest, "after Ctrl-C")


def test_a_second_ctrl_c_aborts_at_once(tiny, tmp_path):
    cfg, run_dir = tiny.config("sigint-twice", train={"max_steps": 5000})
    job = Job(tmp_path, "sigint-twice", "train", str(cfg))
    try:
        wait_for(lambda: logged_steps(run_dir) >= 3 or job.proc.poll() is not None, 300, 0.01, "step 3")
        job.signal(signal.SIGINT)
        time.sleep(0.05)
        second = job.signal(signal.SIGINT)
        rc = job.wait(60)
        took = time.monotonic() - second
        left = job.left_running()
    finally:
        job.kill_all()
    assert rc == 130, job.stderr()[-3000:]
    assert took < 5, f"{took:.1f}s from the second SIGINT to exit"
    assert_one_line(job.stderr(), "second SIGINT", "stopped the ranks at once")
    assert not left, f"left running: {left}"
    for step in _committed(run_dir):
        ckpt.verify_checkpoint(run_dir / "checkpoints" / ckpt.tag_for(step))
    assert not (run_dir / "run.lock").exists()


STARTUP = [  # (id, signal, ranks of the run, when: "lock" = the parent holds the run lock, "ranks" = they exist)
    ("sigterm-while-ranks-start", signal.SIGTERM, 2, "ranks"),
    ("sigint-while-ranks-start", signal.SIGINT, 2, "ranks"),
    ("sigterm-in-the-parent", signal.SIGTERM, 2, "lock"),
    ("sigint-one-rank-start-up", signal.SIGINT, 1, "lock"),
]


@pytest.mark.parametrize("signum, nproc, when", [c[1:] for c in STARTUP], ids=[c[0] for c in STARTUP])
def test_a_signal_during_start_up_stops_cleanly_with_one_line(tiny, tmp_path, signum, nproc, when):
    cfg, run_dir = tiny.config(f"startup-{tmp_path.name}", train={"nproc_per_node": nproc})
    job = Job(tmp_path, "startup", "train", str(cfg))
    try:
        if when == "ranks":
            wait_for(lambda: len(job.ranks()) == nproc or job.proc.poll() is not None, 120, 0.005, "the ranks")
        else:
            wait_for(lambda: (run_dir / "run.lock").exists() or job.proc.poll() is not None, 120, 0.002, "the lock")
        assert job.proc.poll() is None, job.stderr()[-3000:]
        sent = job.signal(signum)
        rc = job.wait(120)
        took = time.monotonic() - sent
        left = job.left_running()
    finally:
        job.kill_all()
    name = signal.Signals(signum).name
    assert rc == 128 + signum, job.stderr()[-3000:]
    assert_one_line(job.stderr(), name, "stopped")
    assert took < 30 and not left, (took, left)
    assert logged_steps(run_dir) == 0 and not _committed(run_dir)
    assert not (run_dir / "run.lock").exists(), "the run lock was left behind"


def test_status_says_crashed_when_the_trainer_was_killed(tiny, tmp_path):
    cfg, run_dir = tiny.config("status-crash", train={"max_steps": 5000})
    job = Job(tmp_path, "status-crash", "train", str(cfg))
    try:
        wait_for(lambda: logged_steps(run_dir) >= 2 or job.proc.poll() is not None, 300, 0.01, "step 2")
        assert run_status(run_dir)["phase"] == "running"
        job.tree()
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
        job.left_running()
    finally:
        job.kill_all()
    status = run_status(run_dir)
    assert status["phase"] == "crashed" and "died without releasing" in status["phase_detail"], status
    proc, _ = run_cli("status", str(run_dir))
    assert ": crashed: " in proc.stdout and "no ETA: not running" in proc.stdout, proc.stdout


def _eval_lock(run_dir: Path) -> Path:
    return run_dir / "eval" / "run.lock"


def _eval_jsons(run_dir: Path) -> list[int]:
    return sorted(ckpt.committed_step(p.parent) for p in (run_dir / "checkpoints").glob("step_*/eval.json"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_stops_eval_with_one_line_and_the_next_eval_scores_the_checkpoint(reference, tmp_path, signum):
    _, run_dir = copy_run(reference.run_dir, tmp_path, "eval-run")
    job = Job(tmp_path, "eval", "eval", str(run_dir))
    try:
        wait_for(lambda: _eval_lock(run_dir).exists() or job.proc.poll() is not None, 120, 0.002, "the eval lock")
        job.signal(signum)
        rc = job.wait(60)
    finally:
        job.kill_all()
    assert rc == 128 + signum, job.stderr()[-3000:]
    assert_one_line(job.stderr(), signal.Signals(signum).name, "nothing was recorded", command="eval")
    assert _eval_jsons(run_dir) == [] and not list((run_dir / "eval").glob("step_*.json"))
    assert not _eval_lock(run_dir).exists()
    again, _ = run_cli("eval", str(run_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    assert _eval_jsons(run_dir) == [8]


def test_a_second_signal_aborts_eval_watch_and_the_next_watch_goes_on(reference, tmp_path):
    _, run_dir = copy_run(reference.run_dir, tmp_path, "watch-run")
    job = Job(tmp_path, "watch", "eval", str(run_dir), "--watch", "--interval-s", "30", "--until-step", "1000")
    try:
        wait_for(lambda: _eval_lock(run_dir).exists() or job.proc.poll() is not None, 120, 0.002, "the eval lock")
        job.signal(signal.SIGINT)
        time.sleep(0.02)
        job.signal(signal.SIGINT)
        rc = job.wait(60)
    finally:
        job.kill_all()
    assert rc == 130, job.stdout()[-2000:] + job.stderr()[-2000:]
    assert_one_line(job.stderr(), "SIGINT", "aborted at once", "stays pending", command="eval")
    assert 6 not in _eval_jsons(run_dir)
    again, _ = run_cli("eval", str(run_dir), "--watch", "--interval-s", "1", "--until-step", "8")
    assert again.returncode == 0 and "done" in again.stdout, again.stdout[-2000:]
    assert _eval_jsons(run_dir) == [6, 8]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_sweep_a_signal_at_a_seeded_moment_ends_in_one_line_and_loses_nothing(tiny, tmp_path, seed):
    """SIGINT or SIGTERM at a seeded moment from start-up into training (0.5–12 s): before the ranks
    train it is one line and exit 128+N; once they train it is the preemption (SIGTERM: exit 0,
    SIGINT: one line and 130), with a commit at the next step boundary. Never a traceback, never
    anything left running, every committed checkpoint whole."""
    import random

    rng = random.Random(seed)
    signum, delay = rng.choice([signal.SIGINT, signal.SIGTERM]), rng.uniform(0.5, 12.0)
    cfg, run_dir = tiny.config(f"sweep-{seed}", train={"max_steps": 5000})
    job = Job(tmp_path, "sweep", "train", str(cfg))
    try:
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and job.proc.poll() is None:
            job.tree()
            time.sleep(0.01)
        assert job.proc.poll() is None, job.stderr()[-3000:]
        trained_before = logged_steps(run_dir)
        job.signal(signum)
        rc = job.wait(120)
        left = job.left_running()
    finally:
        job.kill_all()
    name, committed = signal.Signals(signum).name, _committed(run_dir)
    assert not left and not [s for s in ("Traceback", "ChildFailedError", "Signal 15") if s in job.stderr()]
    for step in committed:
        ckpt.verify_checkpoint(run_dir / "checkpoints" / ckpt.tag_for(step))
    if committed and committed[-1] > trained_before:  # the ranks were training: a preemption save
        stopped = ckpt.latest_committed(run_dir / "checkpoints").state().stopped_by
        assert stopped == name and rc == (130 if signum == signal.SIGINT else 0), (rc, job.stderr()[-2000:])
        if signum == signal.SIGINT:
            assert_one_line(job.stderr(), "SIGINT: saved and stopped")
    else:
        assert rc == 128 + signum, (delay, rc, job.stderr()[-2000:])
        assert_one_line(job.stderr(), name, "stopped")
    print(f"seed {seed}: {name} after {delay:.1f}s, {trained_before} steps logged → exit {rc}, committed {committed}")
