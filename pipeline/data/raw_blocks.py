"""jsonl read as bytes by the driver, parsed by the workers: the local executor's reader.

The driver of the local executor only decompresses a jsonl file and cuts the stream into blocks of
whole lines (about ``data.block_bytes`` each, cut after a line feed); the forked workers split a
block into lines and parse them with the same functions as `sources.read_jsonl`, so a record's text,
reason, excerpt and line number are exactly what that reader gives. JSON parsing and record checks
then run on every core instead of on the driver's one.

Line numbers: a block carries the number of its first line. The driver counts a block's lines with
``bytes.count`` (C speed), or, when the block holds a carriage return (a lone CR ends a line too),
with the same line splitter the workers use.

A file that fails while being read (truncated or corrupt compressed data, a read error) is read
again from its start by `sources.read_jsonl`, from the first line the blocks did not hold on: that
reader decides which records come before the failure and what the ``unreadable_file`` record says,
as it does for every other executor.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

from pipeline.data.sources import (
    Record, SourceFile, _Input, _jsonl_record, _lines, _position, _read_errors, doc_ids, read_jsonl,
)

RAW = "jsonl_bytes"  # the key that marks a block of raw lines (the other blocks are columns)


def _count_lines(blob: bytes) -> int:
    """How many lines `sources._lines` finds in ``blob`` (a block that ends after a line feed)."""
    if b"\r" not in blob:
        return blob.count(b"\n") + (0 if not blob or blob.endswith(b"\n") else 1)
    return sum(1 for _ in _lines(io.BytesIO(blob)))


def raw_block(sf: SourceFile, text_field: str, first: int, blob: bytes) -> dict:
    return {RAW: blob, "first": first, "source": sf.source, "file": sf.index, "text_field": text_field}


def records_of(block: dict) -> list[Record]:
    """The records of a raw block, as `sources.read_jsonl` yields them (blank lines skipped)."""
    source, file, field = block["source"], block["file"], block["text_field"]
    return [_jsonl_record(raw, source, line, field, file)
            for line, raw in enumerate(_lines(io.BytesIO(block[RAW])), start=block["first"]) if raw.strip()]


def columns_of(block: dict) -> dict:
    """A raw block as the columns every stage function takes (``doc_id``, ``text``, ``reason``, ``raw``)."""
    recs = records_of(block)
    return {"doc_id": doc_ids(block["source"], block["file"], [r.line for r in recs]),
            "text": [r.text or "" for r in recs], "reason": [r.reason or "" for r in recs],
            "raw": [r.raw or "" for r in recs]}


MAX_LINES = 4096  # lines in a block at most, as `workers.file_blocks` holds at most 4,096 records


def _at_most(blob: bytes, lines: int) -> Iterator[bytes]:
    """``blob`` in pieces of at most ``lines`` line feeds (the stream of tiny records stays in many blocks)."""
    if blob.count(b"\n") <= lines:
        yield blob
        return
    start = 0
    while start < len(blob):
        end = start
        for _ in range(lines):
            end = blob.find(b"\n", end) + 1
            if not end:
                end = len(blob)
                break
        yield blob[start:end]
        start = end


def _cuts(stream, block_bytes: int) -> Iterator[bytes]:
    """The stream's bytes in blocks of whole lines (the last block may end without a line feed)."""
    carry: list[bytes] = []
    while chunk := stream.read(block_bytes):
        end = chunk.rfind(b"\n") + 1
        if not end:  # a line longer than a block: keep collecting it
            carry.append(chunk)
            continue
        yield from _at_most(b"".join([*carry, chunk[:end]]) if carry else chunk[:end], MAX_LINES)
        carry = [chunk[end:]] if end < len(chunk) else []
    if carry:
        yield from _at_most(b"".join(carry), MAX_LINES)


def jsonl_blocks(sf: SourceFile, text_field: str, block_bytes: int, columns) -> Iterator[dict]:
    """Raw blocks of one jsonl file; after a read failure, column blocks (``columns(records)``) of the
    rest of the records as `sources.read_jsonl` reads them, its ``unreadable_file`` record included."""
    first = 1
    try:
        with _Input(sf.path) as stream:
            for blob in _cuts(stream, block_bytes):
                n = _count_lines(blob)
                _position(first + n - 1, sf.path)  # the same refusal of a file too long to number
                yield raw_block(sf, text_field, first, blob)
                first += n
        return
    except _read_errors():
        pass
    batch: list[Record] = []
    for rec in read_jsonl(sf.path, sf.source, text_field, sf.index):
        if rec.line >= first:
            batch.append(rec)
        if len(batch) >= 4096:
            yield columns(batch)
            batch = []
    if batch:
        yield columns(batch)
