import pytest

from pipeline.config import OptimConfig
from pipeline.train.schedule import lr_multiplier

pytestmark = pytest.mark.unit


def test_warmup_then_cosine_to_min_ratio():
    o = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, o, 100) == pytest.approx(0.1)
    assert lr_multiplier(9, o, 100) == pytest.approx(1.0)
    assert lr_multiplier(10, o, 100) == pytest.approx(1.0)
    assert lr_multiplier(55, o, 100) == pytest.approx(0.55)
    assert lr_multiplier(100, o, 100) == pytest.approx(0.1)
    assert all(lr_multiplier(s, o, 100) >= lr_multiplier(s + 1, o, 100) for s in range(10, 100))


from hypothesis import given, strategies as st  # noqa: E402


def test_linear_decays_in_a_straight_line_after_warmup():
    o = OptimConfig(warmup_steps=10, min_lr_ratio=0.0, schedule="linear")
    assert lr_multiplier(10, o, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, o, 110) == pytest.approx(0.5)
    assert lr_multiplier(110, o, 110) == pytest.approx(0.0)
    assert lr_multiplier(500, o, 110) == pytest.approx(0.0)  # past the end: stays at the floor


def test_warmup_stable_decay_holds_the_peak_then_decays_over_the_last_fraction():
    o = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", wsd_decay_fraction=0.2)
    assert lr_multiplier(4, o, 100) == pytest.approx(0.5)  # warmup
    assert [lr_multiplier(s, o, 100) for s in (10, 50, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_multiplier(90, o, 100) == pytest.approx(0.55)
    assert lr_multiplier(100, o, 100) == pytest.approx(0.1)


@given(schedule=st.sampled_from(["cosine", "linear", "wsd"]), warmup=st.integers(0, 50),
       max_steps=st.integers(1, 2000), min_ratio=st.floats(0.0, 1.0), step=st.integers(0, 3000))
def test_every_schedule_stays_between_the_floor_and_the_peak_and_never_rises_after_warmup(
        schedule, warmup, max_steps, min_ratio, step):
    o = OptimConfig(warmup_steps=warmup, min_lr_ratio=min_ratio, schedule=schedule)
    m = lr_multiplier(step, o, max_steps)
    assert 0.0 < m <= 1.0 + 1e-12 or (m == 0.0 and min_ratio == 0.0)
    if step >= warmup:
        assert m >= min_ratio - 1e-12
        assert lr_multiplier(step + 1, o, max_steps) <= m + 1e-12


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        lr_multiplier(-1, OptimConfig(), 10)
