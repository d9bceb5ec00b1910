"""Fixtures of the reliability suite: one tiny prepared dataset and one uninterrupted reference run.

Both are made through the real CLI with a sentinel W&B API key in the environment (and W&B
offline), so test_security can search everything they wrote for that key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import pretrain, write_corpus
from reliability.harness import write_config
from pipeline.data.shards import sha256_file
from pipeline.train import checkpoint as ckpt

SECRET = "a-secret-sentinel"
SECRET_ENV = {"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline", "HF_TOKEN": SECRET + "-hf"}


@dataclass(frozen=True)
class Tiny:
    tmp: Path
    sources: Path
    data_dir: Path

    def config(self, name: str, **sections) -> tuple[Path, Path]:
        """(config path, run_dir) of a new run over the shared tiny dataset."""
        run_dir = self.tmp / name
        return write_config(self.tmp / f"{name}.yaml", run_dir, self.data_dir, self.sources, **sections), run_dir


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    tmp = tmp_path_factory.mktemp("reliability")
    sources = tmp / "docs.jsonl"
    write_corpus(sources, 150)
    t = Tiny(tmp, sources, tmp / "data")
    cfg, _ = t.config("prepare")
    pretrain("prepare", str(cfg), env=SECRET_ENV)
    return t


@dataclass(frozen=True)
class Reference:
    run_dir: Path
    losses: dict[int, float]  # step → train/loss of the uninterrupted run
    final_weights_sha256: str
    final_state: dict
    output: str


@pytest.fixture(scope="session")
def reference(tiny) -> Reference:
    """The uninterrupted 8-step run every crash trial must reproduce bit for bit (W&B offline)."""
    cfg, run_dir = tiny.config("reference", tracking={"mode": "offline"})
    proc = pretrain("train", str(cfg), env=SECRET_ENV)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == list(range(1, 9))
    final = ckpt.latest_committed(run_dir / "checkpoints")
    return Reference(run_dir, losses, sha256_file(final.path / "model.safetensors"), final.trainer_state(),
                     proc.stdout + proc.stderr)
