"""`prepare --append`'s own rules, without running prepare: which duplicates an append removes
(`prefer_prior`), how the grown manifest is merged from the dataset's and the staged one (`merge`),
and the quality-filter registry whose order `.stages/dedup-filtered.npy` depends on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import CleanConfig, DataConfig
from pipeline.data import stages
from pipeline.data.append import merge, prefer_prior
from pipeline.data.clean import FILTERS, REGISTRY, filter_reason
from pipeline.data.dedup import Duplicate
from pipeline.data.manifest import (
    Accounting, DedupInfo, InputFile, Manifest, QuarantineInfo, ShardSet, SourceInfo, SplitInfo, TokenizerInfo,
    manifest_sha256, verify_manifest, write_manifest,
)
from pipeline.data.shards import ShardWriter
from pipeline.data.sources import list_source_files
from pipeline.rundir import DatasetDir

pytestmark = pytest.mark.unit


# ---- prefer_prior -------------------------------------------------------------------------------------

def _pairs(dups: list[Duplicate]) -> list[tuple]:
    return [(d.doc_id, d.duplicate_of, d.kind, d.similarity) for d in dups]


def test_without_prior_documents_the_duplicates_are_kept_as_found_in_id_order():
    dups = [Duplicate(9, 2, "near", 0.85), Duplicate(4, 2, "exact", 1.0), Duplicate(7, 6, "exact", 1.0)]
    assert _pairs(prefer_prior(dups, lambda i: False)) == [
        (4, 2, "exact", 1.0), (7, 6, "exact", 1.0), (9, 2, "near", 0.85)]
    assert prefer_prior([], lambda i: True) == []


def test_a_prior_first_occurrence_keeps_its_group_and_is_never_removed():
    dups = [Duplicate(5, 1, "exact", 1.0), Duplicate(8, 1, "near", 0.9)]
    assert _pairs(prefer_prior(dups, {1}.__contains__)) == [(5, 1, "exact", 1.0), (8, 1, "near", 0.9)]


def test_the_smallest_prior_document_anchors_a_group_and_other_prior_members_stay():
    # new 3 came first; prior 20 and 11 are later members: 11 (the smallest prior) stays, 20 stays too
    # (prepared already), and the new documents 3 and 15 are removed as duplicates of 11
    dups = [Duplicate(11, 3, "near", 0.9), Duplicate(15, 3, "exact", 1.0), Duplicate(20, 3, "near", 0.82)]
    out = prefer_prior(dups, {11, 20}.__contains__)
    assert _pairs(out) == [(3, 11, "near", 0.9), (15, 11, "exact", 1.0)]
    assert all(d.doc_id not in (11, 20) for d in out)


def test_a_group_of_prior_documents_only_removes_nothing():
    dups = [Duplicate(4, 2, "exact", 1.0), Duplicate(6, 2, "near", 0.95)]
    assert prefer_prior(dups, {2, 4, 6}.__contains__) == []


def test_groups_are_settled_independently():
    dups = [Duplicate(2, 1, "exact", 1.0),                                   # new only
            Duplicate(30, 10, "exact", 1.0), Duplicate(31, 10, "near", 0.8)]  # prior 30 anchors new 10 and 31
    assert _pairs(prefer_prior(dups, {30}.__contains__)) == [
        (2, 1, "exact", 1.0), (10, 30, "exact", 1.0), (31, 30, "near", 0.8)]


# ---- merge ----------------------------------------------------------------------------------------------

def _shard(root: Path, prefix: str, docs: list[list[int]]) -> None:
    (root / prefix).parent.mkdir(parents=True, exist_ok=True)
    with ShardWriter(root / prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)


def _dataset(root: Path, shards: dict[str, dict[str, list[list[list[int]]]]], sources: list[SourceInfo],
             by_reason: dict[str, int], inputs: list[InputFile], exact: int = 0) -> Manifest:
    """A dataset on disk: shards[split][source] = the documents of each shard; returns its manifest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text("{}")
    (root / "quarantine.jsonl").write_text("".join(f'{{"reason": "{r}"}}\n' for r, n in by_reason.items()
                                                   for _ in range(n)))
    (root / "duplicates.jsonl").write_text('{"doc_id": 1}\n' * exact)
    splits, files = {}, ["tokenizer.json", "quarantine.jsonl", "duplicates.jsonl"]
    for split, by_source in shards.items():
        sets = {}
        for name, docs_per_shard in by_source.items():
            prefixes = [DatasetDir.shard_prefix(split, name, k) for k in range(len(docs_per_shard))]
            for prefix, docs in zip(prefixes, docs_per_shard):
                _shard(root, prefix, docs)
                files += [f"{prefix}.bin", f"{prefix}.idx"]
            flat = [d for docs in docs_per_shard for d in docs]
            sets[name] = ShardSet(documents=len(flat), tokens=sum(map(len, flat)), shards=prefixes)
        splits[split] = SplitInfo(documents=sum(s.documents for s in sets.values()),
                                  tokens=sum(s.tokens for s in sets.values()), sources=sets)
    quarantined = sum(by_reason.values())
    kept = sum(s.kept for s in sources)
    manifest = Manifest(
        fingerprint="fp", tokenizer=TokenizerInfo(file="tokenizer.json", type="bpe", encoder="tiktoken"),
        splits=splits, sources=sources, inputs=inputs,
        accounting=Accounting(documents_in=kept + quarantined + exact, kept=kept, quarantined=quarantined,
                              deduplicated=exact),
        quarantine=QuarantineInfo(records=quarantined, by_reason=by_reason), dedup=DedupInfo(exact=exact), files={})
    return write_manifest(root, manifest, files)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def grown(tmp_path):
    data = DatasetDir(tmp_path / "data")
    old = _dataset(data.root, {"train": {"docs": [[[1, 2, 3], [4, 5]]]}, "validation": {"docs": [[[6, 7]]]}},
                   [SourceInfo(name="docs", files=1, records=5, kept=3, quarantined=1, duplicates=1,
                               duplicates_exact=1, tokens={"train": 5, "validation": 2})],
                   {"filter:min_words": 1}, [InputFile(source="docs", file="a.jsonl", sha256="a" * 64)], exact=1)
    old_sha = manifest_sha256(data.root)
    new_inputs = [InputFile(source="docs", file="b.jsonl", sha256="b" * 64),
                  InputFile(source="extra", file="c.jsonl", sha256="c" * 64)]
    added = _dataset(data.staging.root,
                     {"train": {"docs": [[[8, 9]], [[10, 11, 12]]], "extra": [[[13]]]}, "validation": {"docs": [[]]}},
                     [SourceInfo(name="docs", files=1, records=4, kept=2, quarantined=2, tokens={"train": 5}),
                      SourceInfo(name="extra", files=1, records=1, kept=1, tokens={"train": 1})],
                     {"empty_text": 1, "filter:min_words": 1}, new_inputs)
    staged_files = {name: _sha(data.staging.root / name) for name in added.files}
    m = merge(data, old, old_sha, added, new_inputs, 2.5, "off")
    return {"data": data, "old": old, "old_sha": old_sha, "added": added, "m": m, "staged": staged_files}


