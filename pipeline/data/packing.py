"""Document-aware packing (``data.document_masking``): which document each token of a sample is in.

A packed sample holds pieces of several documents. With document masking the model sees each
piece alone (positions from 0, attention only inside it: models/attention_masks.py), so the
loader says where the pieces are, as ``doc_ids`` (B, T): a new piece wherever the id changes.
The boundaries come from the shards' MMIDIDX index, which records where every document starts.

- GPT keeps its windows of ``seq_len + 1`` tokens exactly as without masking (same samples, same
  order); only the label whose target is the next document's first token becomes -100: the end of
  one document says nothing about the start of an unrelated one.
- BERT packs rows of exactly ``seq_len`` tokens as ``[CLS] piece [SEP] [CLS] piece [SEP] …``
  instead of one window across documents: ``pack_rows`` fills rows greedily from the stream,
  cutting a document only where a row is full, and the next row continues it. No token of the
  stream is skipped or repeated; a row whose last document ends one or two tokens short of the
  row end (too little room for ``[CLS] token [SEP]``) gets one or two pad tokens as their own
  piece, so no row needs more padding than that.

All of it is a pure function of the token stream, so samples stay a function of their id, and
appending shards (``prepare --append``) never changes a row that was complete before.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np

from pipeline.data.masking import IGNORE_INDEX
from pipeline.data.shards import IndexedShard

#: (D, 2) int64: (start, end) in stream positions of each document's body (its tokens without the
#: trailing end-of-document token), documents without a body left out; an array, not Python
#: tuples, so a source of millions of documents stays a few bytes per document
Bodies = np.ndarray


def shard_document_starts(shard: IndexedShard) -> np.ndarray:
    """Token offsets in the shard where each of its documents starts (a document may span several
    sequences in a Megatron index; ours have one each)."""
    seq_starts = np.concatenate([[0], np.cumsum(shard.sequence_lengths, dtype=np.int64)])
    return seq_starts[np.asarray(shard.document_indices[:-1], dtype=np.int64)]


def documents_of(starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The document number of each stream position, given the sorted document starts."""
    return np.searchsorted(starts, positions, side="right").astype(np.int64) - 1


def gpt_window(tokens: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, labels, doc_ids) of one window of ``seq_len + 1`` tokens and their documents."""
    labels = tokens[1:].copy()
    labels[docs[1:] != docs[:-1]] = IGNORE_INDEX  # the target starts another document
    return tokens[:-1], labels, docs[:-1] - docs[0]


def document_bodies(starts: np.ndarray, num_tokens: int, last_tokens: np.ndarray, eod: int | None) -> Bodies:
    """Each document's body: its span without the end-of-document token it ends with (if any).

    ``starts``: (D,) document starts; ``last_tokens``: (D,) the token each document ends with."""
    ends = np.append(starts[1:], num_tokens).astype(np.int64)
    body_ends = ends - ((last_tokens == eod) & (ends > starts)) if eod is not None else ends
    keep = body_ends > starts
    return np.stack([starts[keep], body_ends[keep]], axis=1).astype(np.int64).reshape(-1, 2)


def fill_row(bodies: Bodies, d: int, pos: int, seq_len: int) -> tuple[list[tuple[int, int]], int, int, bool]:
    """One BERT row from document ``d`` at stream position ``pos`` on: its pieces (start, end),
    where the next row starts (d, pos), and whether the row is complete (the stream may end first).

    Each piece costs its tokens plus [CLS] and [SEP]; a piece needs room for at least one token."""
    room, pieces, n = seq_len, [], len(bodies)
    while d < n:
        if room < 3:
            return pieces, d, pos, True  # one or two slots left: padded
        end = int(bodies[d, 1])
        take = min(end - pos, room - 2)
        pieces.append((pos, pos + take))
        room, pos = room - take - 2, pos + take
        if pos == end:
            d += 1
            pos = int(bodies[d, 0]) if d < n else pos
        if room == 0:
            return pieces, d, pos, True
    return pieces, d, pos, False


def pack_rows(bodies: Bodies, seq_len: int) -> np.ndarray:
    """(R, 2): where each complete row starts, as (document, stream position). A trailing row the
    stream ends inside is left out (more data would complete it)."""
    if seq_len < 3:
        raise ValueError(f"a packed BERT row needs seq_len ≥ 3 ([CLS] token [SEP]), got {seq_len}")
    rows, d, pos = array("q"), 0, int(bodies[0, 0]) if len(bodies) else 0  # 8 bytes per number
    while d < len(bodies):
        start = (d, pos)
        _, d, pos, complete = fill_row(bodies, d, pos, seq_len)
        if not complete:
            break
        rows.extend(start)
    return np.frombuffer(rows, dtype=np.int64).reshape(-1, 2).copy()


def row_layout(pieces: Sequence[np.ndarray], seq_len: int, *, cls: int, sep: int,
               pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_ids), each (seq_len,), from the pieces' tokens: ``[CLS] piece [SEP]`` per piece,
    then the pad tail (its own piece, so no real token attends to it)."""
    tokens = np.full(seq_len, pad, dtype=np.int64)
    doc_ids = np.full(seq_len, len(pieces), dtype=np.int64)
    at = 0
    for k, body in enumerate(pieces):
        n = len(body) + 2
        tokens[at : at + n] = np.concatenate([[cls], body, [sep]])
        doc_ids[at : at + n] = k
        at += n
    return tokens, doc_ids
