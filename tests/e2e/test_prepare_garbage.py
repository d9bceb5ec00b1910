"""Garbage in: a fuzzed jsonl corpus (broken JSON, invalid UTF-8, NUL bytes, BOMs, wrong types,
empty documents, one huge document, very many tiny ones) → prepare finishes, every good record is in
the shards (decoded and compared), every bad one is in quarantine with its reason, counts add up."""

from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from conftest import pretrain
from pipeline.config import TokenizerConfig
from pipeline.data.shards import IndexedShard
from pipeline.data.tokenizer import train_tokenizer

pytestmark = pytest.mark.e2e

GOOD = [
    "plain ascii words and more words",
    "naïve café — “curly quotes” ‘single’ … ellipsis",
    "emoji 👩‍👩‍👧‍👦 👍🏽 🇫🇷 ❤️",
    "中文 日本語のテキスト 한국어 العربية עברית",
    "tabs\tand\nnewlines\r\n  runs of   spaces   ",
    "digits 12345 6.02e23 ٣٤٥ ½",
    "special tokens as text <|endoftext|> [SEP] [CLS]",
    "decomposed e\u0301 becomes é after NFC",
    "x",
]
BAD = [  # (raw line, reason code)
    (b'{"text": "unterminated', "malformed_json"), (b'{"text": "a",}', "malformed_json"),
    (b"{'text': 'single quotes'}", "malformed_json"), (b"text", "malformed_json"),
    (b'{"text": "a"} trailing', "malformed_json"), (b"[" * 100_000, "malformed_json"),
    (b'{"text": "a"}\x00', "malformed_json"), (b'{"text": "raw \x00 NUL in a string"}', "malformed_json"),
    (b'{"text": "\xc3\x28"}', "invalid_utf8"), (b'{"text": "\xed\xa0\x80"}', "invalid_utf8"),
    (b'{"text": "\xc0\xaf overlong"}', "invalid_utf8"), (b"\xff", "invalid_utf8"),
    (b'{"text": 1}', "not_a_string"), (b'{"text": null}', "not_a_string"), (b'{"text": ["a"]}', "not_a_string"),
    (b'{"text": {"a": 1}}', "not_a_string"), (b'{"text": true}', "not_a_string"),
    (b"[1]", "not_an_object"), (b'"just a string"', "not_an_object"), (b"3", "not_an_object"),
    (b"null", "not_an_object"), (b"{}", "missing_field"), (b'{"Text": "x"}', "missing_field"),
    (b'{"text": ""}', "empty_text"), (b'{"text": " \\n\\t "}', "empty_text"), (b'{"text": "\\u0000"}', "empty_text"),
    (b'{"text": "\\ufeff"}', "empty_text"), (b'{"text": "\\udc80 lone"}', "invalid_unicode"),
]


def _long_document(n_chars: int, rng: random.Random) -> str:
    words = ["alpha", "beta", "gamma", "δέλτα", "épsilon", "ζήτα", "😀", "1234", "—", "x" * 40]
    parts, size = [], 0
    while size < n_chars:
        w = rng.choice(words) + rng.choice([" ", " ", " ", "\n", ", ", ".\n\n"])
        parts.append(w)
        size += len(w)
    return "".join(parts)


def _write(path: Path, long_chars: int, tiny: int) -> tuple[list[str], dict[int, str]]:
    """Returns the expected kept texts and {line number: reason code} of the bad lines."""
    rng = random.Random(5)
    entries: list[tuple[bytes, str | None, str | None]] = []  # (raw line, kept text, reason)
    for t in GOOD:
        entries.append((json.dumps({"text": t}, ensure_ascii=rng.random() < 0.5).encode(), t, None))
    entries.append((json.dumps({"text": "a NUL \u0000 inside"}).encode(), "a NUL  inside", None))
    entries.append((json.dumps({"text": "crlf line end"}).encode() + b"\r", "crlf line end", None))
    entries += [(raw, None, reason) for raw, reason in BAD]
    entries += [(json.dumps({"id": i, "text": f"t{i}"}).encode(), f"t{i}", None) for i in range(tiny)]
    long = _long_document(long_chars, rng)
    entries.append((json.dumps({"text": long}, ensure_ascii=False).encode(), long, None))
    rng.shuffle(entries)
    bom = json.dumps({"text": "BOM on the first line"}).encode()
    entries.insert(0, (b"\xef\xbb\xbf" + bom, "BOM on the first line", None))
    with open(path, "wb") as f:
        for raw, _, _ in entries:
            f.write(raw + b"\n")
    kept = [unicodedata.normalize("NFC", t) for _, t, _ in entries if t is not None]
    bad = {i + 1: reason for i, (_, _, reason) in enumerate(entries) if reason}
    return kept, bad


@pytest.mark.parametrize(("long_chars", "tiny"), [
    (8_000_000, 100_000),
    pytest.param(100_000_000, 1_000_000, marks=pytest.mark.slow),
])
def test_garbage_in_every_good_record_out(tmp_path, long_chars, tiny):
    kept, bad = _write(tmp_path / "fuzz.jsonl", long_chars, tiny)
    tok_path = tmp_path / "tok.json"
    sample = GOOD * 10 + [_long_document(200_000, random.Random(1))]
    train_tokenizer(sample, TokenizerConfig(vocab_size=512)).save(str(tok_path))
    out = tmp_path / "data"
    pretrain("prepare", "configs/demo.yaml", "--set", f"data.output_dir={out}",
             "--set", f"data.sources=[{{path: '{tmp_path / 'fuzz.jsonl'}', name: fuzz}}]",
             "--set", f"data.tokenizer.path={tok_path}", timeout=1800)
    m = json.loads((out / "manifest.json").read_text())
    assert m["sources"][0]["records"] == len(kept) + len(bad)
    assert m["accounting"]["kept"] == len(kept) and m["accounting"]["quarantined"] == len(bad)
    assert m["quarantine"]["by_reason"] == dict(Counter(bad.values()))
    rows = [json.loads(line) for line in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["line"]: r["reason"].split(": ")[0] for r in rows} == bad

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eod = m["tokenizer"]["special_ids"]["eod"]
    decoded = Counter()
    for split in ("train", "validation"):
        for prefix in m["splits"][split]["sources"]["fuzz"]["shards"]:
            shard = IndexedShard(out / prefix)
            docs = [shard[i].tolist() for i in range(len(shard))]
            assert all(d[-1] == eod and eod not in d[:-1] for d in docs)
            decoded.update(tok.decode_batch([d[:-1] for d in docs]))
    assert decoded == Counter(kept)
