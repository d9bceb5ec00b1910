"""Data eras: a dataset grown mid-run never changes what was trained and never re-shuffles it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.eras import Era, EraError, EraStream, check_growth, draw_counts
from pipeline.data.loader import blend, sample_ids

pytestmark = pytest.mark.unit
SEED = 77


def era(start, sources, sizes, weights=None, sha="x"):
    return Era(start, sha + str(start), tuple(sources), tuple(sizes), tuple(weights or [1.0] * len(sources)))


def draws_of(stream: EraStream, name: str, positions: np.ndarray) -> list[int]:
    """Sample ids drawn from one source, in position order."""
    src, sid = stream.ids(positions)
    return sid[src == stream.names.index(name)].tolist()


def test_one_era_is_the_plain_mapping():
    e = era(0, ["a", "b"], [37, 11], [3.0, 1.0])
    stream = EraStream([e], SEED, ["a", "b"])
    pos = np.arange(0, 9000)
    src, sid = stream.ids(pos)
    s, d = blend(SEED, [3.0, 1.0], pos)
    assert src.tolist() == s.tolist()
    for k, n in enumerate([37, 11]):
        assert sid[s == k].tolist() == sample_ids(SEED, k, n, d[s == k]).tolist()


def test_positions_before_the_new_era_keep_their_samples():
    old = EraStream([era(0, ["a", "b"], [50, 20])], SEED, ["a", "b"])
    grown = EraStream([era(0, ["a", "b"], [50, 20]), era(130, ["a", "b", "c"], [80, 20, 15])], SEED, ["a", "b", "c"])
    before = np.arange(130)
    assert [x.tolist() for x in old.ids(before)] == [x.tolist() for x in grown.ids(before)]


@settings(max_examples=40, deadline=None)
@given(n0=st.integers(5, 60), added=st.integers(1, 40), start=st.integers(1, 400), wa=st.floats(0.2, 5.0))
def test_a_grown_source_first_visits_its_unconsumed_and_new_samples(n0, added, start, wa):
    eras = [era(0, ["a", "b"], [n0, 9], [wa, 1.0]), era(start, ["a", "b"], [n0 + added, 9], [wa, 1.0])]
    stream = EraStream(eras, SEED, ["a", "b"])
    drawn_before = draws_of(stream, "a", np.arange(start))
    d = len(drawn_before)
    assert d == int(draw_counts(SEED, [wa, 1.0], start, 0)[0])
    this_epoch = set(drawn_before[(d // n0) * n0:])  # consumed in the epoch that was interrupted
    remainder = set(range(n0)) - this_epoch
    fill = remainder | set(range(n0, n0 + added))
    after = draws_of(stream, "a", np.arange(start, start + 20 * (n0 + added) + 4096))
    first = after[: len(fill)]
    assert sorted(first) == sorted(fill)  # each exactly once, nothing consumed comes back early
    epoch = after[len(fill): len(fill) + n0 + added]
    assert sorted(epoch) == list(range(n0 + added))  # then full epochs over everything


def test_a_source_that_did_not_grow_goes_on_in_its_old_order():
    eras = [era(0, ["a", "b"], [40, 13]), era(500, ["a", "b"], [70, 13])]
    stream = EraStream(eras, SEED, ["a", "b"])
    plain = EraStream(eras[:1], SEED, ["a", "b"])
    b_before = draws_of(stream, "b", np.arange(500))
    b_after = draws_of(stream, "b", np.arange(500, 3000))
    # what b would have drawn next without the new era, in the same order
    continued = draws_of(plain, "b", np.arange(0, 20000))[len(b_before): len(b_before) + len(b_after)]
    assert b_after == continued


def test_a_new_source_joins_with_all_its_samples():
    eras = [era(0, ["a"], [30]), era(64, ["a", "c"], [30, 25], [1.0, 1.0])]
    stream = EraStream(eras, SEED, ["a", "c"])
    assert draws_of(stream, "c", np.arange(64)) == []
    c = draws_of(stream, "c", np.arange(64, 64 + 4096))
    assert sorted(c[:25]) == list(range(25))


def test_three_eras_stay_exact_and_nested_fills_never_repeat_early():
    e0, e1, e2 = era(0, ["a"], [20]), era(7, ["a"], [26]), era(19, ["a"], [40])
    three = EraStream([e0, e1, e2], SEED, ["a"])
    two = EraStream([e0, e1], SEED, ["a"])
    assert three.ids(np.arange(19))[1].tolist() == two.ids(np.arange(19))[1].tolist()
    seen = three.ids(np.arange(19))[1].tolist()
    # after 19 draws: era 0's epoch lost 7 samples, era 1's fill (13 old + 6 new = 19) lost 12;
    # era 2's fill is era 1's 7 left over plus 14 new
    assert len(set(seen)) == 19
    nxt = three.ids(np.arange(19, 19 + 21))[1].tolist()
    assert sorted(nxt) == sorted(set(range(40)) - set(seen))
    assert sorted(three.ids(np.arange(40, 80))[1].tolist()) == list(range(40))


def test_growth_that_would_rewrite_trained_samples_is_refused():
    with pytest.raises(EraError, match="'a' shrank from 30 to 20"):
        check_growth(era(0, ["a"], [30]), era(10, ["a"], [20]))
    with pytest.raises(EraError, match="'b' was trained on but is missing"):
        check_growth(era(0, ["a", "b"], [30, 5]), era(10, ["a"], [40]))
    with pytest.raises(EraError, match="first data era must start at position 0"):
        EraStream([era(5, ["a"], [3])], SEED, ["a"])


def test_eras_round_trip_through_json():
    e = era(12, ["a", "b"], [3, 4], [0.5, 2.0])
    assert Era.from_json(e.to_json()) == e
