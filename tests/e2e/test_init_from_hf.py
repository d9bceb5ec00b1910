"""HF weights seed our training: export a run, start a new run from the export."""

import json

import pytest

from conftest import pretrain

pytestmark = pytest.mark.e2e


def test_new_run_starts_from_exported_weights(trained_run, tmp_path):
    hf_dir = tmp_path / "hf"
    pretrain("export", str(trained_run["run_dir"]), "--to", "hf", str(hf_dir))
    cfg = trained_run["run_dir"] / "config.yaml"
    run = tmp_path / "seeded"
    pretrain("train", str(cfg), "--set", f"run_dir={run}", "--set", f"model.init_from={hf_dir}",
             "--set", "train.max_steps=1", "--set", "train.nproc_per_node=1")
    source = [json.loads(l) for l in (trained_run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    seeded = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    trained_val = [r["val/loss"] for r in source if "val/loss" in r]
    # step 0 of the seeded run scores the same validation samples with the trained weights
    assert seeded[0]["step"] == 0
    assert seeded[0]["val/loss"] == pytest.approx(trained_val[-1], abs=1e-4)
    assert seeded[0]["val/loss"] < trained_val[0] - 0.3  # far from a fresh init


def test_init_from_with_mismatched_shape_fails_clearly(trained_run, tmp_path):
    hf_dir = tmp_path / "hf"
    pretrain("export", str(trained_run["run_dir"]), "--to", "hf", str(hf_dir))
    cfg = trained_run["run_dir"] / "config.yaml"
    proc = pretrain("train", str(cfg), "--set", f"run_dir={tmp_path / 'bad'}", "--set", f"model.init_from={hf_dir}",
                    "--set", "model.d_model=64", "--set", "train.max_steps=1", "--set", "train.nproc_per_node=1",
                    check=False)
    assert proc.returncode == 2
    assert "model.init_from" in proc.stderr and "Traceback" not in proc.stderr
