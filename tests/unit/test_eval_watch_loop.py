"""The watch loop on hand-made checkpoint directories: each checkpoint evaluated exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, to_yaml
from pipeline.eval import EvalError
from pipeline.eval.records import eval_lock, load_records, write_record
from pipeline.eval.watch import pending, stop_on_signals, watch_loop
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.unit


def make_run(tmp_path: Path, max_steps: int = 30) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(PipelineConfig(run_dir=str(run), train={"max_steps": max_steps})))
    return run


def commit(run: Path, step: int) -> Path:
    path = run / "checkpoints" / ckpt.tag_for(step)
    path.mkdir()
    (path / ckpt.COMMIT).write_text(json.dumps({"step": step, "files": {}}))
    return path


class FakeEvaluator:
    """Records the steps it is asked for and writes the record as the real session does."""

    def __init__(self, run: Path, fail: dict[int, Exception] | None = None):
        self.run, self.fail, self.calls = run, fail or {}, []

    def __call__(self, c: ckpt.Committed) -> dict:
        self.calls.append(c.step)
        if c.step in self.fail:
            raise self.fail[c.step]
        result = {"step": c.step, "checkpoint": str(c.path), "time": time.time(), "metrics": {"eval/x": 1.0}}
        write_record(self.run, result)
        return result


def test_each_checkpoint_once_oldest_first_and_again_never_after_a_restart(tmp_path):
    run = make_run(tmp_path, max_steps=30)
    for s in (20, 10):
        commit(run, s)
    commit_uncommitted = run / "checkpoints" / ckpt.tag_for(25)
    commit_uncommitted.mkdir()  # no COMMIT marker: never evaluated
    first = FakeEvaluator(run)
    watch_loop(run, first, threading.Event(), interval_s=0, max_evals=2)
    assert first.calls == [10, 20]

    commit(run, 30)
    restarted = FakeEvaluator(run)  # a new eval job on the same run
    done = watch_loop(run, restarted, threading.Event(), interval_s=0)
    assert restarted.calls == [30]  # and it returned by itself: step 30 is train.max_steps
    assert [r["step"] for r in done] == [30]
    assert [r["step"] for r in load_records(run)] == [10, 20, 30]
    assert pending(run) == []


def test_until_step_and_max_evals_end_the_loop(tmp_path):
    run = make_run(tmp_path, max_steps=1000)
    for s in (10, 20, 30):
        commit(run, s)
    ev = FakeEvaluator(run)
    watch_loop(run, ev, threading.Event(), interval_s=0, until_step=20)
    assert ev.calls == [10, 20, 30]  # a target of 20 is reached by 20; pending ones still get done
    ev2 = FakeEvaluator(run)
    watch_loop(run, ev2, threading.Event(), interval_s=0, max_evals=0)
    assert ev2.calls == []


def test_waits_for_new_checkpoints_until_the_final_one(tmp_path):
    run = make_run(tmp_path, max_steps=20)
    commit(run, 10)
    ev = FakeEvaluator(run)
    later = threading.Timer(0.3, commit, (run, 20))
    later.start()
    t0 = time.monotonic()
    watch_loop(run, ev, threading.Event(), interval_s=0.05)
    assert ev.calls == [10, 20] and time.monotonic() - t0 < 10


def test_deleted_and_broken_checkpoints_are_skipped_not_fatal(tmp_path):
    run = make_run(tmp_path, max_steps=30)
    for s in (10, 20, 30):
        commit(run, s)
    ev = FakeEvaluator(run, fail={10: FileNotFoundError("gone"), 20: ckpt.CheckpointError("sha256 mismatch")})
    logs = []
    watch_loop(run, ev, threading.Event(), interval_s=0, log=logs.append)
    assert ev.calls == [10, 20, 30]  # each tried once in this job, the broken one not retried in a loop
    assert any("deleted" in m for m in logs) and any("sha256 mismatch" in m for m in logs)


def test_sigterm_stops_the_wait_cleanly_and_a_second_one_aborts(tmp_path):
    run = make_run(tmp_path, max_steps=1000)
    stop, logs = threading.Event(), []
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(stop, logs.append):
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t0 = time.monotonic()
        watch_loop(run, FakeEvaluator(run), stop, interval_s=60)
        assert time.monotonic() - t0 < 5
        assert any("SIGTERM" in m for m in logs)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back


def test_a_second_eval_job_on_the_same_run_is_refused_naming_the_holder(tmp_path):
    run = make_run(tmp_path)
    with eval_lock(run, 120, 20):
        with pytest.raises(EvalError, match=r"another eval job .*pid %d" % os.getpid()):
            with eval_lock(run, 120, 20):
                pass
    with eval_lock(run, 120, 20):  # released: free again
        pass


def test_records_survive_retention_and_the_newest_record_of_a_step_wins(tmp_path):
    run = make_run(tmp_path)
    path = commit(run, 10)
    write_record(run, {"step": 10, "checkpoint": str(path), "time": 1.0, "loss": 3.0})
    write_record(run, {"step": 10, "checkpoint": str(path), "time": 2.0, "loss": 2.0})
    import shutil

    shutil.rmtree(path)  # retention
    assert write_record(run, {"step": 10, "checkpoint": str(path), "time": 3.0, "loss": 1.0}) is None
    assert [(r["step"], r["loss"]) for r in load_records(run)] == [(10, 1.0)]
