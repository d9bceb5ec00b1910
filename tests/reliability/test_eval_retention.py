"""`eval --watch` and checkpoint retention: while an eval job holds its lease on RUN_DIR/eval,
``checkpoint.keep_last`` keeps up to ``eval.hold_unevaluated`` checkpoints the job has not scored
yet; one deleted anyway before its turn (the hold was full) is reported by step when the watcher
finds it, and again in its final summary, which then no longer claims every checkpoint is evaluated."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from reliability.training_faults import run_cli
from pipeline.config import PipelineConfig, to_yaml
from pipeline.eval.records import eval_lock, write_record
from pipeline.eval.watch import watch_loop
from pipeline.train import checkpoint as ckpt


def _run(tmp_path: Path, max_steps: int = 100) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(PipelineConfig(run_dir=str(run), train={"max_steps": max_steps})))
    return run


def _commit(run: Path, step: int) -> Path:
    path = run / "checkpoints" / ckpt.tag_for(step)
    path.mkdir()
    (path / ckpt.COMMIT).write_text(json.dumps({"step": step, "files": {}}))
    return path


def _steps(run: Path) -> list[int]:
    return [c.step for c in ckpt.committed_checkpoints(run / "checkpoints")]


def _noted(run: Path) -> list[int]:
    path = run / "eval" / "deleted_unevaluated.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.unit
def test_retention_holds_unevaluated_checkpoints_only_while_an_eval_job_runs(tmp_path):
    run = _run(tmp_path)
    for s in (10, 20, 30, 40, 50):
        _commit(run, s)
    write_record(run, {"step": 20, "checkpoint": str(run / "checkpoints" / ckpt.tag_for(20)), "time": 1.0})
    root = run / "checkpoints"
    ckpt.apply_retention(root, keep_last=1, hold=2)  # a live eval job: hold the two oldest unevaluated
    assert _steps(run) == [10, 30, 50]  # 20 is evaluated (nothing to hold), 40 beyond the hold
    assert _noted(run) == [40]  # only the unevaluated one is noted for the eval job
    ckpt.apply_retention(root, keep_last=1, hold=None)  # no eval job: plain keep_last
    assert _steps(run) == [50] and _noted(run) == [40]


@pytest.mark.unit
def test_a_checkpoint_deleted_before_its_turn_is_reported_by_step_and_in_the_summary(tmp_path):
    run = _run(tmp_path, max_steps=40)
    for s in (10, 20):
        _commit(run, s)
    logs: list[str] = []

    def slow_evaluator(c: ckpt.Committed) -> dict:
        if not (c.path / ckpt.COMMIT).is_file():
            raise FileNotFoundError(c.path)  # what loading a deleted checkpoint meets
        result = {"step": c.step, "checkpoint": str(c.path), "time": time.time()}
        write_record(run, result)
        if c.step == 10:  # meanwhile training commits 30 and 40, and retention (hold full) deletes 20 and 30
            for s in (30, 40):
                _commit(run, s)
            ckpt.apply_retention(run / "checkpoints", keep_last=1, hold=0)
        return result

    done = watch_loop(run, slow_evaluator, threading.Event(), interval_s=0, log=logs.append)
    assert [r["step"] for r in done] == [10, 40]
    said = [m for m in logs if "before it was evaluated" in m]
    assert {s for s in (20, 30) if any(f"step {s} " in m for m in said)} == {20, 30}, logs
    assert len(said) == 2, logs  # each once
    assert "not evaluated: steps 20, 30" in logs[-1] and "every checkpoint" not in logs[-1] and "done" in logs[-1]


@pytest.mark.e2e
def test_training_holds_checkpoints_for_a_live_eval_job_and_the_watcher_reports_the_rest(tiny, tmp_path):
    cfg, run_dir = tiny.config("retention-hold", checkpoint={"keep_last": 1}, eval={"hold_unevaluated": 2})
    with eval_lock(run_dir, 120, 20):  # an eval job that has not got to anything yet
        proc, _ = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(run_dir) == [2, 4, 8], _steps(run_dir)  # keep_last 1, plus the two oldest unevaluated
    assert _noted(run_dir) == [6]
    watch, _ = run_cli("eval", str(run_dir), "--watch", "--interval-s", "1")
    assert watch.returncode == 0, watch.stderr[-3000:]
    out = watch.stdout
    assert [s for s in (2, 4, 6, 8) if f"eval: step {s}:" in out] == [2, 4, 8], out[-3000:]
    assert "step 6 was deleted by retention" in out
    last = out.strip().splitlines()[-1]
    assert "step 8 is evaluated" in last and "not evaluated: steps 6" in last and "done" in last, last


@pytest.mark.e2e
def test_without_an_eval_job_retention_keeps_keep_last_only(tiny):
    cfg, run_dir = tiny.config("retention-plain", checkpoint={"keep_last": 1}, eval={"hold_unevaluated": 2})
    proc, _ = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(run_dir) == [8] and _noted(run_dir) == []
