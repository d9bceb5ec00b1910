"""Real 2-process gloo groups under DeepSpeed, started the three ways users start them."""

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest

from conftest import ROOT
from pipeline.data.loader import BlendedSamples, open_split, rank_positions
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.dist


def expected_digest(data: BlendedSamples, rank: int, world: int, micro: int, steps: int, global_batch: int) -> str:
    digest = hashlib.sha256().hexdigest()
    for step in range(steps):
        for m in range(global_batch // (micro * world)):
            src, ids = data.ids(rank_positions(step * global_batch, m, rank, world, micro))
            payload = src.astype(np.int64).tobytes() + ids.astype(np.int64).tobytes()
            digest = hashlib.sha256(digest.encode() + payload).hexdigest()
    return digest


def test_two_rank_run_has_world_size_two_and_ranks_read_different_data(trained_run):
    run = trained_run["run_dir"]
    assert "world size 2" in trained_run["train_out"]
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["world_size"] == 2
    latest = ckpt.latest_committed(run / "checkpoints")
    state = latest.trainer_state()
    assert latest.step == 6 and state["world_size"] == 2 and state["consumed_samples"] == 6 * 8
    manifest = json.loads((trained_run["data_dir"] / "manifest.json").read_text())
    data = BlendedSamples(open_split(trained_run["data_dir"], manifest, "train", 64), {"docs": 1.0}, seed=1234)
    want = [expected_digest(data, r, 2, 4, 6, 8) for r in (0, 1)]
    assert state["sample_digests"] == want  # each rank read exactly its own slice
    assert want[0] != want[1]


def _copy_data_run(trained_run, name):
    """A new run dir over the same prepared data (the resolved config of the fixture's run)."""
    cfg = trained_run["run_dir"] / "config.yaml"
    return cfg, trained_run["tmp"] / name


def test_torchrun_starts_ranks_that_train_and_commit(trained_run):
    import subprocess

    cfg, run = _copy_data_run(trained_run, "run-torchrun")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29633",
         "-m", "pipeline.cli", "train", str(cfg), "--set", f"run_dir={run}", "--set", "train.max_steps=2",
         "--set", "checkpoint.save_interval_steps=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    latest = ckpt.latest_committed(run / "checkpoints")
    assert latest.step == 2 and latest.trainer_state()["world_size"] == 2


@pytest.mark.skipif(shutil.which("deepspeed") is None and not (ROOT / ".venv/bin/deepspeed").exists(),
                    reason="the deepspeed launcher script is not installed")
def test_deepspeed_launcher_starts_ranks_that_train_and_commit(trained_run):
    import os
    import subprocess

    cfg, run = _copy_data_run(trained_run, "run-deepspeed")
    launcher = shutil.which("deepspeed") or str(ROOT / ".venv/bin/deepspeed")
    proc = subprocess.run(
        [launcher, "--num_accelerators", "2", "--master_port", "29644", "--module", "pipeline.cli", "train",
         str(cfg), "--set", f"run_dir={run}", "--set", "train.max_steps=2", "--set", "checkpoint.save_interval_steps=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    latest = ckpt.latest_committed(run / "checkpoints")
    assert latest.step == 2 and latest.trainer_state()["world_size"] == 2


@pytest.mark.parametrize(("stage", "precision"), [(3, "bf16"), (1, "fp32")])
def test_zero_stages_and_precisions_train_and_resume(trained_run, stage, precision):
    """Two ranks, ZeRO-3 bf16 and ZeRO-1 fp32: train 2 steps, then resume to 4 from the commit."""
    from conftest import pretrain

    cfg, run = _copy_data_run(trained_run, f"run-z{stage}-{precision}")
    sets = ["--set", f"run_dir={run}", "--set", f"train.zero_stage={stage}", "--set", f"train.precision={precision}",
            "--set", "checkpoint.save_interval_steps=2", "--set", "train.nproc_per_node=2"]
    pretrain("train", str(cfg), *sets, "--set", "train.max_steps=2")
    out = pretrain("train", str(cfg), *sets, "--set", "train.max_steps=4")
    assert "resumed from" in out.stdout and "step_00000002" in out.stdout
    assert [c.step for c in ckpt.committed_checkpoints(run / "checkpoints")] == [2, 4]
