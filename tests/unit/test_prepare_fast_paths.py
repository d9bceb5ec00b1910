"""The fast paths of `pretrain prepare`'s local executor give the bytes of the plain path.

- raw jsonl blocks (the driver reads bytes, the workers parse) hold exactly the records
  `sources.read_jsonl` reads, whatever the block size: CR/CRLF/lone-CR lines, blank lines, a BOM, bad
  records, a line longer than a block, a truncated .gz;
- flat token buffers (one array per block) hold the ids of the per-record arrays, on both encoders
  and on the huge-document path;
- `RollingShardWriter.add_documents` cuts shards where `add_document` one at a time does;
- a whole `prepare` on text with NFC and NFD forms, combining marks and very long documents writes
  the shards a plain reference writes (always `unicodedata.normalize`, `tokenizers` one document at a
  time, one `add_document` per document), for 1 and 2 processes and several block sizes;
- the fast-encoder check runs once per tokenizer; the prepare path imports nothing heavy.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from pipeline.config import DataConfig, TokenizerConfig
from pipeline.data import fast_tokenizer, prepare as prepare_mod, workers
from pipeline.data.fast_tokenizer import Encoder, hf_tokenizer
from pipeline.data.raw_blocks import jsonl_blocks
from pipeline.data.shards import IndexedShard, RollingShardWriter, ShardWriter
from pipeline.data.sources import SourceFile
from pipeline.data.tokenizer import train_tokenizer

pytestmark = pytest.mark.unit

NFD_CAFE = unicodedata.normalize("NFD", "café crème brûlée")
TEXTS = [
    "plain ascii text, already NFC. " * 20,
    NFD_CAFE * 30,  # decomposed: NFC changes it
    "café crème brûlée, composed " * 30,
    "e\u0301\u0302\u0323 stacked combining marks q\u0307\u0323 " * 40,  # marks NFC reorders
    "Ǆ ﬁ Ⅻ ① compatibility forms NFC keeps " * 25,
    "한국어 \u1100\u1161\u11a8 conjoining jamo " * 30,  # NFC composes the jamo
    ("a very long document with words and numbers 12345 " * 4000),  # ~200K characters
    "emoji 👩‍👩‍👧‍👦 👍🏽 and <|endoftext|> as text " * 20,
]


def _lines(texts) -> list[bytes]:
    return [json.dumps({"text": t}).encode() + b"\n" for t in texts]


# ---- raw blocks ------------------------------------------------------------------------------------

ODD = [
    b'\xef\xbb\xbf{"text": "a BOM on line 1"}\n',
    b'{"text": "crlf line"}\r\n',
    b"\n", b"   \n",  # blank lines still count
    b'{"text": "lone cr"}\r{"text": "after a lone CR"}\n',
    b"{not json}\n", b"[1, 2]\n", b'{"body": "missing field"}\n', b'{"text": 5}\n',
    b'{"text": "\\ud800 lone surrogate"}\n', b'{"text": "bad utf8 \xff\xfe"}\n', b'{"text": "   "}\n',
    b'{"text": "' + b"long " * 3000 + b'"}\n',  # longer than a block
    b'{"text": "last line without a newline"}',
]


def _columns_of_all(blocks) -> dict:
    cols = [workers.as_columns(b) for b in blocks]
    return {k: [x for c in cols for x in list(c[k])] for k in ("doc_id", "text", "reason", "raw")}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("block_bytes", [16, 1000, 1 << 20])
def test_raw_blocks_hold_the_records_read_jsonl_reads(tmp_path, suffix, block_bytes):
    path = tmp_path / f"odd{suffix}"
    data = b"".join(ODD * 3)
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    sf = SourceFile(2, 5, str(path), "jsonl")
    want = _columns_of_all(workers.file_blocks(sf, "text", "file", 1 << 20))
    got = _columns_of_all(jsonl_blocks(sf, "text", block_bytes, lambda r: workers._columns(r, sf)))
    assert got == want
    assert want["text"].count("after a lone CR") == 3  # a lone CR ends a line
    assert sum(r.startswith("malformed_json") for r in want["reason"]) >= 3


def test_a_block_holds_at_most_4096_lines(tmp_path, monkeypatch):
    from pipeline.data import raw_blocks

    monkeypatch.setattr(raw_blocks, "MAX_LINES", 5)
    path = tmp_path / "tiny.jsonl"
    path.write_bytes(b"".join(_lines([f"doc {i}" for i in range(23)])) + b"\n\n" + b'{"text": "last"}')
    sf = SourceFile(0, 0, str(path), "jsonl")
    blocks = list(jsonl_blocks(sf, "text", 1 << 20, None))
    assert [b["jsonl_bytes"].count(b"\n") for b in blocks] == [5, 5, 5, 5, 5, 0]
    assert _columns_of_all(blocks) == _columns_of_all(workers.file_blocks(sf, "text", "file", 1 << 20))


@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_a_truncated_gzip_gives_the_records_and_the_reason_read_jsonl_gives(tmp_path, block_bytes):
    whole = gzip.compress(b"".join(_lines(TEXTS * 20)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    sf = SourceFile(0, 0, str(path), "jsonl")
    want = _columns_of_all(workers.file_blocks(sf, "text", "file", 1 << 20))
    got = _columns_of_all(workers.local_blocks(sf, "text", "file", block_bytes))
    assert got == want
    assert want["reason"][-1].startswith("unreadable_file: truncated")


# ---- flat token buffers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(TEXTS * 3, TokenizerConfig(vocab_size=600))


@pytest.mark.parametrize("kind", ["tiktoken", "tokenizers"])
@pytest.mark.parametrize("huge_chars", [1 << 22, 100])  # 100: every long text takes the numpy path
def test_flat_tokens_are_the_per_record_ids_end_to_end(bpe, kind, huge_chars, monkeypatch):
    monkeypatch.setattr(fast_tokenizer, "_HUGE_CHARS", huge_chars)
    enc = Encoder(bpe.to_str(), kind)
    flat, lengths = enc.encode_flat(TEXTS, 7, np.uint16)
    per_doc = [fast_tokenizer.ids_array(ids, 7, np.uint16) for ids in enc.encode(TEXTS)]
    assert flat.dtype == np.uint16 and lengths.tolist() == [len(x) for x in per_doc]
    np.testing.assert_array_equal(flat, np.concatenate(per_doc))
    reference = [hf_tokenizer(bpe.to_str()).encode(t, add_special_tokens=False).ids + [7] for t in TEXTS]
    assert [x.tolist() for x in per_doc] == reference


def test_a_flat_batch_and_a_per_record_batch_agree(bpe):
    cols = {"doc_id": np.arange(len(TEXTS) + 2), "text": TEXTS + ["", "x"], "reason": [""] * len(TEXTS) +
            ["empty_text", ""], "raw": [""] * (len(TEXTS) + 2)}
    args = dict(clean={"normalization": "NFC"}, removed_ref=np.array([len(TEXTS) + 1]), filtered_ref=None,
                tokenizer_ref=bpe.to_str(), kind="tiktoken", eod_id=3, dtype="<u2")
    rows, flat = workers.encode_batch(cols, **args), workers.encode_batch(cols, **args, flat=True)
    kept = [i for i in range(len(TEXTS) + 2) if len(rows["ids"][i])]
    assert kept == list(range(len(TEXTS)))  # the empty record is quarantined, the last a duplicate
    assert flat["length"].tolist() == [len(x) for x in rows["ids"]]
    np.testing.assert_array_equal(flat["tokens"], np.concatenate(list(rows["ids"])))


# ---- shards ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [0, 1, 7, 50, 10**9])
def test_add_documents_cuts_shards_where_add_document_does(tmp_path, max_tokens):
    rng = np.random.default_rng(max_tokens)
    lengths = rng.integers(1, 20, size=120)
    tokens = rng.integers(0, 60000, size=int(lengths.sum())).astype(np.uint16)
    one = RollingShardWriter(tmp_path / "one", "train", "s", np.uint16, max_tokens)
    bulk = RollingShardWriter(tmp_path / "bulk", "train", "s", np.uint16, max_tokens)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for i in range(len(lengths)):
        one.add_document(tokens[offsets[i]:offsets[i + 1]])
    for a, b in [(0, 3), (3, 4), (4, 60), (60, 120)]:  # runs of several sizes
        bulk.add_documents(tokens[offsets[a]:offsets[b]], lengths[a:b])
    one.close()
    bulk.close()
    assert one.shards == bulk.shards and (one.documents, one.num_tokens) == (bulk.documents, bulk.num_tokens)
    for f in one.files():
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "bulk" / f).read_bytes(), f


# ---- a whole prepare against the plain path --------------------------------------------------------

def _plain_shards(tmp_path, tokenizer, texts, cfg: DataConfig) -> dict[str, bytes]:
    """What prepare must write, built the slow, obvious way."""
    hf, eod = hf_tokenizer(tokenizer.to_str()), tokenizer.token_to_id("<|endoftext|>")
    every = max(2, round(1 / cfg.validation_fraction))
    out = tmp_path / "plain"
    out.mkdir()
    writers = {s: ShardWriter(out / f"{s}.x", np.uint16) for s in ("train", "validation")}
    for k, text in enumerate(texts):
        ids = hf.encode(unicodedata.normalize("NFC", text), add_special_tokens=False).ids + [eod]
        writers["validation" if k % every == every - 1 else "train"].add_document(ids)
    for w in writers.values():
        w.close()
    return {f"{s}.{e}": (out / f"{s}.x.{e}").read_bytes() for s in writers for e in ("bin", "idx")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bpe):
    root = tmp_path_factory.mktemp("fast-paths")
    texts = [t for _ in range(6) for t in TEXTS]
    (root / "docs.jsonl").write_bytes(b"".join(_lines(texts)))
    bpe.save(str(root / "tokenizer.json"))
    return root, texts


@pytest.mark.parametrize(("num_cpus", "block_bytes"), [(1, 1 << 20), (1, 4096), (2, 4096), (2, 20_000), (2, 1 << 20)])
def test_prepare_writes_the_plain_paths_shards(corpus, bpe, tmp_path, num_cpus, block_bytes):
    root, texts = corpus
    cfg = DataConfig(sources=[{"path": str(root / "docs.jsonl"), "name": "docs"}], output_dir=str(tmp_path / "out"),
                     tokenizer={"path": str(root / "tokenizer.json")}, executor="local", num_cpus=num_cpus,
                     block_bytes=block_bytes, validation_fraction=0.2)
    manifest = prepare_mod.prepare(cfg, log=lambda *_: None)
    assert manifest.tokenizer.encoder == "tiktoken"
    plain = _plain_shards(tmp_path, bpe, texts, cfg)
    for split in ("train", "validation"):
        for ext in ("bin", "idx"):
            got = (tmp_path / "out" / split / f"docs-00000.{ext}").read_bytes()
            assert got == plain[f"{split}.{ext}"], (split, ext)
    assert IndexedShard(tmp_path / "out" / "train" / "docs-00000").num_tokens == manifest.splits["train"].tokens


def test_the_encoder_check_runs_once_per_tokenizer(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    calls = []
    real = prepare_mod.choose_encoder
    monkeypatch.setattr(prepare_mod, "choose_encoder", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = DataConfig(sources=[{"path": str(root / "docs.jsonl")}], output_dir=str(tmp_path / "out"),
                     tokenizer={"path": str(root / "tokenizer.json")}, executor="local", num_cpus=1)
    first = prepare_mod.prepare(cfg, log=lambda *_: None)
    second = prepare_mod.prepare(cfg, log=lambda *_: None, force=True)
    assert len(calls) == 1
    assert (second.tokenizer.encoder, second.tokenizer.encoder_note) == (first.tokenizer.encoder,
                                                                          first.tokenizer.encoder_note)
    assert second.files == first.files
    other = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=300))
    other.save(str(tmp_path / "other.json"))
    prepare_mod.prepare(cfg.model_copy(update={"tokenizer": TokenizerConfig(path=str(tmp_path / "other.json"))}),
                        log=lambda *_: None, force=True)
    assert len(calls) == 2  # another tokenizer is checked again


def test_the_prepare_command_imports_nothing_heavy(corpus, tmp_path):
    root, _ = corpus
    config = tmp_path / "data.yaml"
    config.write_text(json.dumps({"data": {"sources": [{"path": str(root / "docs.jsonl")}],
                                           "output_dir": str(tmp_path / "out"),
                                           "tokenizer": {"path": str(root / "tokenizer.json")}}}))
    code = ("import sys\nfrom pipeline import cli\nrc = cli.main(['prepare', sys.argv[1]])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'ray', 'deepspeed', 'datasets', 'wandb', 'pandas')"
            " if m in sys.modules)\nprint('HEAVY', heavy)\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
