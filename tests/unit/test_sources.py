import gzip
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import ConfigError, SourceConfig
from pipeline.data.sources import (
    MAX_FILES, MAX_POSITION, MAX_SOURCES, detect_format, doc_ids, list_source_files, read_file, read_jsonl,
    read_parquet, read_text, split_doc_id, split_doc_ids,
)

pytestmark = pytest.mark.unit


def test_every_bad_record_has_a_reason_and_position(tmp_path):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "broken',
        b"\xff\xfe not utf8",
        json.dumps([1, 2]).encode(),
        json.dumps({"body": "x"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        "\ufeff".encode() + json.dumps({"text": "bom and \u0000 nul"}).encode(),
        b'{"text": "lone \\ud800 surrogate"}',
    ]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    records = list(read_jsonl(path, source=3, text_field="text"))
    assert [r.line for r in records] == list(range(1, 10))
    assert [(r.reason or "ok").split(":")[0] for r in records] == [
        "ok", "malformed_json", "invalid_utf8", "not_an_object", "missing_field", "not_a_string",
        "empty_text", "ok", "invalid_unicode",
    ]
    assert records[7].text == "bom and  nul"  # BOM stripped, NUL removed
    assert records[0].text == "good one" and records[0].source == 3
    assert all(r.raw for r in records if r.reason)


def _jsonl_bytes(texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def test_gzip_and_zstd_read_like_plain_jsonl(tmp_path):
    import zstandard

    data = _jsonl_bytes(["one", "two", "three"]) + b"not json\n"
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    plain = list(read_jsonl(tmp_path / "a.jsonl", 0, "text"))
    assert list(read_jsonl(tmp_path / "a.jsonl.gz", 0, "text")) == plain
    assert list(read_jsonl(tmp_path / "a.jsonl.zst", 0, "text")) == plain
    assert [r.text for r in plain[:3]] == ["one", "two", "three"] and plain[3].reason.startswith("malformed_json")


def test_truncated_gzip_keeps_what_was_read_and_quarantines_the_rest(tmp_path):
    data = gzip.compress(_jsonl_bytes([f"document {i} " * 50 for i in range(200)]))
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    records = list(read_jsonl(path, 0, "text"))
    assert records[-1].reason.startswith("unreadable_file")
    assert all(r.text == f"document {r.line - 1} " * 50 for r in records[:-1]) and len(records) > 2


def test_parquet_rows_with_wrong_types_are_quarantined_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a doc", None, "", "another"], "n": [1, 2, 3, 4]}), tmp_path / "a.parquet")
    records = list(read_parquet(tmp_path / "a.parquet", 1, "body", file=2))
    assert [(r.line, r.text, (r.reason or "").split(":")[0]) for r in records] == [
        (0, "a doc", ""), (1, None, "not_a_string"), (2, None, "empty_text"), (3, "another", "")]
    assert {r.file for r in records} == {2}
    missing = list(read_parquet(tmp_path / "a.parquet", 1, "text"))
    assert len(missing) == 1 and missing[0].reason.startswith("missing_field") and "4 rows" in missing[0].reason
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert list(read_parquet(tmp_path / "bad.parquet", 0, "text"))[0].reason.startswith("unreadable_file")


def test_text_files_are_one_document_or_one_per_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"First para\nline two\n\n\n  \nSecond\r\n\nThird \xff bad\n\nFourth")
    whole = list(read_text(path, 0, "file"))
    assert len(whole) == 1 and whole[0].line == 0 and whole[0].reason.startswith("invalid_utf8")
    paras = list(read_text(path, 0, "paragraph"))
    assert [r.line for r in paras] == [1, 2, 3, 4]
    assert [r.text for r in paras] == ["First para\nline two", "Second", None, "Fourth"]
    assert paras[2].reason.startswith("invalid_utf8")


def test_saved_hf_datasets_and_dataset_dicts_are_read_by_row(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": ["x one", "x two", 3 * " "]}).save_to_disk(str(tmp_path / "ds"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["t0", "t1"]}),
                               "extra": datasets.Dataset.from_dict({"content": ["e0"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    files = list_source_files(SourceConfig(path=str(tmp_path / "ds"), text_field="content"), 0)
    assert [f.format for f in files] == ["hf"]
    records = list(read_file(files[0], "content"))
    assert [(r.line, r.text) for r in records[:2]] == [(0, "x one"), (1, "x two")] and records[2].reason == "empty_text"
    files = list_source_files(SourceConfig(path=str(tmp_path / "dd"), text_field="content"), 4)
    assert [(f.part, f.index, f.source) for f in files] == [("extra", 0, 4), ("train", 1, 4)]
    assert [r.text for f in files for r in read_file(f, "content")] == ["e0", "t0", "t1"]


def test_directories_are_read_in_sorted_order_with_formats_from_suffixes(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(["gz"])))
    (tmp_path / "a.txt").write_text("text file")
    (tmp_path / "c.parquet").write_bytes(b"")
    (tmp_path / ".hidden.jsonl").write_text("ignored")
    files = list_source_files(SourceConfig(path=str(tmp_path)), 2)
    assert [(f.path.rsplit("/", 1)[1], f.format, f.index) for f in files] == [
        ("a.txt", "text", 0), ("z.jsonl.gz", "jsonl", 1), ("c.parquet", "parquet", 2)]
    forced = list_source_files(SourceConfig(path=str(tmp_path), format="text"), 0)
    assert {f.format for f in forced} == {"text"}


@pytest.mark.parametrize(("name", "fmt"), [
    ("a.jsonl", "jsonl"), ("a.JSON", "jsonl"), ("a.ndjson.zst", "jsonl"), ("a.jsonl.gz", "jsonl"),
    ("x.parquet", "parquet"), ("notes.txt", "text"), ("README", "text"), ("t.md.gz", "text")])
def test_format_is_detected_from_the_suffix(name, fmt):
    assert detect_format(name) == fmt


def test_missing_path_or_wrong_format_is_a_config_error_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources.3.path: no such file"):
        list_source_files(SourceConfig(path=str(tmp_path / "nope.jsonl")), 3)
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match=r"data.sources.0.path: .* not a dataset saved"):
        list_source_files(SourceConfig(path=str(tmp_path / "d"), format="hf"), 0)
    with pytest.raises(ConfigError, match="holds no files"):
        list_source_files(SourceConfig(path=str(tmp_path / "d")), 0)


@given(st.lists(st.tuples(st.integers(0, MAX_SOURCES - 1), st.integers(0, MAX_FILES - 1),
                          st.integers(0, MAX_POSITION)), min_size=1, max_size=50))
def test_doc_ids_round_trip_and_sort_in_corpus_order(triples):
    ids = np.array([doc_ids(s, f, [p])[0] for s, f, p in triples])
    assert (ids >= 0).all()
    assert [split_doc_id(i) for i in ids] == triples
    assert list(zip(*(a.tolist() for a in split_doc_ids(ids)))) == triples
    assert sorted(triples) == [triples[i] for i in np.argsort(ids, kind="stable")]
