"""How a launch is named, and how rank 0 counts its starts (pipeline/train/restarts.py)."""

from __future__ import annotations

from pipeline.train.restarts import LAUNCH_ENV, count_start, launch_id


def test_a_launch_is_named_by_our_id_else_the_slurm_job_and_its_requeue_else_torchrun():
    assert launch_id({LAUNCH_ENV: "ray-ab12", "SLURM_JOB_ID": "7"}) == "ray-ab12"
    slurm = {"SLURM_JOB_ID": "7", "TORCHELASTIC_RUN_ID": "7"}  # torchrun under srun
    assert launch_id(slurm) == "slurm-7-0"
    assert launch_id({**slurm, "SLURM_RESTART_COUNT": "2"}) == "slurm-7-2"  # a requeue: a new launch
    assert launch_id({"SLURM_JOB_ID": "7"}) is None  # `pretrain train` in an allocation: nothing restarts it
    assert launch_id({"TORCHELASTIC_RUN_ID": "job/1"}) == "torchrun-job_1"
    assert launch_id({"TORCHELASTIC_RUN_ID": "none"}) is None
    assert launch_id({}) is None


def test_each_start_of_one_launch_counts_one_restart_more(tmp_path):
    env = {"SLURM_JOB_ID": "9", "TORCHELASTIC_RUN_ID": "9"}
    assert [count_start(str(tmp_path), env) for _ in range(3)] == [0, 1, 2]
    assert count_start(str(tmp_path), {**env, "SLURM_RESTART_COUNT": "1"}) == 0
    assert count_start(str(tmp_path), {}) == 0  # no launcher: never a restart
