"""`pretrain submit --to slurm --nodes 2 --wait` on a real two-node Slurm (tests/services/start_cluster.sh):
nodes pt-node1 and pt-node2 are network + UTS + mount namespaces with their own hostname, address
and /tmp; slurmctld runs on pt-node1, one slurmd on each. The rendered script runs unchanged: one
torchrun per node through srun, a c10d rendezvous across the two, world size 2.

Shared folder: the nodes share no writable folder but /srv/pretrain-shared; every run, dataset and
corpus of this module lives under one folder there (the no-shared-filesystem case belongs to the
object-storage tests).

- an uninterrupted run (also the reference of the others' losses);
- recovery: SIGKILL of pt-node2's ranks mid-run; torchrun (launch.max_restarts=1) restarts the
  group on both nodes, it resumes from the last COMMIT and finishes with exit 0 and the same losses;
- preemption: USR1 reaches the batch script (`scancel --signal=USR1 --batch`, what Slurm does on a
  preemption with GraceTime); the ranks commit, the job requeues itself and the requeued job resumes
  bit for bit; the slow variant waits for the real `--time` limit and `--signal=B:USR1@N` instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import pretrain, write_corpus
from helpers.recovery import first_step_after, kill_all, losses, rank_pids, restarts, trained_step, wait_for
from pipeline.train import checkpoint as ckpt

CONF = "/var/lib/pretrain-cluster/slurm.conf"
SHARED = Path("/srv/pretrain-shared")
NODES = ("pt-node1", "pt-node2")
ENV = {"SLURM_CONF": CONF}
STEPS = 24


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None or not Path(CONF).is_file():
        return "no two-node cluster (run tests/services/start_cluster.sh as root)"
    up = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                        env={**os.environ, **ENV})
    ready = [line.split()[0] for line in up.stdout.splitlines() if line.split()[1:2] in (["idle"], ["mixed"])]
    if sorted(ready) != list(NODES):
        return f"the two-node Slurm is not up (tests/services/start_cluster.sh): {up.stdout.strip()} {up.stderr.strip()}"
    return None


pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_cluster_problem() is not None, reason=str(_cluster_problem()))]


@pytest.fixture(scope="module")
def shared():
    """This module's folder on the one folder both nodes see."""
    root = SHARED / f"test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    write_corpus(root / "raw" / "docs.jsonl", 400)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _sets(shared: Path, run: Path, *extra: str) -> list[str]:
    sets = [f"run_dir={run}", f"data.output_dir={shared / 'data'}",
            f"data.sources=[{{path: '{shared / 'raw' / 'docs.jsonl'}'}}]", "data.tokenizer.vocab_size=1024",
            "train.seq_len=64", "train.micro_batch_size_per_gpu=4", "train.global_batch_size=8",
            f"train.max_steps={STEPS}", "train.log_interval_steps=1", "train.nproc_per_node=1",
            "checkpoint.save_interval_steps=4", "checkpoint.keep_last=100", "eval.max_samples=16",
            "eval.micro_batch_size=4", "tracking.mode=disabled", f"launch.slurm.python={sys.executable}",
            "launch.slurm.cpus_per_task=1", "launch.slurm.time_limit=00:15:00", *extra]
    return [a for s in sets for a in ("--set", s)]


def _submit(shared: Path, run: Path, *extra: str) -> list[str]:
    """The command a user types (after `pretrain`)."""
    return ["submit", "configs/demo.yaml", "--to", "slurm", "--nodes", "2", "--wait", *_sets(shared, run, *extra)]


def _log(run: Path) -> str:
    return "".join(p.read_text() for p in sorted((run / "slurm").glob("*.out")))


def _job_id(run: Path) -> str:
    out = wait_for(lambda: list((run / "slurm").glob("*.out")), 60, "the job's log")
    return out[0].stem.rsplit("-", 1)[1]


def _popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *cmd], cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **ENV})


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def reference(shared) -> Path:
    """The uninterrupted two-node run: prepare on the cluster, train 24 steps, eval."""
    run = shared / "reference"
    done = pretrain(*_submit(shared, run), env=ENV, timeout=400)
    assert "COMPLETED" in done.stdout, done.stdout + _log(run)[-3000:]
    return run


def test_submit_nodes_2_trains_one_group_across_both_nodes(reference):
    log = _log(reference)
    assert "on pt-node[1-2], rendezvous pt-node1:29500" in log, log[-3000:]
    assert "train: world size 2" in log
    latest = ckpt.latest_committed(reference / "checkpoints")
    state = latest.trainer_state()
    assert latest.step == STEPS and state["world_size"] == 2 and len(set(state["sample_digests"])) == 2
    assert (latest.path / "eval.json").is_file()


