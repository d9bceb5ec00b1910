"""The local executor and the Ray executor make byte-identical datasets.

test_prepare.py's planted corpus (four sources in four formats, bad records, quality filters, exact
and near duplicates across sources) is prepared on Ray and locally (forked processes with small
blocks, and in the driver alone); every output file must be the same, byte for byte.
"""

from __future__ import annotations

import json

import pytest

from conftest import pretrain, write_corpus
from pipeline.config import DataConfig
from pipeline.data.prepare import FILTERED, prepare
from test_prepare import _args, _build, _file_hashes  # the planted corpus (same folder)

pytestmark = pytest.mark.e2e

NO_RAY = {"RAY_ADDRESS": ""}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("executors")
    _, sources = _build(root / "corpus")
    out, logs = {}, {}
    for name, extra in (("ray", ["data.executor=ray", "data.num_cpus=2"]),
                        ("local", ["data.num_cpus=2", "data.block_bytes=4096"]),  # auto: local
                        ("local-one-process", ["data.executor=local", "data.num_cpus=1"])):
        out[name] = root / name
        logs[name] = pretrain(*_args(out[name], sources, *extra), env=NO_RAY).stdout
    return {"out": out, "logs": logs, "sources": sources}


def test_auto_runs_the_small_corpus_locally_and_says_why(runs):
    logs = runs["logs"]
    assert "prepare: local executor, 2 processes (the input is" in logs["local"]
    assert "no Ray address is given" in logs["local"]
    assert "prepare: local executor, 1 process (data.executor is local)" in logs["local-one-process"]
    assert "prepare: ray executor" in logs["ray"]
    for name, out in runs["out"].items():
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["executor"]["name"] == name.split("-")[0]
        assert ("ray_start" in manifest["throughput"]["stage_seconds"]) == (name == "ray")


def test_local_and_ray_outputs_are_byte_identical(runs):
    out = runs["out"]
    manifests = {name: json.loads((path / "manifest.json").read_text()) for name, path in out.items()}
    ray_files = _file_hashes(out["ray"])
    assert {"quarantine.jsonl", "duplicates.jsonl", "tokenizer.json"} <= set(ray_files)
    assert any(name.endswith(".bin") for name in ray_files)
    assert manifests["ray"]["accounting"]["deduplicated"] == 7 and manifests["ray"]["quarantine"]["records"] == 12
    for name in ("local", "local-one-process"):
        assert _file_hashes(out[name]) == ray_files, name
        assert manifests[name]["files"] == manifests["ray"]["files"], name
        assert (out[name] / FILTERED).read_bytes() == (out["ray"] / FILTERED).read_bytes(), name
        for key in ("splits", "sources", "accounting", "quarantine", "dedup", "tokenizer", "fingerprint"):
            assert manifests[name][key] == manifests["ray"][key], (name, key)


def test_the_executor_does_not_enter_the_fingerprint(runs):
    out, sources = runs["out"]["ray"], runs["sources"]
    log = pretrain(*_args(out, sources, "data.executor=local"), env=NO_RAY).stdout
    assert "up to date" in log


def test_local_tokenizer_training_stops_at_the_sample_and_output_is_complete(tmp_path):
    write_corpus(tmp_path / "docs.jsonl", 150)
    cfg = DataConfig(sources=[{"path": str(tmp_path / "docs.jsonl")}], output_dir=str(tmp_path / "data"),
                     executor="local", num_cpus=2, block_bytes=4096, validation_fraction=0.1,
                     tokenizer={"vocab_size": 512, "train_sample_docs": 20}, dedup={"exact": True})
    lines = []
    manifest = prepare(cfg, log=lines.append)
    assert manifest["executor"]["name"] == "local"
    assert manifest["accounting"]["documents_in"] == 150
    assert manifest["accounting"]["kept"] + manifest["accounting"]["deduplicated"] == 150
    assert any(line.startswith("tokenizer: trained bpe") for line in lines)
    assert not (tmp_path / "data" / ".dedup-spill").exists()
