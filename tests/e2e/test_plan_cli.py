"""`pretrain plan` on a real prepared dataset and run directory: what it accepts and what it refuses."""

from __future__ import annotations

import pytest

from conftest import pretrain

pytestmark = pytest.mark.e2e


def plan(trained_run, *args):
    return pretrain("plan", "configs/demo.yaml", *trained_run["sets"], *args, check=False, timeout=120)


def test_plan_of_the_finished_run_passes_and_says_the_budget_is_spent(trained_run):
    done = plan(trained_run, "--world-size", "2", "--mfu", "0.5", "--peak-tflops", "100")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "[ok  ] data" in out and "manifest.json verified" in out
    assert "resumes from" in out and "step_00000006" in out and "will do nothing" in out
    assert "8 = micro 4 × accumulation 1 × world size 2" in out
    for heading in ("model", "compute", "memory/GPU", "tokens", "time"):
        assert any(line.startswith(heading) for line in out.splitlines()), heading
    assert "6 steps × 512 = 3,072" in out  # train.max_steps × global batch 8 × seq_len 64


def test_plan_refuses_a_checkpoint_of_another_model_or_batch(trained_run):
    done = plan(trained_run, "--set", "model.n_layer=3", "--set", "train.global_batch_size=16")
    assert done.returncode == 1
    assert "model.n_layer: checkpoint 2, config 3" in done.stdout
    assert "train.global_batch_size: checkpoint 8, config 16" in done.stdout


def test_plan_refuses_an_indivisible_world_size_and_missing_data(trained_run, tmp_path):
    done = plan(trained_run, "--world-size", "3", "--set", f"data.output_dir={tmp_path / 'nothing'}")
    assert done.returncode == 1
    assert "[FAIL] batch" in done.stdout and "world size (3)" in done.stdout
    assert "[FAIL] data" in done.stdout and "run `pretrain prepare`" in done.stdout


def test_plan_with_an_invalid_config_exits_2(trained_run):
    done = plan(trained_run, "--set", "train.zero_stage=7")
    assert done.returncode == 2 and "train.zero_stage" in done.stderr
