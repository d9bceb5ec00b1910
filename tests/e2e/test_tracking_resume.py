"""W&B offline run files across a training restart: one run id, one group, the right keys and steps,
and the API key from the environment nowhere on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import pretrain
from helpers.wandb_log import offline_runs, read_run

from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e

SECRET = "local-0123456789abcdef0123456789abcdef01234567"  # shaped like a W&B API key


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of the shared trained run, as training left it (other tests may evaluate the
    original: their eval records, eval W&B runs and reports are not copied)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
        "run.lock*", "eval.json", "eval", "eval_metrics.jsonl", "report.html", "report.png"))
    for wandb_file in offline_runs(dst):
        if read_run(wandb_file)["run"]["job_type"] != "train":
            shutil.rmtree(wandb_file.parent)
    return dst


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_restarted_training_continues_the_same_wandb_run_and_group_without_leaking_the_key(trained_run, tmp_path):
    run = copy_run(trained_run["run_dir"], tmp_path / "run")
    first_id = ckpt.latest_committed(run / "checkpoints").trainer_state()["wandb_run_id"]
    pretrain("train", "configs/demo.yaml", *trained_run["sets"], "--set", f"run_dir={run}",
             "--set", "train.max_steps=9", "--set", "train.nproc_per_node=2",
             env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"})
    pretrain("eval", str(run), env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"})

    newest = ckpt.latest_committed(run / "checkpoints")
    assert newest.step == 9 and newest.trainer_state()["wandb_run_id"] == first_id
    runs = [read_run(p) for p in offline_runs(run)]
    train = [r for r in runs if r["run"]["job_type"] == "train"]
    evals = [r for r in runs if r["run"]["job_type"] == "eval"]
    assert len(train) == 2 and len(evals) == 1  # before and after the restart; one eval job
    assert {r["run"]["id"] for r in train} == {first_id}
    assert {r["run"]["group"] for r in runs} == {"demo"}  # configs/demo.yaml: run_name demo
    assert {r["run"]["project"] for r in runs} == {"pretrain"}
    assert evals[0]["run"]["id"] != first_id

    before, after = ({row["_step"] for row in r["history"]} for r in train)
    assert {0, 2, 3, 4, 6} <= before and max(before) == 6  # log every 2, validate at 3 and 6
    assert after and min(after) > 6 and max(after) == 9  # continues; nothing before the checkpoint again
    keys = {k for r in train for row in r["history"] for k in row}
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/consumed_samples", "val/loss"} <= keys
    assert train[0]["config"]["train"]["max_steps"] == 6 and train[1]["config"]["train"]["max_steps"] == 9
    assert "tokenizer" in train[1]["config"]["data"]

    (row,) = [r for r in evals[0]["history"] if "eval/validation/loss" in r]
    assert row["train/step"] == 9  # plotted against the checkpoint's training step

    assert files_containing(run, SECRET.encode()) == []  # config, logs, metrics.jsonl, checkpoints, W&B