def test_killed_node_ranks_restart_the_group_and_finish_with_the_same_losses(shared, reference, capsys):
    run = shared / "killed"
    proc = _popen(_submit(shared, run, "launch.max_restarts=1"))
    try:
        wait_for(lambda: trained_step(run) >= 9 or proc.poll() is not None, 300, "step 9")
        # pt-node2's ranks: the processes whose slurmd is pt-node2's
        victims = wait_for(lambda: rank_pids(f"SLURMD_NODENAME={NODES[1]}", f"SLURM_JOB_ID={_job_id(run)}"), 30,
                           "pt-node2's ranks")
        killed_at = kill_all(victims)
        out = _finish(proc, 400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "COMPLETED" in out, out + _log(run)[-4000:]
    step, took = first_step_after(run, killed_at)
    with capsys.disabled():
        print(f"\n[two-node Slurm] SIGKILL of pt-node2's ranks → first step after it (step {step}): {took:.1f} s")
    assert [n for _, n in restarts(run)] == [1]
    assert "automatic restart 1 of 1 (launch.max_restarts)" in _log(run)
    assert losses(run) == losses(reference)
    assert ckpt.latest_committed(run / "checkpoints").trainer_state()["world_size"] == 2


def _assert_preempted_and_resumed(run: Path, reference: Path) -> None:
    log = _log(run)
    assert "pretrain: USR1 at" in log and "(restart 1) on pt-node[1-2]" in log, log[-4000:]
    stopped = [c for c in (run / "checkpoints").glob("step_*") if (c / "COMMIT").is_file()
               and json.loads((c / "trainer_state.json").read_text()).get("stopped_by") == "SIGTERM"]
    assert stopped, "no checkpoint was committed on the preemption signal"
    step = json.loads((stopped[0] / "trainer_state.json").read_text())["step"]
    assert f"resumed from {stopped[0]} at step {step}" in log
    assert losses(run) == losses(reference)
    assert ckpt.latest_committed(run / "checkpoints").step == STEPS


def test_usr1_commits_requeues_and_the_requeued_job_resumes_bit_for_bit(shared, reference):
    run = shared / "preempted"
    proc = _popen(_submit(shared, run))
    try:
        wait_for(lambda: trained_step(run) >= 9 or proc.poll() is not None, 300, "step 9")
        sent = subprocess.run(["scancel", "--signal=USR1", "--batch", _job_id(run)], capture_output=True,
                              text=True, env={**os.environ, **ENV})
        assert sent.returncode == 0, sent.stderr
        out = _finish(proc, 400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "COMPLETED" in out, out + _log(run)[-4000:]
    _assert_preempted_and_resumed(run, reference)


@pytest.mark.slow
def test_time_limit_signal_commits_requeues_and_resumes_bit_for_bit(shared, tmp_path):
    """The real thing: `#SBATCH --time=00:01:00 --signal=B:USR1@30`; slurmctld sends USR1 once 30 s
    are gone (it looks every 30 s: within 30-60 s), and every allocation commits and requeues until
    the budget is spent. 600 steps (~0.1 s each here), so that the first allocations are still
    training when USR1 comes."""
    # a loss row per step: a window of steps logged across a resume would average fewer steps
    steps = ["train.max_steps=600", "train.log_interval_steps=1", "checkpoint.save_interval_steps=200"]
    reference = shared / "long-reference"
    pretrain("prepare", "configs/demo.yaml", *_sets(shared, reference))  # up to date when the others ran first
    ref = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "configs/demo.yaml",
                          *_sets(shared, reference, *steps, "train.nproc_per_node=2")],
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = shared / "timed"
    proc = _popen(_submit(shared, run, *steps, "launch.slurm.time_limit=00:01:00", "launch.slurm.signal_lead_s=30"))
    out = _finish(proc, 1200)
    assert proc.returncode == 0 and "COMPLETED" in out, out + _log(run)[-4000:]
    log = _log(run)
    assert "--signal=B:USR1@30" in next((run / "submitted").glob("*.sbatch")).read_text()
    assert "pretrain: USR1 at" in log and "(restart 1)" in log, log[-4000:]
    assert losses(run) == losses(reference)
    assert ckpt.latest_committed(run / "checkpoints").step == 600
