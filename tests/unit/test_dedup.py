import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import DedupConfig
from pipeline.data.dedup import (
    MinHasher, bucket_keys, candidate_pairs, exact_key, lsh_params, resolve, shingle_hashes, similarity,
)

pytestmark = pytest.mark.unit

WORDS = [f"w{i}" for i in range(3000)]


def _doc(rng, n=300):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _jaccard(a, b, n=5):
    sa, sb = set(shingle_hashes(a, n).tolist()), set(shingle_hashes(b, n).tolist())
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_jaccard_similarity():
    rng = random.Random(0)
    hasher = MinHasher(256, seed=1)
    for changed in (0, 3, 15, 60, 300):
        a = _doc(rng).split()
        b = list(a)
        for i in rng.sample(range(len(b)), changed):
            b[i] = "changed"
        a, b = " ".join(a), " ".join(b)
        est = similarity(hasher.signature(shingle_hashes(a, 5)), hasher.signature(shingle_hashes(b, 5)))
        assert est == pytest.approx(_jaccard(a, b), abs=0.1)


def test_signatures_are_deterministic_and_ignore_case_and_spacing():
    a = "The Quick  brown fox\njumps over the lazy dog again and again"
    b = "the quick brown fox jumps over the LAZY dog again and again"
    s1 = MinHasher(64, seed=7).signature(shingle_hashes(a, 3))
    s2 = MinHasher(64, seed=7).signature(shingle_hashes(b, 3))
    assert s1.dtype == np.uint32 and (s1 == s2).all()
    assert not (MinHasher(64, seed=8).signature(shingle_hashes(a, 3)) == s1).all()
    assert len(shingle_hashes("two words", 5)) == 1  # shorter than n: the whole text is one shingle


def test_exact_key_is_the_text_not_its_spelling():
    assert (exact_key("caf\u00e9") == exact_key("caf\u00e9")).all()
    assert not (exact_key("caf\u00e9") == exact_key("cafe\u0301")).all()  # normalization happens before


@given(st.floats(0.3, 0.95), st.sampled_from([32, 64, 128, 256]))
@settings(max_examples=40, deadline=None)
def test_lsh_bands_find_pairs_above_the_threshold_and_few_far_below(threshold, num_perm):
    bands, rows = lsh_params(threshold, num_perm)
    assert 1 <= bands and bands * rows <= num_perm

    def candidate(s):  # probability that two documents of similarity s share a band
        return 1 - (1 - s**rows) ** bands

    assert candidate(min(threshold + 0.1, 1.0)) > 0.8
    assert candidate(max(threshold - 0.3, 0.0)) < 0.3


def test_candidate_pairs_connect_every_bucket_member():
    keys = np.array([5, 5, 5, 9, 9, 7] + [3] * 40)
    members = np.array([2, 0, 1, 4, 3, 6] + list(range(100, 140)))
    pairs = candidate_pairs(keys, members).tolist()
    assert [0, 1] in pairs and [0, 2] in pairs and [1, 2] in pairs and [3, 4] in pairs
    assert not any(6 in p for p in pairs)  # a bucket of one
    big = {tuple(p) for p in pairs if p[0] >= 100}
    parent = {m: m for m in range(100, 140)}

    def root(m):
        while parent[m] != m:
            m = parent[m]
        return m

    for a, b in big:
        parent[root(b)] = root(a)
    assert len({root(m) for m in range(100, 140)}) == 1  # one connected group


def _planted(rng):
    """Documents 0-9 distinct; 10 = exact copy of 2; 11 = near copy of 4; 12 = near copy of 11."""
    texts = [_doc(rng) for _ in range(10)]
    texts.append(texts[2])
    w = texts[4].split()
    w[100] = "zzz"
    texts.append(" ".join(w))
    w[200] = "yyy"
    texts.append(" ".join(w))
    return texts


@given(st.permutations(range(13)), st.randoms(use_true_random=False))
@settings(max_examples=25, deadline=None)
def test_duplicates_point_to_the_first_occurrence_whatever_the_pair_order(order, rnd):
    texts = _planted(random.Random(0))
    cfg = DedupConfig(exact=True, near=True, threshold=0.8)
    hasher = MinHasher(cfg.num_perm, cfg.seed)
    ids = np.array(order, dtype=np.int64) * 1000  # ids say which came first, not the array order
    exact = np.stack([exact_key(t) for t in texts])
    sigs = np.stack([hasher.signature(shingle_hashes(t, cfg.ngram_size)) for t in texts])
    keys = bucket_keys(exact, sigs, cfg)
    member = np.repeat(np.arange(len(texts)), keys.shape[1])
    pairs = candidate_pairs(keys.reshape(-1), member)
    pairs = pairs[rnd.sample(range(len(pairs)), len(pairs))]
    dups = resolve(ids, exact, sigs, pairs, cfg.threshold)
    first = {i: min(group, key=lambda k: ids[k]) for group in ([2, 10], [4, 11, 12]) for i in group}
    assert sorted((d.doc_id, d.duplicate_of) for d in dups) == sorted(
        (int(ids[i]), int(ids[first[i]])) for i in first if i != first[i])
    assert {d.kind for d in dups if d.doc_id in (ids[2], ids[10])} == {"exact"}
    assert all(d.similarity >= 0.8 for d in dups)


def test_exact_only_dedup_ignores_near_copies():
    texts = _planted(random.Random(1))
    cfg = DedupConfig(exact=True)
    exact = np.stack([exact_key(t) for t in texts])
    keys = bucket_keys(exact, None, cfg)
    pairs = candidate_pairs(keys.reshape(-1), np.arange(len(texts)))
    dups = resolve(np.arange(len(texts)), exact, None, pairs, cfg.threshold)
    assert [(d.doc_id, d.duplicate_of, d.kind) for d in dups] == [(10, 2, "exact")]
