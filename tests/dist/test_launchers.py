"""One entry point, every launcher: `accelerate launch`, Slurm's `srun` environment and Ray Train's
TorchTrainer each start 2 ranks of the same `pretrain train` that train and commit a checkpoint with
world size 2. (torchrun and the deepspeed launcher: tests/dist/test_two_ranks.py.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def short_run(run: Path) -> list[str]:
    sets = [f"run_dir={run}", "train.max_steps=2", "checkpoint.save_interval_steps=2", "tracking.mode=disabled",
            "train.seq_len=32", "train.micro_batch_size_per_gpu=2", "eval.max_samples=8", "eval.micro_batch_size=2"]
    return [a for s in sets for a in ("--set", s)]


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_trained_on_two_ranks(run: Path, out: str) -> None:
    latest = ckpt.latest_committed(run / "checkpoints")
    assert latest is not None, out[-3000:]
    state = latest.trainer_state()
    assert latest.step == 2 and state["world_size"] == 2 and len(set(state["sample_digests"])) == 2


@pytest.mark.skipif(not (BIN / "accelerate").exists(), reason="accelerate is not installed")
def test_accelerate_launch_starts_two_ranks_that_train_and_commit(trained_run, tmp_path):
    """accelerate's multi-process launcher is its MULTI_GPU mode (torchrun underneath); it runs on
    CPU too, as our engine picks gloo. (Its --cpu mode starts one process, or needs mpirun.)"""
    accel = tmp_path / "accelerate.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
                     "num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: false\n"
                     f"main_process_port: {free_port()}\n")
    run = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--config_file", str(accel), "-m", "pipeline.cli", "train",
         str(trained_run["run_dir"] / "config.yaml"), *short_run(run)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_trained_on_two_ranks(run, proc.stdout)


def test_srun_environment_starts_two_ranks_that_train_and_commit(trained_run, tmp_path):
    """What `srun --ntasks 2 pretrain train ...` gives each task: SLURM_PROCID / NTASKS / LOCALID,
    and the rendezvous address the sbatch script exports."""
    run, port = tmp_path / "run", str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "train", str(trained_run["run_dir"] / "config.yaml"), *short_run(run)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_JOB_ID="4242",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert_trained_on_two_ranks(run, outs[0])
    assert "world size 2" in outs[0]


# slow: the default run covers Ray Train workers that train and commit across two nodes
# (tests/e2e/test_ray_two_nodes.py) and on one (tests/e2e/test_submit_ray.py)
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="ray is not installed")
def test_ray_backend_starts_two_torchtrainer_workers_that_train_and_commit(trained_run, tmp_path):
    """`pretrain train --backend ray --num-workers 2`: embedded Ray (RAY_ADDRESS unset), one
    TorchTrainer worker per rank, each calling deepspeed.initialize through our train()."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", str(trained_run["run_dir"] / "config.yaml"),
         "--backend", "ray", "--num-workers", "2", *short_run(run)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
        env={k: v for k, v in env().items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_trained_on_two_ranks(run, proc.stdout)
    assert "RayTrainWorker" in proc.stdout + proc.stderr
