"""The functions Ray Data runs in its workers for `pretrain prepare` (one batch in, one batch out).

Every stage re-reads and re-cleans the raw records rather than storing a cleaned copy of the corpus:
cleaning is a pure function of the text, so each stage sees the same documents, and no stage needs
disk for a second copy of the corpus. Arguments are plain dicts and refs so the functions pickle.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from pipeline.config import CleanConfig, DedupConfig
from pipeline.data.clean import clean_text
from pipeline.data.dedup import MinHasher, exact_key, shingle_hashes
from pipeline.data.fast_tokenizer import Encoder, ids_array
from pipeline.data.sources import Record, SourceFile, doc_ids, read_file

_MAX_ROWS = 4096


def _columns(records: list[Record], sf: SourceFile) -> dict:
    return {
        "doc_id": doc_ids(sf.source, sf.index, [r.line for r in records]),
        "text": [r.text or "" for r in records],  # "" not None: Arrow turns an all-null column into NaN
        "reason": [r.reason or "" for r in records],
        "raw": [r.raw or "" for r in records],
    }


def read_batches(item: dict, block_bytes: int) -> Iterator[dict]:
    """All records of one file (``item`` is a one-row batch), in blocks of about ``block_bytes``."""
    sf = SourceFile(int(item["source"][0]), int(item["file"][0]), str(item["path"][0]), str(item["format"][0]),
                    str(item["part"][0]) or None)
    buf, size = [], 0
    for rec in read_file(sf, str(item["text_field"][0]), str(item["text_unit"][0])):
        buf.append(rec)
        size += len(rec.text or "")
        if len(buf) >= _MAX_ROWS or size >= block_bytes:
            yield _columns(buf, sf)
            buf, size = [], 0
    if buf:
        yield _columns(buf, sf)


@functools.lru_cache(maxsize=2)
def _hasher(num_perm: int, seed: int) -> MinHasher:
    return MinHasher(num_perm, seed)


def scan_batch(batch: dict, clean: dict, dedup: dict) -> dict:
    """Clean each record and summarize it without its text: reason, excerpt, size, dedup keys."""
    ccfg, dcfg = CleanConfig(**clean), DedupConfig(**dedup)
    n = len(batch["doc_id"])
    reason, raw = list(batch["reason"]), list(batch["raw"])
    chars = np.zeros(n, dtype=np.int64)
    exact = np.zeros((n, 2), dtype=np.uint64)
    sig = np.zeros((n, dcfg.num_perm), dtype=np.uint32) if dcfg.near else None
    hasher = _hasher(dcfg.num_perm, dcfg.seed) if dcfg.near else None
    for i in range(n):
        if reason[i]:
            continue
        text, why = clean_text(batch["text"][i], ccfg)
        if why:
            reason[i], raw[i] = why, text[:200]
            continue
        chars[i] = len(text)
        if dcfg.exact or dcfg.near:
            exact[i] = exact_key(text)
        if sig is not None:
            sig[i] = hasher.signature(shingle_hashes(text, dcfg.ngram_size))
    out = {"doc_id": batch["doc_id"], "reason": np.array(reason, dtype=object), "raw": np.array(raw, dtype=object),
           "chars": chars}
    if dcfg.exact or dcfg.near:
        out["exact"] = exact
    if sig is not None:
        out["sig"] = sig
    return out


@functools.lru_cache(maxsize=4)
def _removed(removed_ref) -> np.ndarray:
    import ray

    return ray.get(removed_ref)


def _classify(batch: dict, clean: dict, removed_ref) -> tuple[list, list, np.ndarray, list[int], list[str]]:
    """Clean every record: (reasons, excerpts, duplicate mask, indices of kept records, their texts)."""
    ccfg = CleanConfig(**clean)
    removed = _removed(removed_ref)
    n = len(batch["doc_id"])
    reason, raw = list(batch["reason"]), list(batch["raw"])
    dup = np.isin(batch["doc_id"], removed) if len(removed) else np.zeros(n, dtype=bool)
    index, texts = [], []
    for i in range(n):
        if reason[i]:
            continue
        text, why = clean_text(batch["text"][i], ccfg)
        if why:
            reason[i], raw[i] = why, text[:200]
        elif not dup[i]:
            index.append(i)
            texts.append(text)
    return reason, raw, dup, index, texts


def kept_texts(batch: dict, clean: dict, removed_ref) -> dict:
    """The cleaned text of every kept document (for training the tokenizer)."""
    texts = _classify(batch, clean, removed_ref)[4]
    return {"text": np.array(texts, dtype=object)}


@functools.lru_cache(maxsize=2)
def _encoder(tokenizer_ref, kind: str) -> Encoder:
    """One Encoder per worker process and tokenizer (building tiktoken's tables takes a moment)."""
    import ray

    return Encoder(ray.get(tokenizer_ref), kind)


def encode_batch(batch: dict, clean: dict, removed_ref, tokenizer_ref, kind: str, eod_id: int, dtype: str) -> dict:
    """Every record with its fate: quarantined (reason, excerpt), duplicate, or kept with its token ids
    (end-of-document appended); ids are empty for the records that are not kept."""
    reason, raw, dup, index, texts = _classify(batch, clean, removed_ref)
    encoded = _encoder(tokenizer_ref, kind).encode(texts)
    ids = np.empty(len(reason), dtype=object)
    empty = np.zeros(0, dtype=np.dtype(dtype))
    for i in range(len(reason)):
        ids[i] = empty
    for i, e in zip(index, encoded):
        ids[i] = ids_array(e, eod_id, np.dtype(dtype))
    return {"doc_id": batch["doc_id"], "reason": np.array(reason, dtype=object),
            "raw": np.array(raw, dtype=object), "duplicate": dup, "ids": ids}
