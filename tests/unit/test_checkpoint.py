"""Commit protocol and retention, on directories laid out as training writes them."""

import json

import pytest

from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.unit


def write_tmp(root, step, files=("model.safetensors", "trainer_state.json")):
    tmp = root / f".tmp-{ckpt.tag_for(step)}"
    tmp.mkdir(parents=True)
    for name in files:
        (tmp / name).write_text(f"{name} at {step}")
    return tmp


def test_checkpoint_counts_only_once_commit_exists(tmp_path):
    write_tmp(tmp_path, 5)  # written, never committed (a crash mid-save)
    (tmp_path / ckpt.tag_for(7)).mkdir()  # renamed but died before COMMIT
    assert ckpt.committed_checkpoints(tmp_path) == []
    assert ckpt.latest_committed(tmp_path) is None
    final = ckpt.commit(tmp_path, write_tmp(tmp_path, 9), 9, keep_last=3)
    assert [c.step for c in ckpt.committed_checkpoints(tmp_path)] == [9]
    assert (tmp_path / "latest").read_text().strip() == final.name
    marker = json.loads((final / "COMMIT").read_text())
    assert sorted(marker["files"]) == ["model.safetensors", "trainer_state.json"]


def test_tampered_file_is_detected_naming_it(tmp_path):
    final = ckpt.commit(tmp_path, write_tmp(tmp_path, 1), 1, keep_last=3)
    (final / "model.safetensors").write_text("evil")
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.latest_committed(tmp_path)
    (final / "model.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.verify_checkpoint(final)


def test_retention_deletes_only_older_committed_and_debris(tmp_path):
    for step in (1, 2, 3):
        ckpt.commit(tmp_path, write_tmp(tmp_path, step), step, keep_last=10)
    write_tmp(tmp_path, 2)  # stale debris older than the newest
    pending = write_tmp(tmp_path, 6)  # another save in flight: newer, must survive
    ckpt.commit(tmp_path, write_tmp(tmp_path, 4), 4, keep_last=2)
    assert [c.step for c in ckpt.committed_checkpoints(tmp_path)] == [3, 4]
    assert pending.exists()
    assert not (tmp_path / f".tmp-{ckpt.tag_for(2)}").exists()


def test_commit_marker_cannot_point_outside_the_checkpoint(tmp_path):
    final = ckpt.commit(tmp_path, write_tmp(tmp_path, 1), 1, keep_last=3)
    (final / "COMMIT").write_text(json.dumps({"step": 1, "files": {"../../etc/passwd": "0"}}))
    with pytest.raises(ckpt.CheckpointError, match="outside"):
        ckpt.verify_checkpoint(final)


def test_keep_every_steps_keeps_multiples_forever_besides_the_newest(tmp_path):
    for step in range(1, 11):
        ckpt.commit(tmp_path, write_tmp(tmp_path, step), step, keep_last=2, keep_every_steps=4)
    assert [c.step for c in ckpt.committed_checkpoints(tmp_path)] == [4, 8, 9, 10]


def test_retained_steps_is_the_newest_k_plus_the_multiples():
    assert ckpt.retained_steps([3, 6, 9, 12, 15], keep_last=1, keep_every_steps=6) == {6, 12, 15}
    assert ckpt.retained_steps([3, 6, 9], keep_last=5) == {3, 6, 9}
    assert ckpt.retained_steps([], keep_last=2, keep_every_steps=3) == set()


def test_retention_never_touches_uncommitted_or_newer_directories(tmp_path):
    for step in (1, 2):
        ckpt.commit(tmp_path, write_tmp(tmp_path, step), step, keep_last=1, keep_every_steps=None)
    crashed = tmp_path / ckpt.tag_for(5)  # renamed, no COMMIT yet: newer than the newest committed
    crashed.mkdir()
    ckpt.apply_retention(tmp_path, keep_last=1)
    assert [c.step for c in ckpt.committed_checkpoints(tmp_path)] == [2] and crashed.exists()
