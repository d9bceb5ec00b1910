"""One W&B dashboard per training run, read from the offline records of a training run (restarted
once) and three separate eval jobs (a --watch among them, restarted): two runs in the group (train,
eval), train/step the step metric of both, eval points at each checkpoint's step with no W&B step
used twice, and the lineage dataset → training run → checkpoint → eval → export as artifacts."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import pretrain
from helpers.wandb_log import offline_runs, read_run
from helpers.wandb_records import artifacts, metric_definitions
from test_tracking_resume import copy_run

pytestmark = pytest.mark.e2e


def _runs(run_dir) -> list[tuple[dict, list[dict], list]]:
    """(run, history, artifacts, metric definitions) of each offline file, oldest first."""
    return [(read_run(p)["run"], read_run(p)["history"], artifacts(p), metric_definitions(p))
            for p in sorted(offline_runs(run_dir), key=lambda p: p.parent.name)]


def test_train_and_every_eval_job_share_one_dashboard_and_the_checkpoint_lineage(trained_run, tmp_path):
    run = copy_run(trained_run["run_dir"], tmp_path / "run")
    pretrain("train", "configs/demo.yaml", *trained_run["sets"], "--set", f"run_dir={run}",
             "--set", "train.max_steps=9", "--set", "train.nproc_per_node=2",  # the training run, restarted
             "--set", "checkpoint.keep_last=3")  # 3, 6 and 9 stay
    pretrain("eval", str(run), "--checkpoint", "3")  # job 1
    pretrain("eval", str(run), "--watch", "--interval-s", "1", "--max-evals", "1")  # job 2: step 6, then stops
    pretrain("eval", str(run), "--watch", "--interval-s", "1")  # job 2 restarted: step 9 = max_steps, done
    train_id = json.loads((run / "checkpoints" / "step_00000009" / "trainer_state.json").read_text())["wandb_run_id"]

    runs = _runs(run)
    assert {r["group"] for r, *_ in runs} == {"demo"}
    assert {(r["id"], r["job_type"]) for r, *_ in runs} == {(train_id, "train"), (f"{train_id}-eval", "eval")}
    assert Counter(r["job_type"] for r, *_ in runs) == {"train": 2, "eval": 3}  # files: resumed, not new runs
    for _, history, _, definitions in runs:
        assert ("train/step", "") in definitions and ("*", "train/step") in definitions
        assert all("train/step" in row for row in history)

    train = [(h, a) for r, h, a, _ in runs if r["job_type"] == "train"]
    evals = [(h, a) for r, h, a, _ in runs if r["job_type"] == "eval"]
    assert all(row["_step"] == row["train/step"] for h, _ in train for row in h)
    eval_rows = [row for h, _ in evals for row in h]
    assert [row["train/step"] for row in eval_rows] == [3, 6, 9]  # each checkpoint's step, one job each
    assert len({row["_step"] for row in eval_rows}) == len(eval_rows)  # no W&B step used twice
    records = {s: json.loads((run / "eval" / f"step_{s:08d}.json").read_text()) for s in (3, 6, 9)}
    for row in eval_rows:
        assert row["eval/validation/loss"] == pytest.approx(records[row["train/step"]]["loss"])
        assert records[row["train/step"]]["wandb_run_id"] == f"{train_id}-eval"

    # lineage: dataset → training run → checkpoint (one version per step) → eval run → eval record
    used_by_train = [a for _, arts in train for a in arts if a["used"]]
    assert {(a["type"], a["name"]) for a in used_by_train} == {("dataset", "dataset-data")}
    assert set(used_by_train[0]["entries"]) == {"manifest.json", "tokenizer.json"}
    logged = {a["metadata"]["step"]: a for _, arts in train for a in arts if a["type"] == "model" and not a["used"]}
    assert sorted(logged) == [3, 6, 9] and {a["name"] for a in logged.values()} == {f"checkpoint-{train_id}"}
    for step, a in logged.items():
        assert f"step_{step:08d}" in a["aliases"] and "COMMIT" in a["entries"] and "eval.json" not in a["entries"]
        assert a["entries"]["model.safetensors"].startswith("file://")  # a reference: the weights stay put
    used_by_eval = [a for _, arts in evals for a in arts if a["used"]]
    assert [(a["metadata"]["step"], a["digest"]) for a in used_by_eval] == \
        [(s, logged[s]["digest"]) for s in (3, 6, 9)]  # the very versions training logged
    outputs = [a for _, arts in evals for a in arts if a["type"] == "eval"]
    assert [(a["name"], a["metadata"]["step"]) for a in outputs] == [(f"eval-{train_id}", s) for s in (3, 6, 9)]

    # → export: its own run in the group uses the checkpoint and outputs the transformers directory
    pretrain("export", str(run), "--to", "hf", str(tmp_path / "hf"))
    (export,) = [(r, a) for r, _, a, _ in _runs(run) if r["job_type"] == "export"]
    assert export[0]["id"] == f"{train_id}-export"
    (used,) = [a for a in export[1] if a["used"]]
    assert used["digest"] == logged[9]["digest"]
    (out,) = [a for a in export[1] if not a["used"]]
    assert out["name"] == f"hf-{train_id}" and {"config.json", "model.safetensors", "README.md"} <= set(out["entries"])