def test_merge_sums_counts_and_keeps_the_accounting_identity(grown):
    m, old = grown["m"], grown["old"]
    assert m.splits["train"].documents == 2 + 3 and m.splits["train"].tokens == 5 + 6
    assert m.splits["validation"].documents == 1 and m.splits["validation"].tokens == 2
    docs = m.splits["train"].sources["docs"]
    assert (docs.documents, docs.tokens) == (4, 10)
    assert [(s.name, s.records, s.kept, s.quarantined, s.duplicates, s.files, s.tokens) for s in m.sources] == [
        ("docs", 9, 5, 3, 1, 2, {"train": 10, "validation": 2}), ("extra", 1, 1, 0, 0, 1, {"train": 1})]
    acc = m.accounting
    assert (acc.documents_in, acc.kept, acc.quarantined, acc.deduplicated) == (5 + 5, 3 + 3, 1 + 2, 1)
    assert acc.documents_in == acc.kept + acc.quarantined + acc.deduplicated
    assert m.quarantine.records == 3 and list(m.quarantine.by_reason.items()) == [
        ("empty_text", 1), ("filter:min_words", 2)]
    assert m.dedup.exact == 1 and old.accounting.documents_in == 5  # the old manifest is left as it was


def test_merge_numbers_new_shards_after_the_old_ones_and_moves_them_in(grown):
    m, data = grown["m"], grown["data"]
    assert m.splits["train"].sources["docs"].shards == ["train/docs-00000", "train/docs-00001", "train/docs-00002"]
    assert m.splits["train"].sources["extra"].shards == ["train/extra-00000"]
    assert m.splits["validation"].sources["docs"].shards == ["validation/docs-00000", "validation/docs-00001"]
    for prefix in ("train/docs-00001", "train/docs-00002", "train/extra-00000", "validation/docs-00001"):
        assert (data.root / f"{prefix}.bin").is_file() and (data.root / f"{prefix}.idx").is_file()
    assert not list(data.staging.root.rglob("*.bin"))  # every staged shard moved


