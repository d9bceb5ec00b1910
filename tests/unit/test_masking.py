"""MLM masking: BERT's 15% / 80-10-10 recipe, stateless in (seed, sample index)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.masking import IGNORE_INDEX, mask_tokens

pytestmark = pytest.mark.unit

VOCAB, MASK, CLS, SEP, PAD = 1000, 3, 1, 2, 0
SPECIALS = (PAD, CLS, SEP, MASK)


def sample(rng: np.random.Generator, length: int = 128) -> np.ndarray:
    body = rng.integers(4, VOCAB, size=length - 2)
    return np.concatenate([[CLS], body, [SEP]]).astype(np.uint16)  # shards store uint16


def mask(tokens: np.ndarray, seed: int = 7, index: int = 0, **kw):
    return mask_tokens(tokens, seed=seed, sample_index=index, vocab_size=VOCAB, mask_id=MASK,
                       special_ids=SPECIALS, **kw)


def test_chooses_15_percent_then_splits_80_10_10():
    rng = np.random.default_rng(0)
    chosen = masked = randomized = kept = candidates = 0
    for i in range(2000):
        tokens = sample(rng)
        ids, labels = mask(tokens, index=i)
        picked = labels != IGNORE_INDEX
        candidates += 126
        chosen += picked.sum()
        masked += (ids[picked] == MASK).sum()
        kept += (ids[picked] == tokens[picked]).sum()
        randomized += ((ids[picked] != MASK) & (ids[picked] != tokens[picked])).sum()
    assert chosen / candidates == pytest.approx(0.15, abs=0.003)  # round(0.15 · 126) = 19 per sample
    assert masked / chosen == pytest.approx(0.80, abs=0.01)
    assert randomized / chosen == pytest.approx(0.10, abs=0.01)
    assert kept / chosen == pytest.approx(0.10, abs=0.01)


def test_same_seed_and_index_give_the_same_masking_whatever_came_before():
    tokens = sample(np.random.default_rng(0))
    first = mask(tokens, seed=3, index=41)
    for i in range(5):  # other samples in between leave no state behind
        mask(tokens, seed=3, index=i)
    again = mask(tokens, seed=3, index=41)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("seed, index", [(3, 42), (4, 41)])
def test_different_seed_or_index_gives_a_different_masking(seed, index):
    tokens = sample(np.random.default_rng(0))
    assert not np.array_equal(mask(tokens, seed=3, index=41)[1], mask(tokens, seed=seed, index=index)[1])


def test_labels_hold_the_original_tokens_and_outputs_are_int64():
    tokens = sample(np.random.default_rng(1))
    ids, labels = mask(tokens)
    assert ids.dtype == labels.dtype == np.int64 and ids.shape == labels.shape == tokens.shape
    picked = labels != IGNORE_INDEX
    assert np.array_equal(labels[picked], tokens[picked])
    assert np.array_equal(ids[~picked], tokens[~picked])


def test_a_sequence_of_only_special_tokens_is_left_alone():
    tokens = np.array([CLS, SEP, PAD, PAD])
    ids, labels = mask(tokens)
    assert np.array_equal(ids, tokens) and (labels == IGNORE_INDEX).all()


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="mask_prob"):
        mask(np.arange(4, 10), mask_prob=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        mask_tokens(np.array([0, 1]), seed=0, sample_index=0, vocab_size=2, mask_id=1, special_ids=[0])


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 40), min_size=1, max_size=64),
    specials=st.sets(st.integers(0, 40), max_size=10),
    seed=st.integers(0, 2**32 - 1),
    index=st.integers(0, 2**40),
    mask_prob=st.floats(0.01, 0.99),
)
def test_masking_invariants(tokens, specials, seed, index, mask_prob):
    vocab, mask_id = 41, 40
    specials = specials | {mask_id}
    tokens = np.array(tokens)
    ids, labels = mask_tokens(tokens, seed=seed, sample_index=index, vocab_size=vocab, mask_id=mask_id,
                              special_ids=specials, mask_prob=mask_prob)
    candidates = ~np.isin(tokens, list(specials))
    picked = labels != IGNORE_INDEX
    # only non-special positions are chosen, exactly round(p · n) of them (at least one)
    assert not (picked & ~candidates).any()
    n = int(candidates.sum())
    assert picked.sum() == (max(1, round(mask_prob * n)) if n else 0)
    # unchosen positions are untouched; chosen ones keep their label and never become another special
    assert np.array_equal(ids[~picked], tokens[~picked])
    assert np.array_equal(labels[picked], tokens[picked])
    replaced = ids[picked]
    assert ((replaced == mask_id) | ~np.isin(replaced, list(specials))).all()
    assert ((replaced >= 0) & (replaced < vocab)).all()
