"""`pretrain eval --watch` on a real trained run: every checkpoint exactly once across a SIGTERM and a
restart, one eval job at a time, the W&B eval run (keys, step metric, table), and `--ray`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, pretrain
from helpers.wandb_log import _payloads, offline_runs, read_run
from test_tracking_resume import copy_run

pytestmark = pytest.mark.e2e

TASKS = [str(ROOT / "tasks" / "cloze_stdlib.jsonl"), str(ROOT / "tasks" / "choice_stdlib.jsonl")]


def eval_jsons(run: Path) -> dict[int, Path]:
    return {int(p.parent.name.split("_")[1]): p for p in (run / "checkpoints").glob("step_*/eval.json")}


def metric_definitions(wandb_file: Path) -> list[tuple[str, str]]:
    """(glob or name, step metric) of each define_metric record in an offline run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for payload in _payloads(wandb_file.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "metric":
            out.append((record.metric.glob_name or record.metric.name, record.metric.step_metric))
    return out


def test_watch_evaluates_each_checkpoint_exactly_once_across_sigterm_and_restart(trained_run, tmp_path):
    run = copy_run(trained_run["run_dir"], tmp_path / "run")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "eval", str(run), "--watch", "--interval-s", "30",
         "--until-step", "1000", "--tasks", *TASKS],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while set(eval_jsons(run)) != {3, 6}:
            assert watcher.poll() is None and time.monotonic() < deadline, "watcher died or is too slow"
            time.sleep(0.5)
        refused = pretrain("eval", str(run), check=False)  # a second eval job on the same run
        assert refused.returncode == 1 and "another eval job" in refused.stderr
        watcher.send_signal(signal.SIGTERM)  # it is waiting for a step 1000 that never comes
        out, _ = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, out
    assert "SIGTERM" in out and out.count("eval: step 3:") == 1 and out.count("eval: step 6:") == 1
    stamps = {s: p.stat().st_mtime_ns for s, p in eval_jsons(run).items()}

    again = pretrain("eval", str(run), "--watch", "--interval-s", "30")  # ends by itself: max_steps 6 is done
    assert "eval: step" not in again.stdout and "done" in again.stdout
    assert {s: p.stat().st_mtime_ns for s, p in eval_jsons(run).items()} == stamps

    records = {s: json.loads(p.read_text()) for s, p in eval_jsons(run).items()}
    assert sorted(json.loads(p.read_text())["step"] for p in (run / "eval").glob("step_*.json")) == [3, 6]
    for r in records.values():
        assert {"validation", "train"} <= set(r["splits"]) and r["tasks"]["cloze_stdlib"]["examples"] == 40
        assert 0 <= r["tasks"]["choice_stdlib"]["acc_norm"] <= 1 and r["loss"] == r["splits"]["validation"]["loss"]

    # W&B: one eval run (the restarted job had nothing to log), same project and group as training
    runs = {p: read_run(p) for p in offline_runs(run)}
    (train_run,) = [r for r in runs.values() if r["run"]["job_type"] == "train"]
    ((eval_file, eval_run),) = [(p, r) for p, r in runs.items() if r["run"]["job_type"] == "eval"]
    assert (eval_run["run"]["group"], eval_run["run"]["project"]) == (train_run["run"]["group"], "pretrain")
    assert ("*", "train/step") in metric_definitions(eval_file)
    rows = [r for r in eval_run["history"] if "train/step" in r]
    assert [r["train/step"] for r in rows] == [3, 6]
    for row in rows:
        expected = records[row["train/step"]]["metrics"]
        assert {"eval/validation/loss", "eval/train/perplexity", "eval/validation/acc_top5",
                "eval/task/cloze_stdlib/acc", "eval/task/choice_stdlib/acc_norm"} <= set(expected)
        assert all(row[k] == pytest.approx(v) for k, v in expected.items())
    # the table of every checkpoint evaluated so far, re-logged with each (history holds its file's ref)
    assert [r["eval/checkpoints/_type"] for r in rows] == ["table-file"] * 2
    assert [r["eval/checkpoints/nrows"] for r in rows] == [1, 2]
    newest = json.loads((eval_file.parent / "files" / rows[-1]["eval/checkpoints/path"]).read_text())
    assert newest["columns"][:3] == ["step", "tokens_trained", "eval/task/choice_stdlib/acc"]
    assert [row[0] for row in newest["data"]] == [3, 6]


def test_eval_runs_inside_a_ray_task(trained_run, tmp_path):
    run = copy_run(trained_run["run_dir"], tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "eval", str(run), "--checkpoint", "3", "--ray"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    record = json.loads(eval_jsons(run)[3].read_text())
    assert record["pid"] != proc.pid  # scored in a Ray worker process, recorded by the driver
    assert record["splits"]["validation"]["tokens"] > 0 and 6 not in eval_jsons(run)
