"""Ctrl-C and SIGTERM in `pretrain prepare`: one line, exit 130 / 143, no traceback, nothing
committed; the next run resumes from the stages that had finished and writes the same dataset.

Real `pretrain prepare` processes and real signals. The driver is held at a known point by
``data_faults/sitecustomize.py`` (it sleeps there, so the signal is handled as anywhere else), or
signalled after a seeded delay; the signal goes to the whole process group (a terminal's Ctrl-C,
Slurm's scancel) or to the driver alone (Kubernetes stops PID 1).
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from reliability.data_harness import (
    assert_one_line, dataset_files, debris, env_for, finish, group_gone, make_corpus, prepare_args, run, start,
    wait_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    c = make_corpus(root)
    ref = root / "reference"
    done = run(prepare_args(ref, c.sources))
    assert done.rc == 0, done.err
    return {"root": root, "corpus": c, "files": dataset_files(ref), "seconds": done.seconds}


def _resume_and_compare(corpus, out, reused: tuple[str, ...]) -> str:
    done = run(prepare_args(out, corpus["corpus"].sources))
    assert done.rc == 0, done.err
    for stage in reused:
        assert f"{stage}: reused" in done.out, done.out
    assert dataset_files(out) == corpus["files"]  # byte for byte the uninterrupted dataset
    return done.out


POINTS = [  # (fault point, signal, to the whole group?, stages the resumed run reuses)
    ("pause:dedup:5", signal.SIGINT, True, ()),
    ("pause:tokenizer:5", signal.SIGTERM, True, ("dedup",)),
    ("pause:shards:5", signal.SIGINT, False, ("dedup", "tokenizer")),
    ("pause:shards:20", signal.SIGTERM, False, ("dedup", "tokenizer")),
    ("pause:manifest", signal.SIGINT, True, ("dedup", "tokenizer")),
]


@pytest.mark.parametrize(("point", "sig", "group", "reused"), POINTS, ids=[f"{p[0]}-{p[1].name}" for p in POINTS])
def test_a_signal_at_a_stage_exits_in_one_line_commits_nothing_and_the_rerun_resumes(corpus, tmp_path, point, sig,
                                                                                     group, reused):
    out, marker = tmp_path / "data", tmp_path / "marker"
    proc = start(prepare_args(out, corpus["corpus"].sources), env_for(point, marker))
    t0 = time.time()
    wait_for(marker, proc)
    (os.killpg if group else os.kill)(proc.pid, sig)
    done = finish(proc, t0)
    line = assert_one_line(done, 128 + sig, f"interrupted by {sig.name}", "nothing was committed", "resumes")
    assert done.seconds < 15, (done.seconds, line)
    assert group_gone(proc.pid), "a worker outlived the interrupted prepare"
    assert not (out / "manifest.json").exists() and not debris(out)
    assert not (out / "prepare.lock").exists()  # the lease was released on the way out
    _resume_and_compare(corpus, out, reused)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_signal_at_a_random_moment_is_one_line_or_a_finished_dataset(corpus, tmp_path, seed):
    """Seeded delays over the run, from its first line (before it, Python is still starting and its
    default handlers apply: see Limits): wherever the signal lands, the same promises (or, past the
    end, a finished dataset)."""
    out = tmp_path / "data"
    sig = (signal.SIGINT, signal.SIGTERM)[seed % 2]
    proc = start(prepare_args(out, corpus["corpus"].sources))
    t0 = time.time()
    first = proc.stdout.readline()  # "prepare: local executor, …": the handler is in place
    assert first.startswith("prepare:"), first
    time.sleep(random.Random(seed).uniform(0.0, 0.9) * max(corpus["seconds"] - (time.time() - t0), 0.5))
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    done = finish(proc, t0)
    if done.rc == 0:  # it had finished: the signal came during the exit, or after it
        print(f"seed {seed}: the signal came after the end: {done.err_lines}")
        assert "Traceback" not in done.err and len(done.err_lines) <= 1, done.err
        assert all("after the work was committed" in line for line in done.err_lines), done.err
        assert dataset_files(out) == corpus["files"]
        return
    line = assert_one_line(done, 128 + sig, f"interrupted by {sig.name}")
    print(f"seed {seed}: {line}")
    assert group_gone(proc.pid)
    assert not (out / "manifest.json").exists() and not debris(out)
    _resume_and_compare(corpus, out, ())


def test_a_second_ctrl_c_exits_at_once_and_the_next_run_takes_over_the_lock(corpus, tmp_path):
    out, marker = tmp_path / "data", tmp_path / "marker"
    proc = start(prepare_args(out, corpus["corpus"].sources), env_for("pause:shards:5", marker))
    wait_for(marker, proc)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGINT)
    done = finish(proc)
    assert_one_line(done, 130, "interrupted")
    assert group_gone(proc.pid)
    assert not (out / "manifest.json").exists()
    left_lock = (out / "prepare.lock").exists()  # the second signal may cut the release short
    log = _resume_and_compare(corpus, out, ("dedup", "tokenizer"))
    assert ("took over the stale lock" in log) == left_lock


@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["tokenizer: training", "shards: encoding"])
def test_ctrl_c_with_the_ray_executor_ends_with_our_line_and_the_rerun_resumes(corpus, tmp_path, trigger):
    """Ray's own start-up lines also reach stderr; the run still ends with one line of ours, no
    traceback, nothing committed, no Ray process left, and the dataset the local executor writes."""
    out = tmp_path / "data"
    args = [a.replace("data.executor=local", "data.executor=ray") for a in prepare_args(out, corpus["corpus"].sources)]
    proc = start(args)
    for line in proc.stdout:
        if line.startswith(trigger):
            time.sleep(0.3)
            os.killpg(proc.pid, signal.SIGINT)
            break
    done = finish(proc)
    assert done.rc == 130, done.err
    assert "Traceback" not in done.err, done.err
    assert done.err_lines[-1].startswith("pretrain prepare: interrupted by SIGINT"), done.err
    assert group_gone(proc.pid)
    assert not (out / "manifest.json").exists() and not debris(out)
    _resume_and_compare(corpus, out, ("dedup",))


def test_a_signal_while_a_finished_prepare_exits_is_one_line_and_exit_0(corpus, tmp_path):
    """The dataset is committed and the lease released; the exit itself takes a moment (the worker
    pool, Ray): a signal then is said in one line, not a traceback, and the exit code stays 0."""
    out = tmp_path / "data"
    proc = start(prepare_args(out, corpus["corpus"].sources))
    for line in proc.stdout:
        if line.startswith("prepare: done"):
            os.kill(proc.pid, signal.SIGINT)
            break
    done = finish(proc)
    assert done.rc == 0 and "Traceback" not in done.err, done.err
    assert all("after the work was committed" in line for line in done.err_lines) and len(done.err_lines) <= 1
    assert dataset_files(out) == corpus["files"]
