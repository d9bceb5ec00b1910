"""data.document_masking in the loader: document ids from the shard index, no GPT label across a
document end, BERT rows packed from whole segments — and nothing changes when it is off."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.data.loader import BERTSamples, BlendedSamples, GPTSamples
from pipeline.data.masking import IGNORE_INDEX
from pipeline.data.packing import document_bodies, fill_row, pack_rows
from pipeline.data.shards import ShardWriter

pytestmark = pytest.mark.unit

EOD, CLS, SEP, MASK, PAD = 2, 1, 2, 3, 0  # wordpiece: the end-of-document token is [SEP]
SPECIAL = {"cls": CLS, "sep": SEP, "mask": MASK, "pad": PAD, "eod": EOD}
FAST = settings(max_examples=60, deadline=None)


def write_shards(root: Path, docs: list[list[int]], per_shard: int) -> list[Path]:
    """Documents (each already ending with its EOD) in shards of ``per_shard`` documents."""
    prefixes = []
    root.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(docs), per_shard):
        prefix = root / f"s{k:03d}"
        with ShardWriter(prefix, np.uint16) as w:
            for d in docs[k : k + per_shard]:
                w.add_document(d)
        prefixes.append(prefix)
    return prefixes


def corpus(lengths: list[int], base: int = 10) -> list[list[int]]:
    """Documents of the given body lengths, each body token unique, each ended by EOD."""
    out, next_id = [], base
    for n in lengths:
        out.append(list(range(next_id, next_id + n)) + [EOD])
        next_id += n
    return out


def test_gpt_windows_stay_the_same_and_no_label_crosses_a_document_end(tmp_path):
    docs = corpus([5, 3, 9, 1, 6, 12])
    prefixes = write_shards(tmp_path, docs, per_shard=2)
    plain, masked = GPTSamples(prefixes, 8), GPTSamples(prefixes, 8, document_masking=True)
    assert len(plain) == len(masked)
    ids = list(range(len(plain)))
    (x0, y0), (x1, y1) = plain.batch(ids), masked.batch(ids)
    assert plain.batch(ids).doc_ids is None
    assert (x0 == x1).all()  # the same windows: same samples, same order
    flat = np.concatenate(docs)
    first = np.cumsum([0] + [len(d) for d in docs])[:-1]  # stream positions where documents start
    for row, i in enumerate(ids):
        targets = np.arange(i * 8 + 1, i * 8 + 9)  # stream positions of this row's labels
        crosses = np.isin(targets, first)
        assert (y1[row].numpy()[crosses] == IGNORE_INDEX).all()
        assert (y1[row].numpy()[~crosses] == flat[targets[~crosses]]).all()
        docs_of = masked.batch([i]).doc_ids[0].numpy()
        starts = np.flatnonzero(np.diff(docs_of)) + 1  # where the id changes
        assert (np.isin(i * 8 + starts, first)).all() and docs_of[0] == 0
        assert len(starts) == np.isin(np.arange(i * 8 + 1, i * 8 + 8), first).sum()


def test_blended_batches_carry_doc_ids_of_every_row(tmp_path):
    a = GPTSamples(write_shards(tmp_path / "a", corpus([4, 4, 4, 4]), 4), 6, document_masking=True)
    b = GPTSamples(write_shards(tmp_path / "b", corpus([20]), 1), 6, document_masking=True)
    data = BlendedSamples({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, seed=3)
    src, sid = data.ids(np.arange(8))
    batch = data.batch(src, sid)
    assert batch.doc_ids.shape == batch[0].shape == (8, 6)
    for row, (s, i) in enumerate(zip(src, sid)):
        alone = data.sources[s].batch([i])
        assert (batch.doc_ids[row] == alone.doc_ids[0]).all() and (batch[1][row] == alone[1][0]).all()


bodies_st = st.lists(st.integers(0, 40), min_size=1, max_size=25)  # 0: an empty document (EOD only)


@FAST
@given(lengths=bodies_st, seq_len=st.integers(3, 24), per_shard=st.integers(1, 6))
def test_packed_bert_rows_tile_the_documents_with_cls_piece_sep(lengths, seq_len, per_shard):
    docs = corpus(lengths)
    assume(sum(lengths) > 0)
    with tempfile.TemporaryDirectory() as tmp:
        samples = BERTSamples(write_shards(Path(tmp), docs, per_shard), seq_len, seed=0, special=SPECIAL,
                              vocab_size=4096, document_masking=True) if _fits(lengths, seq_len) else None
        if samples is None:
            return
        read = []
        for i in range(len(samples)):
            tokens, doc_ids = samples.row(i)
            assert tokens.shape == doc_ids.shape == (seq_len,)
            pad = int((tokens == PAD).sum())
            assert pad <= 2 and (tokens[seq_len - pad:] == PAD).all()  # at most a two-token pad tail
            for k in np.unique(doc_ids[: seq_len - pad]):
                piece = tokens[doc_ids == k]
                assert piece[0] == CLS and piece[-1] == SEP and len(piece) >= 3
                read += piece[1:-1].tolist()
        bodies = [t for d in docs for t in d[:-1]]
        assert read == bodies[: len(read)]  # every body token in stream order, none skipped or repeated
        assert len(bodies) - len(read) < seq_len  # only a last, incomplete row is left for more data


def _fits(lengths: list[int], seq_len: int) -> bool:
    bodies = document_bodies(np.cumsum([0] + [n + 1 for n in lengths])[:-1], sum(lengths) + len(lengths),
                             np.full(len(lengths), EOD), EOD)
    return len(pack_rows(bodies, seq_len)) > 0


@FAST
@given(lengths=bodies_st, more=bodies_st, seq_len=st.integers(3, 24))
def test_appending_documents_never_changes_a_complete_row(lengths, more, seq_len):
    def rows(ls):
        starts = np.cumsum([0] + [n + 1 for n in ls])[:-1]
        bodies = document_bodies(starts, sum(ls) + len(ls), np.full(len(ls), EOD), EOD)
        table = pack_rows(bodies, seq_len)
        return [fill_row(bodies, int(d), int(p), seq_len)[0] for d, p in table]

    before, after = rows(lengths), rows(lengths + more)
    assert after[: len(before)] == before


def test_packed_bert_masks_only_body_tokens_and_rows_are_pure_in_their_id(tmp_path):
    samples = BERTSamples(write_shards(tmp_path, corpus([3, 30, 2, 7, 11, 4]), 2), 16, seed=5, special=SPECIAL,
                          vocab_size=4096, document_masking=True)
    ids = list(range(len(samples)))
    x, y = batch = samples.batch(ids)
    tokens = np.stack([samples.row(i)[0] for i in ids])
    specials = np.isin(tokens, [CLS, SEP, PAD])
    assert (y.numpy()[specials] == IGNORE_INDEX).all() and (x.numpy()[specials] == tokens[specials]).all()
    assert ((y != IGNORE_INDEX).sum(dim=1) >= 1).all()  # every row trains
    again = samples.batch(ids[::-1])
    assert (again[0].flip(0) == x).all() and (again.doc_ids.flip(0) == batch.doc_ids).all()


def test_unpacked_bert_is_unchanged_by_the_new_code_path(tmp_path):
    prefixes = write_shards(tmp_path, corpus([3, 30, 2, 7, 11, 4]), 2)
    samples = BERTSamples(prefixes, 16, seed=5, special=SPECIAL, vocab_size=4096)
    flat = np.concatenate(corpus([3, 30, 2, 7, 11, 4]))
    assert len(samples) == flat.size // 14 and samples.batch([0]).doc_ids is None
    assert samples.tokens(1).tolist() == [CLS, *flat[14:28].tolist(), SEP]  # one window across documents


def test_too_little_data_for_one_packed_row_names_the_shard(tmp_path):
    from pipeline.data.shards import ShardError

    with pytest.raises(ShardError, match="s000"):
        BERTSamples(write_shards(tmp_path, corpus([2]), 1), 16, seed=0, special=SPECIAL, vocab_size=4096,
                    document_masking=True)
