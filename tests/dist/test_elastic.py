"""Elastic resume: a checkpoint written by 2 ranks continues on 1, and one from 1 rank on 2, with the
same global batch — every sample of the stream read exactly once, and the loss curve continuing.

Proof of "exactly once": each checkpoint carries, per segment of steps trained on one world size,
every rank's chained sha256 of the sample ids it read. The test recomputes those digests from the
pure sampling functions (loader.rank_positions / BlendedSamples.ids) and checks that the segments
tile steps 0..N, so the positions read are [0, N × global batch), each once.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from pipeline.data.loader import BlendedSamples, open_split, rank_positions
from pipeline.train import checkpoint as ckpt
from test_resume import job, losses, run_jobs

pytestmark = pytest.mark.dist

GB, MICRO, N, K = 8, 2, 4, 2


def segment_digests(data: BlendedSamples, start: int, end: int, world: int) -> tuple[list[str], list[int]]:
    """What each rank of a ``world``-rank segment over steps [start, end) must have read, and the
    global positions read by all ranks together."""
    digests, seen = [], []
    for rank in range(world):
        d = hashlib.sha256().hexdigest()
        for step in range(start, end):
            for m in range(GB // (MICRO * world)):
                pos = rank_positions(step * GB, m, rank, world, MICRO)
                seen += pos.tolist()
                src, ids = data.ids(pos)
                d = hashlib.sha256(d.encode() + src.astype(np.int64).tobytes() + ids.astype(np.int64).tobytes()).hexdigest()
        digests.append(d)
    return digests, seen


@pytest.fixture(scope="module")
def elastic_runs(trained_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    config = trained_run["run_dir"] / "config.yaml"
    dirs = {name: tmp / name for name in ("ref-z2", "2to1-z2", "2to1-z3", "1to2-z1", "z1-to-z2")}
    run_jobs(config, [job(dirs["ref-z2"], "train.zero_stage=2"),
                      job(dirs["2to1-z2"], "train.zero_stage=2", f"train.stop_at_step={K}"),
                      job(dirs["2to1-z3"], "train.zero_stage=3", "train.precision=bf16", f"train.stop_at_step={K}"),
                      job(dirs["z1-to-z2"], "train.zero_stage=1", f"train.stop_at_step={K}")],
             tmp, nproc=2)
    run_jobs(config, [job(dirs["2to1-z2"], "train.zero_stage=2"),
                      job(dirs["2to1-z3"], "train.zero_stage=3", "train.precision=bf16"),
                      job(dirs["1to2-z1"], "train.zero_stage=1", f"train.stop_at_step={K}")], tmp, nproc=1)
    run_jobs(config, [job(dirs["1to2-z1"], "train.zero_stage=1"), job(dirs["z1-to-z2"], "train.zero_stage=2")],
             tmp, nproc=2)
    manifest = json.loads((trained_run["data_dir"] / "manifest.json").read_text())
    data = BlendedSamples(open_split(trained_run["data_dir"], manifest, "train", 32), {"docs": 1.0}, seed=1234)
    return {"dirs": dirs, "data": data}


@pytest.mark.parametrize(("name", "before", "after"), [("2to1-z2", 2, 1), ("2to1-z3", 2, 1), ("1to2-z1", 1, 2)])
def test_resume_on_another_world_size_sees_every_sample_once(elastic_runs, name, before, after):
    run, data = elastic_runs["dirs"][name], elastic_runs["data"]
    latest = ckpt.latest_committed(run / "checkpoints")
    state = latest.trainer_state()
    assert latest.step == N and state["consumed_samples"] == N * GB and state["world_size"] == after
    segments = state["data_segments"] + [{"start_step": state["segment_start_step"], "end_step": N,
                                           "world_size": after, "sample_digests": state["sample_digests"]}]
    assert [(s["start_step"], s["end_step"], s["world_size"]) for s in segments] == [(0, K, before), (K, N, after)]
    positions = []
    for s in segments:
        want, seen = segment_digests(data, s["start_step"], s["end_step"], s["world_size"])
        assert s["sample_digests"] == want  # each rank read exactly its slice, nothing else
        positions += seen
    assert sorted(positions) == list(range(N * GB))  # together: every position once
    assert not list((run / "checkpoints").glob(".universal/*"))  # the converted copy is cleaned up


def test_loss_continues_across_world_sizes(elastic_runs):
    """Same global batch, same samples: 2 → 1 ranks only changes the reduction order."""
    ref, moved = losses(elastic_runs["dirs"]["ref-z2"]), losses(elastic_runs["dirs"]["2to1-z2"])
    assert moved[1] == ref[1] and moved[2] == ref[2]  # the 2-rank part, before the move
    assert [moved[3], moved[4]] == pytest.approx([ref[3], ref[4]], rel=1e-5)


def test_resume_with_another_zero_stage_goes_through_a_universal_checkpoint(elastic_runs):
    """Same 2 ranks, a ZeRO-1 checkpoint continued under ZeRO-2: the sample chain simply continues."""
    run = elastic_runs["dirs"]["z1-to-z2"]
    state = ckpt.latest_committed(run / "checkpoints").trainer_state()
    assert state["zero_stage"] == 2 and state["data_segments"] == []
    assert state["sample_digests"] == segment_digests(elastic_runs["data"], 0, N, 2)[0]
    ref = losses(elastic_runs["dirs"]["ref-z2"])
    assert losses(run) == pytest.approx(ref, rel=1e-5)
