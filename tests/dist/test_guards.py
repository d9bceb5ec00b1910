"""Guards on 2 real ranks: an injected NaN loss is skipped with weights and optimizer moments
unchanged; a planted loss spike is logged, skipped, or rolled back past; too many skips in a row
stop the run with exit code 4 and the last committed checkpoint intact.

Faults come from the documented test hooks in pipeline/train/guards.py (PRETRAIN_FAULT_*).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.loader import BlendedSamples, open_split, rank_positions
from pipeline.train import checkpoint as ckpt
from test_resume import TINY, job, losses, run_jobs

pytestmark = pytest.mark.dist

EVERY_STEP = ("checkpoint.save_interval_steps=1", "checkpoint.keep_last=5")
SPIKE = ("train.spike_window_steps=2", "train.spike_zscore=6")


@pytest.fixture(scope="module")
def guarded_runs(trained_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guards")
    config = trained_run["run_dir"] / "config.yaml"
    nan_on_rank1 = {"PRETRAIN_FAULT_NAN_AT_STEP": "3", "PRETRAIN_FAULT_RANKS": "1"}
    spike_at_step3 = {"PRETRAIN_FAULT_SPIKE_AT_SAMPLE": "16"}  # step 3 reads samples [16, 24)
    d = {name: tmp / name for name in ("nan-z0", "nan-z2", "nan-z3-bf16", "spike-log", "spike-skip", "spike-rollback")}
    jobs = [
        job(d["nan-z0"], "train.zero_stage=0", *EVERY_STEP, env=nan_on_rank1),
        job(d["nan-z2"], "train.zero_stage=2", *EVERY_STEP, env=nan_on_rank1),
        job(d["nan-z3-bf16"], "train.zero_stage=3", "train.precision=bf16", *EVERY_STEP, env=nan_on_rank1),
        job(d["spike-log"], "train.spike_action=log", *SPIKE, *EVERY_STEP, env=spike_at_step3),
        job(d["spike-skip"], "train.spike_action=skip", *SPIKE, *EVERY_STEP, env=spike_at_step3),
        job(d["spike-rollback"], "train.spike_action=rollback", *SPIKE, env=spike_at_step3),
    ]
    results = run_jobs(config, jobs, tmp, nproc=2)
    manifest = json.loads((trained_run["data_dir"] / "manifest.json").read_text())
    data = BlendedSamples(open_split(trained_run["data_dir"], manifest, "train", 32), {"docs": 1.0}, seed=1234)
    return {"dirs": d, "results": dict(zip(d, results)), "data": data, "config": config, "tmp": tmp}


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / ckpt.tag_for(step) / "model.safetensors"))


def optimizer_tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of every rank's optimizer state (moments, step counts, fp32 partitions)."""
    out = {}

    def walk(prefix, node):
        if torch.is_tensor(node):
            out[prefix] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{prefix}/{i}", v)

    path = run / "checkpoints" / ckpt.tag_for(step)
    for f in sorted(path.glob("*optim_states.pt")) or sorted(path.glob("mp_rank_*_model_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        walk(f.name, state.get("optimizer_state_dict", state.get("optimizer")))
    assert any("exp_avg" in k for k in out), sorted(out)[:10]
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["nan-z0", "nan-z2", "nan-z3-bf16"])
def test_nan_loss_on_one_rank_skips_the_step_leaving_weights_and_moments_unchanged(guarded_runs, name):
    run = guarded_runs["dirs"][name]
    assert same(weights(run, 2), weights(run, 3))
    assert same(optimizer_tensors(run, 2), optimizer_tensors(run, 3))
    assert not same(weights(run, 3), weights(run, 4))  # training went on after the skip
    state = ckpt.latest_committed(run / "checkpoints").trainer_state()
    assert state["skip_counts"]["nonfinite"] == 1 and state["consecutive_skips"] == 0
    assert state["consumed_samples"] == 4 * 8  # the poisoned batch counts as read
    by_step = {r["step"]: r for r in rows(run) if "train/loss" in r or "train/skipped_steps" in r}
    assert "train/loss" not in by_step[3] and by_step[3]["train/skipped_steps"] == 1
    assert np.isfinite(by_step[4]["train/loss"])


def test_spike_with_action_log_is_reported_and_trained_on(guarded_runs):
    run = guarded_runs["dirs"]["spike-log"]
    spikes = [r for r in rows(run) if "train/spike_zscore" in r]
    assert [r["step"] for r in spikes] == [3] and spikes[0]["train/spike_zscore"] > 6
    assert not same(weights(run, 2), weights(run, 3))


def test_spike_with_action_skip_leaves_the_weights(guarded_runs):
    run = guarded_runs["dirs"]["spike-skip"]
    assert same(weights(run, 2), weights(run, 3)) and same(optimizer_tensors(run, 2), optimizer_tensors(run, 3))
    state = ckpt.latest_committed(run / "checkpoints").trainer_state()
    assert state["skip_counts"]["spike"] == 1


def test_spike_with_action_rollback_resumes_from_the_checkpoint_and_never_trains_on_the_batch(guarded_runs):
    run, data = guarded_runs["dirs"]["spike-rollback"], guarded_runs["data"]
    state = ckpt.latest_committed(run / "checkpoints").trainer_state()
    assert state["step"] == 4 and state["skipped_batches"] == [[16, 24]]
    assert state["consumed_samples"] == 5 * 8  # one global batch more than the steps: the skipped one
    # what each rank read: steps 1, 2, then (after rolling back to step 2) the batches at 24 and 32
    starts = [0, 8, 24, 32]
    for rank in (0, 1):
        d = hashlib.sha256().hexdigest()
        for start in starts:
            for m in range(8 // (2 * 2)):
                src, ids = data.ids(rank_positions(start, m, rank, 2, 2))
                d = hashlib.sha256(d.encode() + src.astype(np.int64).tobytes() + ids.astype(np.int64).tobytes()).hexdigest()
        assert state["sample_digests"][rank] == d
    spikes = [r["step"] for r in rows(run) if "train/spike_zscore" in r]
    assert spikes == [3]  # once: the batch that caused it is never read again
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_too_many_consecutive_skips_stop_with_exit_4_and_last_checkpoint_intact(guarded_runs, tmp_path):
    from conftest import pretrain

    run = tmp_path / "halt"
    sets = [*TINY, f"run_dir={run}", *EVERY_STEP, "train.max_consecutive_skips=2"]
    proc = pretrain("train", str(guarded_runs["config"]), *[a for s in sets for a in ("--set", s)],
                    env={"PRETRAIN_FAULT_NAN_AT_STEP": "2,3,4"}, check=False)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "train.max_consecutive_skips" in proc.stderr and "Traceback" not in proc.stderr
    found = ckpt.committed_checkpoints(run / "checkpoints")
    assert [c.step for c in found] == [1, 2]  # step 2 was skipped but is a valid state; 3 never saved
    ckpt.verify_checkpoint(found[-1].path)
    assert same(weights(run, 1), weights(run, 2))
    assert not list((run / "checkpoints").glob(".tmp-*"))
