"""Continued pretraining: `prepare --append` grows a dataset a 2-rank run is training on, and the
resumed run keeps every sample it trained, then mixes the new data into what was left.

Real CLI subprocesses, real Ray (prepare), real DeepSpeed over gloo (train)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import pretrain, write_corpus
from pipeline.data.eras import Era, EraStream
from pipeline.data.loader import BlendedSamples, open_split, rank_positions
from pipeline.data.manifest import manifest_sha256
from pipeline.data.shards import sha256_file
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e
SEED, GLOBAL, MICRO, WORLD, SEQ = 1234, 8, 4, 2, 64


def _sets(tmp: Path) -> list[str]:
    sets = [f"run_dir={tmp / 'run'}", f"data.output_dir={tmp / 'data'}",
            f"data.sources=[{{path: '{tmp / 'raw'}', name: docs}}]", "data.tokenizer.vocab_size=1024",
            f"train.seq_len={SEQ}", f"train.micro_batch_size_per_gpu={MICRO}", f"train.global_batch_size={GLOBAL}",
            "train.max_steps=10", "train.log_interval_steps=2", "checkpoint.save_interval_steps=2",
            "checkpoint.keep_last=10", "eval.max_samples=16", "eval.micro_batch_size=4", "train.nproc_per_node=2"]
    return [a for s in sets for a in ("--set", s)]


def _digests(data: BlendedSamples, steps: int) -> list[str]:
    out = []
    for rank in range(WORLD):
        d = hashlib.sha256().hexdigest()
        for step in range(steps):
            src, ids = data.ids(rank_positions(step * GLOBAL, 0, rank, WORLD, MICRO))
            d = hashlib.sha256(d.encode() + src.astype(np.int64).tobytes() + ids.astype(np.int64).tobytes()).hexdigest()
        out.append(d)
    return out


def _shard_hashes(data: Path) -> dict[str, str]:
    return {p.relative_to(data).as_posix(): sha256_file(p) for p in sorted(data.glob("*/*.*"))}


def test_append_grows_the_dataset_and_the_run_continues_without_reshuffling(tmp_path):
    raw, data, run = tmp_path / "raw", tmp_path / "data", tmp_path / "run"
    write_corpus(raw / "part-0.jsonl", 180)
    sets = _sets(tmp_path)
    pretrain("prepare", "configs/demo.yaml", *sets)
    old_manifest = json.loads((data / "manifest.json").read_text())
    old_sha, old_files = manifest_sha256(data), _shard_hashes(data)
    assert [r["file"] for r in old_manifest["inputs"]] == [str(raw / "part-0.jsonl")]
    old_train = BlendedSamples(open_split(data, old_manifest, "train", SEQ, seed=SEED), {"docs": 1.0}, SEED)
    n_old = len(old_train.sources[0])

    pretrain("train", "configs/demo.yaml", *sets, "--set", "train.stop_at_step=4")
    assert ckpt.latest_committed(run / "checkpoints").step == 4

    # -- new data arrives: a second file in the source's directory --------------------------------
    write_corpus(raw / "part-1.jsonl", 150, start=180)
    (raw / "part-1.jsonl").write_text((raw / "part-1.jsonl").read_text() + "{broken json\n")
    out = pretrain("prepare", "configs/demo.yaml", *sets, "--append")
    assert "1 new input file" in out.stdout
    m = json.loads((data / "manifest.json").read_text())
    new_files = _shard_hashes(data)
    assert {k: new_files[k] for k in old_files} == old_files  # nothing already written changed
    assert m["splits"]["train"]["sources"]["docs"]["shards"] == ["train/docs-00000", "train/docs-00001"]
    assert m["lineage"] == [old_sha] and m["appends"][0]["inputs"] == [str(raw / "part-1.jsonl")]
    acc = m["accounting"]
    assert acc["documents_in"] == 180 + 151 and acc["quarantined"] == old_manifest["accounting"]["quarantined"] + 1
    assert acc["documents_in"] == acc["kept"] + acc["quarantined"] + acc["deduplicated"]
    assert m["splits"]["train"]["tokens"] > old_manifest["splits"]["train"]["tokens"]
    assert (data / m["appends"][0]["quarantine_file"]).read_text().count('"reason"') == 1

    # idempotent: nothing new → nothing changes
    sha = manifest_sha256(data)
    again = pretrain("prepare", "configs/demo.yaml", *sets, "--append")
    assert "no new input files" in again.stdout and manifest_sha256(data) == sha
    # a plain prepare would rebuild (and re-cut) everything: refused without --force
    plain = pretrain("prepare", "configs/demo.yaml", *sets, check=False)
    assert plain.returncode == 1 and "grew by `prepare --append`" in plain.stderr
    # an input that was already prepared may not change
    part0 = (raw / "part-0.jsonl").read_text()
    (raw / "part-0.jsonl").write_text(part0.replace("a", "b", 1))
    changed = pretrain("prepare", "configs/demo.yaml", *sets, "--append", check=False)
    assert changed.returncode == 1 and "part-0.jsonl: changed since it was prepared" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1
    (raw / "part-0.jsonl").write_text(part0)

    # the pre-flight check accepts the grown dataset and says what will happen
    plan = pretrain("plan", "configs/demo.yaml", *sets)
    assert "on a dataset grown by `prepare --append` since" in plan.stdout, plan.stdout

    # -- the run resumes on the grown dataset ---------------------------------------------------
    resumed = pretrain("train", "configs/demo.yaml", *sets)
    assert "era 1 starts at sample 32" in resumed.stdout + resumed.stderr
    state = ckpt.latest_committed(run / "checkpoints").trainer_state()
    assert state["step"] == 10 and state["data_manifest_sha256"] == manifest_sha256(data)
    marks = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "data/era" in r]
    assert [(r["step"], r["data/era"], r["data/era_start_sample"]) for r in marks] == [(5, 1, 32)]
    assert marks[0]["data/train_samples"] == sum(Era.from_json(state["data_eras"][1]).num_samples)
    eras = [Era.from_json(e) for e in state["data_eras"]]
    assert [(e.start, e.manifest_sha256) for e in eras] == [(0, old_sha), (32, manifest_sha256(data))]
    new_train = BlendedSamples(open_split(data, m, "train", SEQ, seed=SEED), {"docs": 1.0}, SEED)
    assert eras[0].num_samples == (n_old,) and eras[1].num_samples == (len(new_train.sources[0]),) > (n_old,)

    # every rank read what the pure functions say: the old mapping up to sample 32, the era's after
    new_train.eras = EraStream(eras, SEED, new_train.names)
    assert state["sample_digests"] == _digests(new_train, 10)
    before = np.arange(32)
    assert new_train.ids(before)[1].tolist() == old_train.ids(before)[1].tolist()
    # the new samples are trained on, and nothing consumed comes back before the old epoch's rest
    consumed = set(old_train.ids(before)[1].tolist())
    after = new_train.ids(np.arange(32, 80))[1].tolist()
    assert any(i >= n_old for i in after) and not consumed & set(after)

    # the checkpoint from before the append still evaluates on the grown dataset
    ev = pretrain("eval", str(run), "--checkpoint", "4")
    assert (run / "checkpoints" / ckpt.tag_for(4) / "eval.json").is_file(), ev.stdout


def test_a_rebuilt_dataset_is_still_refused_on_resume(tmp_path):
    """Only growth by --append continues a run; a dataset prepared anew is another dataset."""
    raw, data = tmp_path / "raw", tmp_path / "data"
    write_corpus(raw / "part-0.jsonl", 120)
    sets = _sets(tmp_path)
    pretrain("prepare", "configs/demo.yaml", *sets)
    pretrain("train", "configs/demo.yaml", *sets, "--set", "train.stop_at_step=2")
    write_corpus(raw / "part-1.jsonl", 40, start=120)
    pretrain("prepare", "configs/demo.yaml", *sets)  # a plain rebuild of a never-appended dataset
    proc = pretrain("train", "configs/demo.yaml", *sets, check=False)
    assert proc.returncode == 1 and "was trained on a different dataset" in proc.stderr
    assert "prepare --append" in proc.stderr
