"""Damaged and misread sources are never silent.

- Every compressed format read (.gz, .zst; jsonl and text) detects a cut or a corrupt byte: the
  records before the damage are kept (exactly the file's first records), and the file ends in one
  ``unreadable_file`` record naming the byte where reading stopped. A small cut .zst is that one
  record, never 0 records and no trace.
- CR-only line endings are lines (jsonl and text paragraphs).
- A source that keeps no document (a wrong ``text_field`` on parquet, a cut file), sends more than
  ``data.max_quarantine_share`` of its records to quarantine, or holds a corrupt compressed file
  (whose records may already be wrong: gzip and zstd check only at the end) fails `pretrain
  prepare` (a real process): exit 1, one line naming the source, its share and top reason, or the
  file; no manifest is written.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from pipeline.data.sources import read_jsonl, read_text
from reliability.data_harness import assert_one_line, dataset_files, prepare_args, run

DOCS = [f"document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(40 + i % 13)) for i in range(300)]


def _compress(kind: str, data: bytes) -> bytes:
    import zstandard

    if kind == "gz":
        return gzip.compress(data, mtime=0)
    if kind == "zst-checksum":  # the zstd command line writes a checksum by default
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    return zstandard.ZstdCompressor().compress(data)


def _jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def _text(docs) -> bytes:
    return "\n\n".join(docs).encode() + b"\n"


KINDS = ["gz", "zst", "zst-checksum"]
CUTS = [0.05, 0.3, 0.5, 0.9, -1]  # share of the file kept; -1: all but the last byte


def _read(path: Path, fmt: str):
    return list(read_jsonl(path, 0, "text") if fmt == "jsonl" else read_text(path, 0, "paragraph"))


def _assert_prefix_then_unreadable(records, fmt: str, size: int) -> None:
    good, last = records[:-1], records[-1]
    assert last.reason and last.reason.startswith("unreadable_file: "), [r.reason for r in records[-3:]]
    assert "byte " in last.reason and f"{size:,}" in last.reason, last.reason
    kept = [r.text for r in good if not r.reason]
    assert kept == DOCS[: len(kept)]  # exactly the first records of the file, none invented or reordered
    assert len(good) - len(kept) <= 1  # at most the one line the cut went through


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cut", CUTS)
def test_a_cut_compressed_file_keeps_what_came_before_and_names_the_byte(tmp_path, fmt, kind, cut):
    data = _compress(kind, _jsonl(DOCS) if fmt == "jsonl" else _text(DOCS))
    n = len(data) - 1 if cut == -1 else int(len(data) * cut)
    path = tmp_path / f"docs.{'jsonl' if fmt == 'jsonl' else 'txt'}.{kind.split('-')[0]}"
    path.write_bytes(data[:n])
    records = _read(path, fmt)
    assert records, "a cut file must never read as 0 records without a trace"
    _assert_prefix_then_unreadable(records, fmt, n)


@pytest.mark.parametrize("kind", ["gz", "zst-checksum"])
@pytest.mark.parametrize("seed", range(4))
def test_a_corrupt_byte_in_a_compressed_file_is_an_unreadable_file(tmp_path, kind, seed):
    data = bytearray(_compress(kind, _jsonl(DOCS)))
    rng = random.Random(seed)
    at = rng.randrange(20, len(data) - 8)  # past the header, before the trailer
    data[at] ^= 1 << rng.randrange(8)
    path = tmp_path / f"docs.jsonl.{kind.split('-')[0]}"
    path.write_bytes(bytes(data))
    records = _read(path, "jsonl")
    bad = [r for r in records if r.reason and r.reason.startswith("unreadable_file")]
    assert len(bad) == 1 and records[-1] is bad[0], [r.reason for r in records[-3:]]
    assert bad[0].reason.startswith("unreadable_file: corrupt") and "byte " in bad[0].reason


def test_a_small_cut_zst_is_one_unreadable_record_not_nothing(tmp_path):
    data = _compress("zst", _jsonl(DOCS[:5]))
    path = tmp_path / "small.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    records = _read(path, "jsonl")
    assert len(records) == 1 and records[0].reason.startswith("unreadable_file: truncated"), records


def test_cr_only_line_endings_are_lines(tmp_path):
    (tmp_path / "cr.jsonl").write_bytes(b"\r".join(json.dumps({"text": d}).encode() for d in DOCS[:5]) + b"\r")
    assert [r.text for r in _read(tmp_path / "cr.jsonl", "jsonl")] == DOCS[:5]
    (tmp_path / "cr.txt").write_bytes(b"one\rstill one\r\rtwo\r\r\rthree")
    assert [r.text for r in _read(tmp_path / "cr.txt", "text")] == ["one\rstill one", "two", "three"]
    mixed = b'{"text": "a"}\r\n{"text": "b"}\r{"text": "c"}\n'
    (tmp_path / "mixed.jsonl").write_bytes(mixed)
    assert [(r.line, r.text) for r in _read(tmp_path / "mixed.jsonl", "jsonl")] == [(1, "a"), (2, "b"), (3, "c")]


# ---- through `pretrain prepare` -------------------------------------------------------------------

def _sets(out: Path, sources: str, *more: str, extra: tuple[str, ...] = ()) -> list[str]:
    return prepare_args(out, sources, "data.dedup.exact=false", "data.dedup.near=false", *more, extra=extra)


def test_prepare_over_a_cut_zst_keeps_the_rest_and_records_the_cut(tmp_path):
    import zstandard

    good = tmp_path / "docs"
    good.mkdir()
    (good / "a.jsonl").write_bytes(_jsonl(DOCS[:250]))
    cut = zstandard.ZstdCompressor().compress(_jsonl(DOCS[250:]))
    (good / "b.jsonl.zst").write_bytes(cut[: len(cut) // 2])
    out = tmp_path / "data"
    done = run(_sets(out, f"[{{path: '{good}', name: docs}}]"))
    assert done.rc == 0, done.err
    rows = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [r["reason"].split(":")[0] for r in rows] == ["unreadable_file"]
    assert rows[0]["file"].endswith("b.jsonl.zst") and f"byte {len(cut) // 2:,}" in rows[0]["reason"]
    assert dataset_files(out)


def test_a_corrupt_gz_fails_prepare_in_one_line_naming_the_file(tmp_path):
    """gzip checks its CRC only at the end: the records decoded before it may be altered already, so
    the source is refused rather than trained on (nothing is committed)."""
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.jsonl").write_bytes(_jsonl(DOCS[:200]))
    data = bytearray(_compress("gz", _jsonl(DOCS[200:])))
    data[len(data) // 2] ^= 0x10
    (src / "b.jsonl.gz").write_bytes(bytes(data))
    out = tmp_path / "data"
    done = run(_sets(out, f"[{{path: '{src}', name: docs}}]"))
    assert_one_line(done, 1, "source 'docs'", "b.jsonl.gz is corrupt", "byte ", "restore the file")
    assert not (out / "manifest.json").exists()


def test_a_wrong_text_field_on_parquet_fails_in_one_line_naming_the_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "docs.jsonl").write_bytes(_jsonl(DOCS))
    pq.write_table(pa.table({"body": DOCS[:50]}), tmp_path / "web.parquet")
    out = tmp_path / "data"
    sources = f"[{{path: '{tmp_path / 'docs.jsonl'}'}}, {{path: '{tmp_path / 'web.parquet'}', name: web}}]"
    done = run(_sets(out, sources))
    assert_one_line(done, 1, "source 'web'", "data.sources.1", "kept 0", "missing_field", "text_field")
    assert not (out / "manifest.json").exists()


def test_a_cut_file_that_is_the_whole_source_fails_in_one_line(tmp_path):
    (tmp_path / "docs.jsonl").write_bytes(_jsonl(DOCS))
    data = _compress("zst", _jsonl(DOCS[:20]))
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 3])
    out = tmp_path / "data"
    done = run(_sets(out, f"[{{path: '{tmp_path / 'docs.jsonl'}'}}, {{path: '{tmp_path / 'cut.jsonl.zst'}'}}]"))
    assert_one_line(done, 1, "source 'cut'", "kept 0", "unreadable_file", "truncated")
    assert not (out / "manifest.json").exists()


def test_a_source_over_the_quarantine_share_fails_unless_the_share_is_raised(tmp_path):
    lines = [json.dumps({"text": d}) if i % 5 < 2 else '{"text": "broken' for i, d in enumerate(DOCS)]
    (tmp_path / "noisy.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "docs.jsonl").write_bytes(_jsonl(DOCS))
    sources = f"[{{path: '{tmp_path / 'docs.jsonl'}'}}, {{path: '{tmp_path / 'noisy.jsonl'}'}}]"
    out = tmp_path / "data"
    done = run(_sets(out, sources))
    assert_one_line(done, 1, "source 'noisy'", "60.0%", "data.max_quarantine_share (0.5)", "malformed_json (180)")
    assert not (out / "manifest.json").exists()
    done = run(_sets(out, sources, "data.max_quarantine_share=0.7"))
    assert done.rc == 0, done.err
    assert json.loads((out / "manifest.json").read_text())["quarantine"]["by_reason"] == {"malformed_json": 180}


def test_an_append_of_a_misread_file_fails_and_leaves_the_dataset_as_it_was(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.jsonl").write_bytes(_jsonl(DOCS))
    out = tmp_path / "data"
    assert run(_sets(out, f"[{{path: '{src}', name: docs}}]")).rc == 0
    before = dataset_files(out)
    pq.write_table(pa.table({"body": DOCS[:30]}), src / "b.parquet")
    done = run(_sets(out, f"[{{path: '{src}', name: docs}}]", extra=("--append",)))
    assert_one_line(done, 1, "source 'docs'", "missing_field")
    assert dataset_files(out) == before
