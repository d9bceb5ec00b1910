"""Guards as pure pieces: spike z-score and window, skip counting, the fault-injection hooks, and
the ZeRO-0 optimizer hold that leaves weights and moments untouched."""

import math

import pytest
import torch

from pipeline.train import guards
from pipeline.train.engine import SkippableAdamW

pytestmark = pytest.mark.unit


def test_zscore_measures_distance_above_the_window_mean():
    assert guards.spike_zscore([1.0, 3.0], 4.0) == pytest.approx(2.0)  # mean 2, std 1
    assert guards.spike_zscore([2.0, 2.0, 2.0], 2.002) == pytest.approx(1.0)  # flat: std floored at 0.1% of mean
    assert guards.spike_zscore([5.0], 100.0) == 0.0  # one point says nothing


def test_spike_is_judged_only_on_a_full_window_of_applied_steps():
    d = guards.SpikeDetector(window_steps=3, threshold=4.0)
    for loss in (7.0, 6.9):
        d.record(loss)
        assert not d.is_spike(100.0)  # window not full yet
    d.record(6.8)
    assert d.is_spike(100.0) and not d.is_spike(6.7) and not d.is_spike(math.nan)
    d.record(6.7)
    assert d.history == [6.9, 6.8, 6.7]  # rolling


def test_consecutive_skips_halt_with_an_actionable_message():
    c = guards.SkipCounter(max_consecutive=2)
    c.skipped("nonfinite", step=3)
    c.applied()
    c.skipped("spike", step=5)
    with pytest.raises(guards.TrainingHalted, match="train.max_consecutive_skips"):
        c.skipped("nonfinite", step=6)
    assert c.counts == {"nonfinite": 2, "overflow": 0, "spike": 1} and c.total == 3


def test_fault_hooks_read_the_environment(monkeypatch):
    monkeypatch.setenv(guards.NAN_AT_STEP, "3,5")
    monkeypatch.setenv(guards.FAULT_RANKS, "1")
    monkeypatch.setenv(guards.SPIKE_AT_SAMPLE, "40")
    monkeypatch.setenv(guards.SPIKE_FACTOR, "10")
    one = torch.tensor(2.0)
    on_rank1, on_rank0 = guards.Faults.from_env(1), guards.Faults.from_env(0)
    assert torch.isnan(on_rank1.apply(one, step=3, batch_start=16, batch_end=24))
    assert on_rank0.apply(one, step=3, batch_start=16, batch_end=24) == 2.0
    assert on_rank0.apply(one, step=6, batch_start=40, batch_end=48) == 20.0  # the batch holding sample 40
    assert on_rank0.apply(one, step=6, batch_start=32, batch_end=40) == 2.0
    monkeypatch.setenv(guards.NAN_AT_STEP, "three")
    with pytest.raises(ValueError, match=guards.NAN_AT_STEP):
        guards.Faults.from_env(0)


def test_no_faults_without_the_environment(monkeypatch):
    for name in (guards.NAN_AT_STEP, guards.SPIKE_AT_SAMPLE, guards.FAULT_RANKS):
        monkeypatch.delenv(name, raising=False)
    loss = torch.tensor(1.5)
    assert guards.Faults.from_env(0).apply(loss, 1, 0, 8) is loss


class _Engine:  # what hold_nonfinite_step touches: the module and the optimizer
    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer


def test_zero0_hold_leaves_weights_moments_and_step_counts_untouched():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = SkippableAdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # one real step: moments exist
    opt.zero_grad()
    before_w = {k: v.clone() for k, v in model.state_dict().items()}
    before_m = {(id(p), k): v.clone() for p, s in opt.state.items() for k, v in s.items()}
    (model(torch.randn(2, 4)).sum() * float("nan")).backward()
    norm, held = guards.hold_nonfinite_step(_Engine(model, opt))
    assert held and math.isnan(norm)
    opt.step()
    assert all(torch.equal(before_w[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before_m[id(p), k], v) for p, s in opt.state.items() for k, v in s.items())
    opt.zero_grad()  # as DeepSpeed does after every step
    model(torch.randn(2, 4)).sum().backward()  # the hold lasts one step only
    assert guards.hold_nonfinite_step(_Engine(model, opt)) == (pytest.approx(guards.grad_norm(model.parameters()).item()), False)
    opt.step()
    assert not torch.equal(before_w["weight"], model.weight)
