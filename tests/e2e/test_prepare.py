"""`pretrain prepare` end to end on generated corpora with planted garbage and duplicates.

Four sources in four formats; every record's fate (kept, quarantined with a reason, or a duplicate
of a named first occurrence) is planted, and the outputs are checked against it: decoded shards,
quarantine.jsonl, duplicates.jsonl and the manifest's accounting. These runs use the Ray executor
(1 and 2 Ray workers); test_prepare_executors.py checks the local executor against it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from conftest import pretrain
from pipeline.data.shards import IndexedShard

pytestmark = pytest.mark.e2e

_rng = random.Random(1234)
WORDS = ["".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(2, 9))) for _ in range(4000)]


class Planted:
    """A generated corpus and what prepare must make of it."""

    def __init__(self, root: Path):
        self.root, self.rng = root, random.Random(7)
        self.kept: dict[str, Counter] = {}
        self.reasons: Counter = Counter()
        self.quarantined: set[tuple] = set()  # (source path, position key, position)
        self.duplicates: dict[tuple, tuple] = {}  # (source, file, pos) -> (source, file, pos, kind)
        self.records: Counter = Counter()
        self.originals: dict[str, tuple] = {}

    def doc(self, words: int = 200) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(words))

    def keep(self, source: str, text: str, where: tuple) -> str:
        self.kept.setdefault(source, Counter())[unicodedata.normalize("NFC", text)] += 1
        self.originals.setdefault(unicodedata.normalize("NFC", text), where)
        self.records[source] += 1
        return text

    def bad(self, source: str, path: str, unit: str | None, pos: int, reason: str) -> None:
        self.reasons[reason] += 1
        self.records[source] += 1
        self.quarantined.add((path, unit, pos))

    def dup(self, source: str, where: tuple, of_text: str, kind: str) -> None:
        self.records[source] += 1
        self.duplicates[where] = (*self.originals[unicodedata.normalize("NFC", of_text)], kind)

    @staticmethod
    def near(text: str) -> str:
        words = text.split()
        words[len(words) // 2] = "changedword"
        return " ".join(words)


def _build(root: Path) -> tuple[Planted, list[dict]]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    p = Planted(root)
    # web: jsonl.gz — good, garbage, filtered, BOM, NUL, exact/NFD/near duplicates
    web = str(root / "web.jsonl.gz")
    lines: list[bytes] = []

    def line(raw: bytes):
        lines.append(raw)
        return len(lines)

    good = [p.doc() for _ in range(40)]
    cafe = "un café noir " + p.doc()
    for t in good + [cafe]:
        p.keep("web", t, ("web", "web.jsonl.gz", line(json.dumps({"text": t}).encode())))
    line(b"")  # blank lines are not records
    for raw, reason in [(b'{"text": ', "malformed_json"), (b'\xff\xfe{"text": "x"}', "invalid_utf8"),
                        (b"[1, 2]", "not_an_object"), (b'{"body": "x"}', "missing_field"),
                        (b'{"text": 7}', "not_a_string"), (b'{"text": "  "}', "empty_text"),
                        (b'{"text": "lone \\ud800 surrogate"}', "invalid_unicode"),
                        (json.dumps({"text": "two words"}).encode(), "filter:min_words"),
                        (json.dumps({"text": "same line here\n" * 6 + "one other line"}).encode(),
                         "filter:max_repeated_line_ratio")]:
        p.bad("web", web, "line", line(raw), reason)
    bom = p.doc()
    p.keep("web", bom, ("web", "web.jsonl.gz", line("\ufeff".encode() + json.dumps({"text": bom}).encode())))
    nul = p.doc()
    n = line(json.dumps({"text": nul[:50] + "\u0000" + nul[50:]}).encode())
    p.keep("web", nul, ("web", "web.jsonl.gz", n))
    p.dup("web", ("web", "web.jsonl.gz", line(json.dumps({"text": good[3]}).encode())), good[3], "exact")
    nfd = unicodedata.normalize("NFD", cafe)
    p.dup("web", ("web", "web.jsonl.gz", line(json.dumps({"text": nfd}).encode())), cafe, "exact")
    p.dup("web", ("web", "web.jsonl.gz", line(json.dumps({"text": p.near(good[5])}).encode())), good[5], "near")
    (root / "web.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))

    # books: parquet, text in "body" — a null row, cross-source exact and near duplicates
    books = [p.doc() for _ in range(30)]
    rows = list(books) + [None, good[7], p.near(good[9])]
    for i, t in enumerate(books):
        p.keep("books", t, ("books", "books.parquet", i))
    p.bad("books", str(root / "books.parquet"), "row", 30, "not_a_string")
    p.dup("books", ("books", "books.parquet", 31), good[7], "exact")
    p.dup("books", ("books", "books.parquet", 32), good[9], "near")
    pq.write_table(pa.table({"body": rows}), root / "books.parquet")

    # notes: a directory of text files, one document per paragraph
    (root / "notes").mkdir()
    a = [p.doc() for _ in range(10)]
    (root / "notes" / "a.txt").write_bytes("\n\n".join(a).encode() + b"\n\n\n\xc3\x28 broken paragraph\n")
    for i, t in enumerate(a, start=1):
        p.keep("notes", t, ("notes", "a.txt", i))
    p.bad("notes", str(root / "notes"), "paragraph", 11, "invalid_utf8")
    b = [p.doc() for _ in range(10)]
    (root / "notes" / "b.txt").write_text("\n\n".join(b + [books[2]]) + "\n")
    for i, t in enumerate(b, start=1):
        p.keep("notes", t, ("notes", "b.txt", i))
    p.dup("notes", ("notes", "b.txt", 11), books[2], "exact")

    # hub: a dataset saved with datasets.save_to_disk
    hub = [p.doc() for _ in range(15)]
    for i, t in enumerate(hub):
        p.keep("hub", t, ("hub", "hub", i))
    datasets.Dataset.from_dict({"text": hub + [hub[0], ""]}).save_to_disk(str(root / "hub"))
    p.dup("hub", ("hub", "hub", 15), hub[0], "exact")
    p.bad("hub", str(root / "hub"), "row", 16, "empty_text")

    sources = [{"path": web, "name": "web"},
               {"path": str(root / "books.parquet"), "name": "books", "text_field": "body"},
               {"path": str(root / "notes"), "name": "notes", "text_unit": "paragraph"},
               {"path": str(root / "hub"), "name": "hub"}]
    return p, sources


def _args(out: Path, sources: list[dict], *extra: str) -> list[str]:
    sets = [f"data.output_dir={out}", f"data.sources={json.dumps(sources)}", "data.tokenizer.vocab_size=1024",
            "data.dedup.exact=true", "data.dedup.near=true", "data.clean.min_words=5",
            "data.clean.max_repeated_line_ratio=0.5", "data.validation_fraction=0.1", *extra]
    return ["prepare", "configs/demo.yaml", *[a for s in sets for a in ("--set", s)]]


def _decoded(out: Path, manifest: dict) -> dict[str, Counter]:
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eod = manifest["tokenizer"]["special_ids"]["eod"]
    got: dict[str, Counter] = {}
    for split in ("train", "validation"):
        for name, info in manifest["splits"][split]["sources"].items():
            for prefix in info["shards"]:
                shard = IndexedShard(out / prefix)
                docs = [shard[i].tolist() for i in range(len(shard))]
                assert all(d[-1] == eod and eod not in d[:-1] for d in docs)
                got.setdefault(name, Counter()).update(tok.decode_batch([d[:-1] for d in docs]))
    return got


def _file_hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and ".stages" not in p.parts and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    corpus, sources = _build(root / "corpus")
    out = root / "two-cpus"
    proc = pretrain(*_args(out, sources, "data.executor=ray", "data.num_cpus=2"))
    return {"corpus": corpus, "sources": sources, "out": out, "log": proc.stdout, "root": root,
            "manifest": json.loads((out / "manifest.json").read_text())}


def test_every_document_is_kept_quarantined_or_deduplicated(planted):
    corpus, m, out = planted["corpus"], planted["manifest"], planted["out"]
    acc = m["accounting"]
    assert acc["documents_in"] == acc["kept"] + acc["quarantined"] + acc["deduplicated"] == sum(corpus.records.values())
    assert {s["name"]: s["records"] for s in m["sources"]} == dict(corpus.records)
    assert _decoded(out, m) == corpus.kept  # every kept document, byte for byte (after NFC)
    assert "documents" in planted["log"] and "quarantined by reason" in planted["log"]  # the final table


def test_bad_records_are_quarantined_with_reason_and_position(planted):
    corpus, m, out = planted["corpus"], planted["manifest"], planted["out"]
    rows = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert Counter(r["reason"].split(": ")[0] for r in rows) == corpus.reasons == Counter(m["quarantine"]["by_reason"])
    found = set()
    for r in rows:
        unit = next(k for k in ("line", "row", "paragraph") if k in r)
        assert r["excerpt"] or r["reason"] == "empty_text"
        found.add((r["source"], unit, r[unit]))
    assert found == corpus.quarantined


def test_planted_duplicates_are_removed_and_point_to_the_first_occurrence(planted):
    corpus, m, out = planted["corpus"], planted["manifest"], planted["out"]

    def key(row):
        pos = next(row[k] for k in ("line", "row", "paragraph") if k in row)
        return row["source_name"], Path(row["file"]).name, pos

    rows = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    got = {key(r): (*key(r["duplicate_of"]), r["kind"]) for r in rows}
    assert got == corpus.duplicates  # no distinct document removed, no planted duplicate kept
    assert m["dedup"]["exact"] == 5 and m["dedup"]["near"] == 2
    assert {s["name"]: s["duplicates"] for s in m["sources"]} == {"web": 3, "books": 2, "notes": 1, "hub": 1}


def test_output_is_byte_identical_with_one_worker_and_small_blocks(planted):
    out = planted["root"] / "one-cpu"
    pretrain(*_args(out, planted["sources"], "data.executor=ray", "data.num_cpus=1", "data.block_bytes=4096"))
    one = json.loads((out / "manifest.json").read_text())
    assert one["files"] == planted["manifest"]["files"]
    assert _file_hashes(out) == _file_hashes(planted["out"])


def test_reruns_skip_unchanged_stages_and_resume_after_an_interruption(planted):
    out, sources = planted["out"], planted["sources"]
    before = (out / "manifest.json").stat().st_mtime_ns
    assert "up to date" in pretrain(*_args(out, sources, "data.num_cpus=2")).stdout
    assert (out / "manifest.json").stat().st_mtime_ns == before

    copy = planted["root"] / "copy"
    shutil.copytree(out, copy)
    log = pretrain(*_args(copy, sources, "data.validation_fraction=0.2")).stdout
    assert "dedup: reused" in log and "tokenizer: reused" in log
    changed = json.loads((copy / "manifest.json").read_text())
    assert changed["files"]["tokenizer.json"] == planted["manifest"]["files"]["tokenizer.json"]
    assert changed["splits"]["validation"]["documents"] > planted["manifest"]["splits"]["validation"]["documents"]
    finished = _file_hashes(copy)

    (copy / "manifest.json").unlink()  # as if killed while writing shards
    shutil.rmtree(copy / "validation")
    log = pretrain(*_args(copy, sources, "data.validation_fraction=0.2")).stdout
    assert "dedup: reused" in log and "tokenizer: reused" in log
    assert _file_hashes(copy) == finished
