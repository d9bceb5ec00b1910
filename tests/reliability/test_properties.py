"""Property tests (hypothesis) for the pure functions that resume and elasticity rest on, beyond
tests/unit/test_loader.py and test_masking.py: blend proportions for any weights, purity of the
sample order whatever positions are asked together, packing windows that tile the token stream
across shard boundaries, MLM masking independent of batch composition, and the MMIDIDX index
math for any document lengths."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.data.loader import (
    BERTSamples, BlendedSamples, GPTSamples, TokenStream, blend, block_counts, rank_positions, sample_ids,
)
from pipeline.data.masking import IGNORE_INDEX
from pipeline.data.shards import IndexedShard, RollingShardWriter, ShardError, ShardWriter, write_index

pytestmark = pytest.mark.unit
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

weights_st = st.lists(st.floats(0.01, 100.0, allow_nan=False), min_size=1, max_size=6)


@FAST
@given(weights=weights_st, block=st.integers(1, 5000))
def test_block_counts_fill_the_block_within_one_of_the_exact_share(weights, block):
    counts = block_counts(weights, block)
    exact = np.asarray(weights) / sum(weights) * block
    assert counts.sum() == block and (counts >= 0).all()
    assert (np.abs(counts - exact) < 1.0).all()


@pytest.mark.parametrize("weights", [[], [0.0], [1.0, -1.0], [0.0, 0.0]])
def test_block_counts_refuse_weights_without_a_positive_sum(weights):
    with pytest.raises(ValueError, match="weights"):
        block_counts(weights, 16)


@FAST
@given(seed=st.integers(0, 2**32), weights=weights_st, block=st.integers(8, 300), n_blocks=st.integers(1, 4))
def test_each_block_draws_each_source_in_order_exactly_its_count(seed, weights, block, n_blocks):
    src, draw = blend(seed, weights, np.arange(n_blocks * block), block=block)
    counts = block_counts(weights, block)
    for s in range(len(weights)):
        got = draw[src == s]
        assert got.tolist() == list(range(n_blocks * counts[s]))  # the k-th draw once, in position order


@FAST
@given(seed=st.integers(0, 2**32), weights=weights_st,
       positions=st.lists(st.integers(0, 50_000), min_size=1, max_size=40))
def test_blend_of_a_position_does_not_depend_on_what_else_is_asked(seed, weights, positions):
    together = blend(seed, weights, np.array(positions), block=512)
    one_by_one = [blend(seed, weights, np.array([p]), block=512) for p in positions]
    assert together[0].tolist() == [int(s[0]) for s, _ in one_by_one]
    assert together[1].tolist() == [int(d[0]) for _, d in one_by_one]


@FAST
@given(seed=st.integers(0, 2**32), n=st.integers(1, 200), draws=st.lists(st.integers(0, 5000), min_size=1, max_size=50))
def test_sample_ids_are_in_range_and_pure_per_draw(seed, n, draws):
    ids = sample_ids(seed, 3, n, np.array(draws))
    assert ((ids >= 0) & (ids < n)).all()
    assert ids.tolist() == [int(sample_ids(seed, 3, n, np.array([d]))[0]) for d in draws]


@FAST
@given(global_batch=st.sampled_from([4, 8, 12, 24]), steps=st.integers(1, 6), seed=st.integers(0, 99),
       data=st.data())
def test_any_world_size_reads_the_same_samples_step_by_step(global_batch, steps, seed, data):
    """For every (world, micro) that divides the global batch, step k reads the same set of (source,
    sample) pairs: resuming on another world size neither skips nor repeats a sample."""
    layouts = [(w, m) for w in (1, 2, 3, 4, 6) for m in (1, 2, 4) if global_batch % (w * m) == 0]
    a, b = data.draw(st.sampled_from(layouts)), data.draw(st.sampled_from(layouts))
    weights = [1.0, 2.5]

    def step_pairs(world, micro, step):
        consumed = step * global_batch
        pos = np.concatenate([rank_positions(consumed, m, r, world, micro)
                              for m in range(global_batch // (world * micro)) for r in range(world)])
        src, draw = blend(seed, weights, pos, block=64)
        sid = np.array([sample_ids(seed, int(s), 37, np.array([d]))[0] for s, d in zip(src, draw)])
        return sorted(zip(src.tolist(), sid.tolist()))

    for step in range(steps):
        assert step_pairs(*a, step) == step_pairs(*b, step)


# ---------------------------------------------------------------- packing windows


def _shards(root: Path, docs: list[list[int]], cuts: list[int]) -> list[Path]:
    """Write ``docs`` into len(cuts)+1 shards (a document never spans two); returns the prefixes."""
    prefixes, groups, start = [], [], 0
    for cut in sorted(set(min(c, len(docs)) for c in cuts)) + [len(docs)]:
        groups.append(docs[start:cut])
        start = cut
    for k, group in enumerate(g for g in groups if g):
        with ShardWriter(root / f"s{k}", np.uint16) as w:
            for d in group:
                w.add_document(d)
        prefixes.append(root / f"s{k}")
    return prefixes


docs_st = st.lists(st.lists(st.integers(0, 65535), min_size=1, max_size=30), min_size=1, max_size=12)


@FAST
@given(docs=docs_st, cuts=st.lists(st.integers(1, 12), max_size=3), data=st.data())
def test_token_stream_reads_across_shards_like_one_array(docs, cuts, data):
    flat = np.concatenate([np.array(d) for d in docs])
    start = data.draw(st.integers(0, flat.size - 1))
    length = data.draw(st.integers(1, flat.size - start))
    with tempfile.TemporaryDirectory() as tmp:
        stream = TokenStream(_shards(Path(tmp), docs, cuts))
        assert stream.num_tokens == flat.size
        assert stream.read(start, length).tolist() == flat[start:start + length].tolist()


@FAST
@given(docs=docs_st, cuts=st.lists(st.integers(1, 12), max_size=3), seq_len=st.integers(1, 16))
def test_gpt_windows_tile_the_stream_with_labels_shifted_by_one(docs, cuts, seq_len):
    flat = np.concatenate([np.array(d) for d in docs])
    assume(flat.size > seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        data = GPTSamples(_shards(Path(tmp), docs, cuts), seq_len)
        n = len(data)
        assert n == (flat.size - 1) // seq_len
        x, y = data.batch(list(range(n)))  # (n, T) each
        assert x.flatten().tolist() == flat[: n * seq_len].tolist()  # no gap, no overlap
        assert y.flatten().tolist() == flat[1: n * seq_len + 1].tolist()


@FAST
@given(docs=docs_st, seq_len=st.integers(3, 16), seed=st.integers(0, 2**31), data=st.data())
def test_bert_samples_are_cls_window_sep_and_masking_ignores_the_batch(docs, seq_len, seed, data):
    flat = np.concatenate([np.array(d) % 500 + 10 for d in docs])
    assume(flat.size >= seq_len - 2)
    special = {"cls": 1, "sep": 2, "mask": 3, "pad": 0}
    with tempfile.TemporaryDirectory() as tmp:
        samples = BERTSamples(_shards(Path(tmp), [flat.tolist()], []), seq_len, seed=seed, special=special,
                              vocab_size=512)
        n = len(samples)
        i = data.draw(st.integers(0, n - 1))
        body = seq_len - 2
        assert samples.tokens(i).tolist() == [1, *flat[i * body:(i + 1) * body].tolist(), 2]
        others = data.draw(st.lists(st.integers(0, n - 1), max_size=4))
        alone = samples.batch([i])
        mixed = samples.batch([*others, i])
        assert mixed[0][-1].tolist() == alone[0][0].tolist() and mixed[1][-1].tolist() == alone[1][0].tolist()
        x, y = alone[0][0].numpy(), alone[1][0].numpy()
        assert x[0] == 1 and x[-1] == 2 and (y[[0, -1]] == IGNORE_INDEX).all()


@FAST
@given(weights=st.lists(st.floats(0.1, 10.0), min_size=2, max_size=3), seed=st.integers(0, 999),
       positions=st.lists(st.integers(0, 3000), min_size=1, max_size=20))
def test_blended_batches_are_pure_in_position(weights, seed, positions):
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for k in range(len(weights)):
            with ShardWriter(Path(tmp) / f"src{k}", np.uint16) as w:
                w.add_document(np.arange(k * 1000, k * 1000 + 200))
            sources[f"src{k}"] = GPTSamples(Path(tmp) / f"src{k}", 8)
        data = BlendedSamples(sources, {f"src{k}": w for k, w in enumerate(weights)}, seed)
        src, sid = data.ids(np.array(positions))
        x, _ = data.batch(src, sid)
        for row, p in zip(x, positions):
            s1, i1 = data.ids(np.array([p]))
            assert row.tolist() == data.batch(s1, i1)[0][0].tolist()
            assert row[0] // 1000 == s1[0]  # the row comes from the source the blend picked


# ---------------------------------------------------------------- shard index math


@FAST
@given(lengths=st.lists(st.integers(0, 50), min_size=0, max_size=30), dtype=st.sampled_from([np.uint16, np.int32]))
def test_index_round_trips_for_any_document_lengths(lengths, dtype):
    with tempfile.TemporaryDirectory() as tmp:
        docs = [np.arange(n, dtype=np.int64) % 60000 for n in lengths]
        with ShardWriter(Path(tmp) / "s", dtype) as w:
            for d in docs:
                w.add_document(d)
        shard = IndexedShard(Path(tmp) / "s")
        itemsize = np.dtype(dtype).itemsize
        assert shard.sequence_lengths.tolist() == lengths
        assert shard.sequence_pointers.tolist() == [sum(lengths[:i]) * itemsize for i in range(len(lengths))]
        assert shard.document_indices.tolist() == list(range(len(lengths) + 1))
        assert [shard[i].tolist() for i in range(len(shard))] == [d.tolist() for d in docs]
        assert shard.num_tokens == sum(lengths)


@FAST
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=10), data=st.data())
def test_any_truncated_or_padded_index_is_refused(lengths, data):
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "s"
        with ShardWriter(prefix, np.uint16) as w:
            for n in lengths:
                w.add_document(list(range(n)))
        raw = Path(f"{prefix}.idx").read_bytes()
        cut = data.draw(st.integers(0, len(raw) - 1))
        Path(f"{prefix}.idx").write_bytes(raw[:cut] if data.draw(st.booleans()) else raw + b"\0" * (cut + 1))
        with pytest.raises(ShardError, match=r"s\.idx"):
            IndexedShard(prefix)


@FAST
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=25), max_tokens=st.integers(1, 60))
def test_rolling_shards_never_split_a_document_and_roll_at_the_threshold(lengths, max_tokens):
    with tempfile.TemporaryDirectory() as tmp:
        w = RollingShardWriter(Path(tmp), "train", "src", np.uint16, max_tokens)
        docs = [list(range(k, k + n)) for k, n in enumerate(lengths)]
        for d in docs:
            w.add_document(d)
        w.close()
        shards = [IndexedShard(Path(tmp) / p) for p in w.shards]
        assert [s[i].tolist() for s in shards for i in range(len(s))] == docs
        for s in shards[:-1]:  # every shard but the last reached the threshold with its last document
            assert s.num_tokens >= max_tokens and s.num_tokens - int(s.sequence_lengths[-1]) < max_tokens
        assert w.num_tokens == sum(lengths) and w.documents == len(lengths)


def test_index_for_a_dtype_without_an_mmidx_code_is_refused(tmp_path):
    with pytest.raises((ValueError, KeyError)):
        write_index(tmp_path / "x.idx", np.array([1], dtype=np.int32), np.dtype(np.float16))