def test_merge_carries_every_hash_and_names_the_appended_side_files(grown):
    m, old, data, staged = grown["m"], grown["old"], grown["data"], grown["staged"]
    assert {k: v for k, v in m.files.items() if k in old.files} == old.files
    assert m.files["train/docs-00001.bin"] == staged["train/docs-00000.bin"]
    assert m.files["train/docs-00002.idx"] == staged["train/docs-00001.idx"]
    assert m.files["train/extra-00000.bin"] == staged["train/extra-00000.bin"]
    assert m.files["quarantine-append1.jsonl"] == staged["quarantine.jsonl"]
    assert m.files["duplicates-append1.jsonl"] == staged["duplicates.jsonl"]
    assert all(m.files[name] == _sha(data.root / name) for name in m.files)  # as on disk after the moves
    g = m.appends[-1]
    assert (g.generation, g.quarantine_file, g.duplicates_file) == (1, "quarantine-append1.jsonl",
                                                                    "duplicates-append1.jsonl")
    assert (g.documents_in, g.kept, g.quarantined, g.deduplicated, g.tokens) == (5, 3, 2, 0, {"train": 6,
                                                                                              "validation": 0})
    assert g.inputs == ["b.jsonl", "c.jsonl"] and g.encoder == "tiktoken" and g.seconds == 2.5


def test_merge_extends_lineage_and_inputs_and_the_result_verifies(grown):
    m, data, old_sha = grown["m"], grown["data"], grown["old_sha"]
    assert m.lineage == [old_sha] and m.appends[-1].grew_from_manifest_sha256 == old_sha
    assert [r.file for r in m.inputs] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert m.fingerprint is None  # never "up to date" for a plain rebuild
    written = write_manifest(data.root, m, list(m.files))
    assert verify_manifest(data.root).to_dict() == written.to_dict()
    assert written.grew_from(old_sha, manifest_sha256(data.root))


def test_a_second_append_is_generation_two(grown):
    data, m = grown["data"], grown["m"]
    write_manifest(data.root, m, list(m.files))
    sha = manifest_sha256(data.root)
    inputs = [InputFile(source="docs", file="d.jsonl", sha256="d" * 64)]
    added = _dataset(data.staging.root, {"train": {"docs": [[[20, 21]]]}},
                     [SourceInfo(name="docs", files=1, records=1, kept=1, tokens={"train": 2})], {}, inputs)
    again = merge(data, m, sha, added, inputs, 1.0, "off")
    assert again.lineage == [grown["old_sha"], sha] and again.appends[-1].generation == 2
    assert again.appends[-1].quarantine_file == "quarantine-append2.jsonl"
    assert again.splits["train"].sources["docs"].shards[-1] == "train/docs-00003"
    assert again.splits["train"].tokens == 11 + 2 and "validation" in again.splits


# ---- the quality-filter registry ------------------------------------------------------------------------

def test_the_registry_is_filters_in_order_and_each_field_is_a_clean_config_field():
    assert FILTERS == tuple(REGISTRY) == tuple(f.name for f in REGISTRY.values())
    assert FILTERS[:3] == ("min_chars", "max_chars", "min_words")  # indexes stored in dedup-filtered.npy
    for f in REGISTRY.values():
        assert f.field in CleanConfig.model_fields, f.field
        assert f.reason == f"filter:{f.name}"
    assert set(CleanConfig.model_fields) - {f.field for f in REGISTRY.values()} == {"normalization"}


def test_the_first_registered_failing_filter_wins():
    text = "#\n#"  # fails every limit below
    limits = {"min_chars": 100, "max_chars": 1, "min_words": 10, "max_symbol_word_ratio": 0.1,
              "min_alpha_ratio": 0.5, "max_repeated_line_ratio": 0.1}
    assert set(limits) == set(FILTERS)
    for k, name in enumerate(FILTERS):  # switch off the filters before it: the next registered one wins
        cfg = CleanConfig(**{n: v for n, v in limits.items() if n not in FILTERS[:k]})
        assert filter_reason(text, cfg) == f"filter:{name}"
    assert filter_reason(text, CleanConfig()) is None


def test_a_changed_registry_reruns_the_dedup_stage(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    cfg = DataConfig(sources=[{"path": str(tmp_path / "a.jsonl")}])
    files = list_source_files(cfg.sources[0], 0)
    before = stages.fingerprints(cfg, files)
    monkeypatch.setattr(stages, "FILTERS", tuple(reversed(FILTERS)))
    after = stages.fingerprints(cfg, files)
    assert all(after[k] != before[k] for k in ("dedup", "tokenizer", "shards"))
