"""Shared fixtures: a small real corpus, a prepared dataset and one trained 2-rank run per session.

The corpus is built at test time from the Python standard library's docstrings (real text, no
download); the expensive fixtures are session-scoped so Ray and DeepSpeed start once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_SILENT", "true")


def write_corpus(path: Path, n_docs: int, start: int = 0) -> list[str]:
    from pipeline.data.demo_corpus import stdlib_docstrings

    texts = []
    for i, (_name, text) in enumerate(stdlib_docstrings()):
        if i < start:
            continue
        if len(texts) == n_docs:
            break
        texts.append(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


def pretrain(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (the way users and launchers do)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd or ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tiny_overrides(tmp: Path, sources: str) -> list[str]:
    """--set arguments for a seconds-long run of the tiny GPT."""
    sets = [
        f"run_dir={tmp / 'run'}", f"data.output_dir={tmp / 'data'}", f"data.sources={sources}",
        "data.tokenizer.vocab_size=1024", "train.seq_len=64", "train.micro_batch_size_per_gpu=4",
        "train.global_batch_size=8", "train.max_steps=6", "train.log_interval_steps=2",
        "checkpoint.save_interval_steps=3", "eval.max_samples=32", "eval.micro_batch_size=4",
    ]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    return path, write_corpus(path, 400)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus) -> dict:
    """prepare + a 2-rank ZeRO-2 training run of 6 steps (checkpoints at 3 and 6), via the CLI."""
    tmp = tmp_path_factory.mktemp("run")
    sets = tiny_overrides(tmp, f"[{{path: '{corpus[0]}'}}]")
    prep = pretrain("prepare", "configs/demo.yaml", *sets)
    train = pretrain("train", "configs/demo.yaml", *sets, "--set", "train.nproc_per_node=2")
    return {"tmp": tmp, "sets": sets, "run_dir": tmp / "run", "data_dir": tmp / "data",
            "prepare_out": prep.stdout + prep.stderr, "train_out": train.stdout + train.stderr}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server on 127.0.0.1 for the whole session: moto's ThreadedMotoServer, an
    emulator of the S3 API (not AWS), spoken to over HTTP by the real clients."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
    from helpers.s3 import moto_server

    with moto_server() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path, request):
    """The server, a fresh bucket for this test, and the standard AWS environment pointing at it
    (child processes inherit it); the node cache is private to the test."""
    import re

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PRETRAIN_CACHE_DIR", str(tmp_path / "node-cache"))
    bucket = re.sub(r"[^a-z0-9-]", "-", f"t-{request.node.name.lower()}")[:50].strip("-") + f"-{os.getpid() % 1000}"
    s3_server.make_bucket(bucket)
    s3_server.bucket = bucket
    return s3_server
