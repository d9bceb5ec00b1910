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
