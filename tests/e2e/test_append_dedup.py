"""`prepare --append` with dedup on: new copies of documents already in the dataset are removed (never
the old ones, whatever the files' order), duplicates among the new documents too, and the counts add
up over the whole grown dataset. In-process, on the local executor and on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_corpus
from pipeline.config import load_config
from pipeline.data.append import append, prefer_prior
from pipeline.data.dedup import Duplicate
from pipeline.data.prepare import prepare
from pipeline.data.shards import sha256_file

pytestmark = pytest.mark.e2e


def _cfg(tmp: Path, executor: str):
    cfg = load_config("configs/demo.yaml", [
        f"data.output_dir={tmp / 'data'}", f"data.sources=[{{path: '{tmp / 'raw'}', name: docs}}]",
        "data.tokenizer.vocab_size=512", "data.dedup.exact=true", "data.dedup.near=true",
        f"data.executor={executor}", "data.num_cpus=2"])
    return cfg.data


def _jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_append_removes_new_copies_of_old_documents(tmp_path, executor):
    raw, data = tmp_path / "raw", tmp_path / "data"
    raw.mkdir()
    old_texts = write_corpus(raw / "b-old.jsonl", 60)
    cfg = _cfg(tmp_path, executor)
    first = prepare(cfg.model_copy(update={"executor": "local"}), log=lambda *a: None)
    old_files = {p: sha256_file(data / p) for p in json.loads((data / "manifest.json").read_text())["files"]}
    fresh = write_corpus(tmp_path / "fresh.jsonl", 12, start=400)
    # "a-new" sorts before "b-old": its documents get the smaller ids, yet the old ones must win
    _jsonl(raw / "a-new.jsonl", [old_texts[3], fresh[0], old_texts[7] + " ", fresh[1], fresh[1], *fresh[2:]])
    try:
        m = append(cfg, log=lambda *a: None)
    finally:
        if executor == "ray":  # in this process: later tests check that nothing left Ray running
            import ray

            ray.shutdown()

    g = m["appends"][0]
    assert g["documents_in"] == 15 and g["deduplicated"] == 3 and g["kept"] == 12 and g["quarantined"] == 0
    assert "against the dataset's files" in g["dedup_scope"]
    acc = m["accounting"]
    assert acc["documents_in"] == first["accounting"]["documents_in"] + 15
    assert acc["documents_in"] == acc["kept"] + acc["quarantined"] + acc["deduplicated"]
    dups = [json.loads(line) for line in (data / g["duplicates_file"]).read_text().splitlines()]
    assert [(Path(d["file"]).name, d["line"], Path(d["duplicate_of"]["file"]).name) for d in dups] == [
        ("a-new.jsonl", 1, "b-old.jsonl"), ("a-new.jsonl", 3, "b-old.jsonl"), ("a-new.jsonl", 5, "a-new.jsonl")]
    assert [d["duplicate_of"]["line"] for d in dups] == [4, 8, 4]
    assert {p: sha256_file(data / p) for p in old_files if p.endswith((".bin", ".idx"))} == \
        {p: h for p, h in old_files.items() if p.endswith((".bin", ".idx"))}


def test_prefer_prior_reanchors_groups_on_old_documents():
    prior = {10, 30}
    dups = [Duplicate(10, 5, "exact", 1.0), Duplicate(12, 5, "near", 0.9),   # group of new 5: old 10 in it
            Duplicate(30, 20, "near", 0.8),                                     # new 20 first, old 30 later
            Duplicate(8, 7, "exact", 1.0)]                                      # new only: unchanged
    out = prefer_prior(dups, prior.__contains__)
    assert [(d.doc_id, d.duplicate_of, d.kind) for d in out] == [
        (5, 10, "exact"), (8, 7, "exact"), (12, 10, "near"), (20, 30, "near")]
