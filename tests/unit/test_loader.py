"""Sample order, rank slicing and blending are pure functions; these pin their promises."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.loader import BlendedSamples, GPTSamples, blend, block_counts, rank_positions, sample_ids
from pipeline.data.shards import ShardWriter

pytestmark = pytest.mark.unit


@given(seed=st.integers(0, 2**31), n=st.integers(1, 300), start=st.integers(0, 1000))
@settings(max_examples=50, deadline=None)
def test_each_epoch_visits_every_sample_once(seed, n, start):
    epoch = start // n
    ids = sample_ids(seed, 0, n, np.arange(epoch * n, (epoch + 1) * n))
    assert sorted(ids.tolist()) == list(range(n))


@given(world=st.integers(1, 8), micro=st.integers(1, 8), accum=st.integers(1, 4), consumed=st.integers(0, 10_000))
@settings(max_examples=100, deadline=None)
def test_ranks_and_micro_steps_cover_the_global_batch_exactly(world, micro, accum, consumed):
    got = np.concatenate([
        rank_positions(consumed, m, r, world, micro) for m in range(accum) for r in range(world)
    ])
    assert sorted(got.tolist()) == list(range(consumed, consumed + micro * world * accum))


@given(old=st.sampled_from([(1, 4, 2), (2, 2, 2), (4, 1, 2), (2, 4, 1)]),
       new=st.sampled_from([(1, 8, 1), (2, 1, 4), (8, 1, 1)]), steps=st.integers(1, 5))
@settings(max_examples=40, deadline=None)
def test_resume_on_another_world_size_continues_the_same_stream(old, new, steps):
    """(world, micro, accum) with the same global batch of 8: the set read at each step is equal."""
    for consumed in range(0, steps * 8, 8):
        def step_set(world, micro, accum):
            return sorted(np.concatenate([
                rank_positions(consumed, m, r, world, micro) for m in range(accum) for r in range(world)
            ]).tolist())
        assert step_set(*old) == step_set(*new)


def test_blend_proportions_are_exact_per_block():
    counts = block_counts([3, 1], block=4096)
    assert counts.tolist() == [3072, 1024]
    src, draw = blend(7, [3, 1], np.arange(3 * 4096))
    assert np.bincount(src).tolist() == [3 * 3072, 3 * 1024]
    for s in (0, 1):  # the k-th draw of each source appears exactly once, in order
        assert draw[src == s].tolist() == list(range(int((src == s).sum())))


def test_blend_is_a_pure_function_of_seed_and_position():
    a = blend(1, [1, 2, 3], np.arange(5000, 6000))
    b = blend(1, [1, 2, 3], np.arange(5000, 6000))
    c = blend(2, [1, 2, 3], np.arange(5000, 6000))
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[0] == c[0]).all()


def test_gpt_samples_are_shifted_windows_across_shard_boundaries(tmp_path):
    stream = np.arange(1, 40)
    for k, chunk in enumerate(np.split(stream, [10, 25])):
        with ShardWriter(tmp_path / f"s{k}", np.uint16) as w:
            w.add_document(chunk)
    data = GPTSamples([tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"], seq_len=8)
    assert len(data) == (39 - 1) // 8
    x, y = data.batch([1, 2])
    assert x[0].tolist() == list(range(9, 17)) and y[0].tolist() == list(range(10, 18))
    assert x[1].tolist() == list(range(17, 25)) and y[1].tolist() == list(range(18, 26))


def test_blended_samples_draw_from_each_source_by_weight(tmp_path):
    for name, base in (("a", 0), ("b", 1000)):
        with ShardWriter(tmp_path / name, np.uint16) as w:
            w.add_document(np.arange(base, base + 401))
    data = BlendedSamples({"a": GPTSamples(tmp_path / "a", 4), "b": GPTSamples(tmp_path / "b", 4)},
                          {"a": 1.0, "b": 3.0}, seed=0)
    src, sid = data.ids(np.arange(4096))
    assert np.bincount(src).tolist() == [1024, 3072]
    x, _ = data.batch(src[:16], sid[:16])
    assert ((x[:, 0] >= 1000) == (torch_from(src[:16]) == 1)).all()


def torch_from(a):
    import torch

    return torch.from_numpy(a)
