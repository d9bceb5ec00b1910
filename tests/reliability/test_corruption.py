"""Corruption: a flipped byte, a truncated file or a swapped dataset is detected from the recorded
sha256 (manifest.json for data, COMMIT for checkpoints) before anything trains or loads, with one
stderr line naming the file and exit code 1; eval and export refuse the same checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import pretrain
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path, n: int = 8) -> None:
    path.write_bytes(path.read_bytes()[:-n])


def _setup(tiny, reference, tmp_path: Path, with_checkpoints: bool) -> tuple[Path, Path, Path]:
    """A private copy of the dataset (and of the reference checkpoints) plus a config over them."""
    data = tmp_path / "data"
    shutil.copytree(tiny.data_dir, data)
    run_dir = tmp_path / "run"
    if with_checkpoints:
        shutil.copytree(reference.run_dir / "checkpoints", run_dir / "checkpoints", symlinks=True)
    raw = yaml.safe_load((reference.run_dir / "config.yaml").read_text())
    raw.update(run_dir=str(run_dir))
    raw["data"]["output_dir"] = str(data)
    raw["train"]["max_steps"] = 10
    raw["tracking"]["mode"] = "disabled"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg, data, run_dir


def _newest(run_dir: Path) -> Path:
    return ckpt.latest_committed(run_dir / "checkpoints", verify=False).path


def _assert_refused(proc, names: str, *also: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert names in lines[0] and all(a in lines[0] for a in also), lines[0]
    assert "Traceback" not in proc.stderr


DATA_CASES = [
    # (id, mutation of the data dir, the file the error must name, words it must contain)
    ("flipped-byte-in-bin", lambda d: flip_byte(d / "train" / "docs-00000.bin"), "docs-00000.bin", "sha256"),
    ("truncated-idx", lambda d: truncate(d / "train" / "docs-00000.idx"), "docs-00000.idx", "sha256"),
    ("flipped-byte-in-validation-idx", lambda d: flip_byte(d / "validation" / "docs-00000.idx", 40),
     "docs-00000.idx", "sha256", "slow"),
    ("missing-shard", lambda d: (d / "train" / "docs-00000.bin").unlink(), "docs-00000.bin", "missing", "slow"),
    ("swapped-tokenizer", lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json", "sha256", "slow"),
]


def _params(cases):
    """pytest params from (id, *values[, "slow"]) rows: the long tail runs in the slow sweep only."""
    out = []
    for case in cases:
        slow = case[-1] == "slow"
        values = case[1:-1] if slow else case[1:]
        out.append(pytest.param(*values, id=case[0], marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("mutate, name, word", _params(DATA_CASES))
def test_corrupt_data_is_refused_before_training_naming_the_file(tiny, reference, tmp_path, mutate, name, word):
    cfg, data, run_dir = _setup(tiny, reference, tmp_path, with_checkpoints=False)
    mutate(data)
    proc = pretrain("train", str(cfg), check=False, timeout=300)
    _assert_refused(proc, name, word)
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


CHECKPOINT_CASES = [
    ("flipped-byte-in-safetensors", "model.safetensors", flip_byte),
    ("flipped-byte-in-deepspeed-optim", "zero_pp_rank_1_mp_rank_00_optim_states.pt", flip_byte),
    ("truncated-deepspeed-model", "mp_rank_00_model_states.pt", truncate),
    ("edited-trainer-state", "trainer_state.json",
     lambda p: p.write_text(p.read_text().replace('"step": 8', '"step": 80')), "slow"),
    ("missing-rng", "rng_rank1.pt", lambda p: p.unlink(), "slow"),
]


@pytest.mark.parametrize("victim, mutate", _params(CHECKPOINT_CASES))
def test_tampered_checkpoint_is_refused_before_loading_naming_the_file(tiny, reference, tmp_path, victim, mutate):
    cfg, _, run_dir = _setup(tiny, reference, tmp_path, with_checkpoints=True)
    newest = _newest(run_dir)
    before = (run_dir / "checkpoints").stat().st_mtime_ns
    mutate(newest / victim)
    proc = pretrain("train", str(cfg), check=False, timeout=300)
    _assert_refused(proc, victim, "COMMIT")
    assert not (run_dir / "metrics.jsonl").exists(), "training started"
    assert [c.step for c in ckpt.committed_checkpoints(run_dir / "checkpoints")] == [6, 8], "checkpoints changed"
    assert (run_dir / "checkpoints").stat().st_mtime_ns == before


def test_tampered_checkpoint_is_refused_by_eval_and_export(tiny, reference, tmp_path):
    cfg, _, run_dir = _setup(tiny, reference, tmp_path, with_checkpoints=True)
    flip_byte(_newest(run_dir) / "model.safetensors")
    shutil.copy(cfg, run_dir / "config.yaml")
    for args in (("eval", str(run_dir)), ("export", str(run_dir), "--to", "hf", str(tmp_path / "hf"))):
        proc = pretrain(*args, check=False, timeout=300)
        assert proc.returncode == 1, (args, proc.stderr[-2000:])
        assert "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_resume_on_a_different_dataset_is_refused(tiny, reference, tmp_path):
    cfg, data, _ = _setup(tiny, reference, tmp_path, with_checkpoints=True)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["created_unix"] += 1  # same shards, another manifest: another dataset as far as we know
    (data / "manifest.json").write_text(json.dumps(manifest))
    proc = pretrain("train", str(cfg), check=False, timeout=300)
    _assert_refused(proc, "step_00000008", "different dataset")
