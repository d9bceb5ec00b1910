"""The stage functions of `pretrain prepare`, applied to one block of records at a time.

Both executors (executors.py) run these same functions: Ray Data in its workers, the local
executor in processes forked from the driver. A block is a dict of columns (``doc_id``, ``text``,
``reason``, ``raw``) holding consecutive records of one file; every function returns one batch of
columns for it. Arguments are plain dicts, arrays and Ray object refs so the functions pickle.

Every stage re-reads the raw records rather than storing a cleaned copy of the corpus: cleaning is a
pure function of the text, so each stage sees the same documents, and no stage needs disk for a
second copy of the corpus. The quality filters are the expensive part of cleaning; when the dedup
pass has run, it has recorded which documents a filter dropped (``filtered``: sorted doc ids and
filter codes), and the later passes only normalize the text and look that verdict up.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from pipeline.config import CleanConfig, DedupConfig
from pipeline.data.clean import REGISTRY, clean_text, normalize
from pipeline.data.dedup import MinHasher, exact_key, shingle_hashes
from pipeline.data.fast_tokenizer import Encoder, ids_array
from pipeline.data.raw_blocks import RAW, columns_of, jsonl_blocks
from pipeline.data.sources import Record, SourceFile, doc_ids, read_file

_MAX_ROWS = 4096
_FILTER_REASONS = tuple(f.reason for f in REGISTRY.values())  # in clean.FILTERS order


def _columns(records: list[Record], sf: SourceFile) -> dict:
    return {
        "doc_id": doc_ids(sf.source, sf.index, [r.line for r in records]),
        "text": [r.text or "" for r in records],  # "" not None: Arrow turns an all-null column into NaN
        "reason": [r.reason or "" for r in records],
        "raw": [r.raw or "" for r in records],
    }


def file_blocks(sf: SourceFile, text_field: str, text_unit: str, block_bytes: int) -> Iterator[dict]:
    """All records of one file, in blocks of about ``block_bytes`` of text (at most 4,096 records)."""
    buf, size = [], 0
    for rec in read_file(sf, text_field, text_unit):
        buf.append(rec)
        size += len(rec.text or "")
        if len(buf) >= _MAX_ROWS or size >= block_bytes:
            yield _columns(buf, sf)
            buf, size = [], 0
    if buf:
        yield _columns(buf, sf)


def local_blocks(sf: SourceFile, text_field: str, text_unit: str, block_bytes: int) -> Iterator[dict]:
    """The local executor's blocks of one file: a jsonl file as raw lines (raw_blocks.py: the workers
    parse them), any other format as columns (`file_blocks`)."""
    if sf.format == "jsonl":
        return jsonl_blocks(sf, text_field, block_bytes, lambda records: _columns(records, sf))
    return file_blocks(sf, text_field, text_unit, block_bytes)


def as_columns(block: dict) -> dict:
    """A block as the columns the stage functions take (a raw jsonl block is parsed here, in the worker)."""
    return columns_of(block) if RAW in block else block


def read_batches(item: dict, block_bytes: int) -> Iterator[dict]:
    """Ray: the blocks of one file (``item`` is a one-row batch describing it)."""
    sf = SourceFile(int(item["source"][0]), int(item["file"][0]), str(item["path"][0]), str(item["format"][0]),
                    str(item["part"][0]) or None)
    yield from file_blocks(sf, str(item["text_field"][0]), str(item["text_unit"][0]), block_bytes)


def _resolve(value):
    """The value of a Ray object ref (fetched once per worker), or the value itself (local executor)."""
    return _fetched(value) if type(value).__name__ == "ObjectRef" else value


@functools.lru_cache(maxsize=8)
def _fetched(ref):
    import ray

    return ray.get(ref)


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
    out = {"doc_id": np.asarray(batch["doc_id"]), "reason": np.array(reason, dtype=object),
           "raw": np.array(raw, dtype=object), "chars": chars}
    if dcfg.exact or dcfg.near:
        out["exact"] = exact
    if sig is not None:
        out["sig"] = sig
    return out


def filtered_rows(doc_id: np.ndarray, reason) -> np.ndarray:
    """(k, 2) int64 [doc id, index in clean.FILTERS] of the records a quality filter dropped."""
    rows = [(int(d), _FILTER_REASONS.index(r)) for d, r in zip(doc_id, reason) if r.startswith("filter:")]
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _verdicts(ids: np.ndarray, filtered: np.ndarray) -> np.ndarray:
    """Per record: the index in clean.FILTERS of the filter that dropped it, or -1."""
    if not len(filtered):
        return np.full(len(ids), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(filtered[:, 0], ids), len(filtered) - 1)
    return np.where(filtered[pos, 0] == ids, filtered[pos, 1], -1)


def _classify(batch: dict, ccfg: CleanConfig, removed: np.ndarray, filtered: np.ndarray | None
              ) -> tuple[list, list, np.ndarray, list[int], list[str]]:
    """Clean every record: (reasons, excerpts, duplicate mask, indices of kept records, their texts).

    With ``filtered`` (the dedup pass's verdicts) the filters are not run again: a record is
    normalized, and dropped with the recorded filter's reason if it has one; a duplicate (which passed
    every filter, or dedup would not have seen it) is not even normalized."""
    ids = np.asarray(batch["doc_id"])
    n = len(ids)
    reason, raw = list(batch["reason"]), list(batch["raw"])
    dup = np.isin(ids, removed) if len(removed) else np.zeros(n, dtype=bool)
    verdict = _verdicts(ids, filtered) if filtered is not None else None
    index, texts = [], []
    for i in range(n):
        if reason[i]:
            continue
        if verdict is None:
            text, why = clean_text(batch["text"][i], ccfg)
        elif dup[i]:
            continue
        else:
            text = normalize(batch["text"][i], ccfg.normalization)
            why = _FILTER_REASONS[verdict[i]] if verdict[i] >= 0 else None
        if why:
            reason[i], raw[i] = why, text[:200]
        elif not dup[i]:
            index.append(i)
            texts.append(text)
    return reason, raw, dup, index, texts


def kept_texts(batch: dict, clean: dict, removed_ref, filtered_ref=None) -> dict:
    """The cleaned text of every kept document (for training the tokenizer)."""
    texts = _classify(batch, CleanConfig(**clean), _resolve(removed_ref), _resolve(filtered_ref))[4]
    return {"text": np.array(texts, dtype=object)}


@functools.lru_cache(maxsize=2)
def _encoder(tokenizer_ref, kind: str) -> Encoder:
    """One Encoder per worker process and tokenizer (building tiktoken's tables takes a moment)."""
    return Encoder(_resolve(tokenizer_ref), kind)


def encode_batch(batch: dict, clean: dict, removed_ref, filtered_ref, tokenizer_ref, kind: str, eod_id: int,
                 dtype: str, flat: bool = False) -> dict:
    """Every record with its fate: quarantined (reason, excerpt), duplicate, or kept with its token ids
    (end-of-document appended). ``tokenizer_ref`` is the tokenizer's JSON (or a Ray ref to it), or an
    Encoder built already (local executor).

    The ids come as ``ids``, one array per record (empty for the records not kept), or, with ``flat``,
    as ``tokens``, the kept records' ids end to end in one array, and ``length``, each record's share
    of it (0 for the records not kept): two buffers to send back instead of one object per record."""
    reason, raw, dup, index, texts = _classify(batch, CleanConfig(**clean), _resolve(removed_ref),
                                               _resolve(filtered_ref))
    encoder = tokenizer_ref if isinstance(tokenizer_ref, Encoder) else _encoder(tokenizer_ref, kind)
    out = {"doc_id": np.asarray(batch["doc_id"]), "reason": np.array(reason, dtype=object),
           "raw": np.array(raw, dtype=object), "duplicate": dup}
    if flat:
        tokens, lengths = encoder.encode_flat(texts, eod_id, np.dtype(dtype))
        out["length"] = np.zeros(len(reason), dtype=np.int64)
        out["length"][index] = lengths
        out["tokens"] = tokens
        return out
    ids = np.empty(len(reason), dtype=object)
    empty = np.zeros(0, dtype=np.dtype(dtype))
    for i in range(len(reason)):
        ids[i] = empty
    for i, e in zip(index, encoder.encode(texts)):
        ids[i] = ids_array(e, eod_id, np.dtype(dtype))
    out["ids"] = ids
    return out
