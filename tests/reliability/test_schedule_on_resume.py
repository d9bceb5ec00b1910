"""A resumed run whose LR schedule differs from its checkpoint's (a larger train.max_steps, another
warmup or kind) says so in one line and follows ``optim.on_resume_schedule_change``: continue keeps
the checkpoint's LR and decays over the remaining steps (no jump), restart warms up again from it,
refuse stops before any rank starts (test_parent_checks.py). The pure schedule first, then real runs
whose logged ``train/lr`` is compared around the resume step."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from reliability.training_faults import rows, run_cli
from pipeline.config import OptimConfig, load_config
from pipeline.train.checkpoint import latest_committed
from pipeline.train.schedule import Schedule, resumed

OPTIM = dict(lr=1e-3, warmup_steps=2, min_lr_ratio=0.1)


def _saved(optim: OptimConfig, max_steps: int):
    return Schedule(optim, max_steps).record()


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
def test_continue_starts_at_the_checkpoints_lr_and_only_decays_to_the_new_end(kind):
    old = OptimConfig(schedule=kind, **OPTIM)
    at = 6  # a checkpoint at step 6 of an 8-step run, resumed with 16
    schedule, changed = resumed(_saved(old, 8), old, 16, at)
    assert changed == ["train.max_steps 8 → 16"]
    before = Schedule(old, 8).lr(at)
    lrs = [schedule.lr(s) for s in range(at, 16)]
    assert lrs[0] == pytest.approx(before)  # the update after the resume: what the old run would have used
    assert all(b <= a + 1e-15 for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] >= 1e-4 - 1e-15 and max(lrs) <= before + 1e-15
    if kind != "wsd":  # (wsd is at its peak at step 6 of 8 either way)
        jumped = Schedule(old, 16).lr(at)  # recomputing over the new length: the bug this replaces
        assert jumped > before * 1.5


@pytest.mark.unit
def test_restart_warms_up_again_from_the_checkpoints_lr_then_decays():
    old = OptimConfig(**OPTIM)
    new = old.model_copy(update={"on_resume_schedule_change": "restart", "warmup_steps": 4})
    schedule, changed = resumed(_saved(old, 8), new, 20, 8)
    assert changed == ["optim.warmup_steps 2 → 4", "train.max_steps 8 → 20"]
    start = Schedule(old, 8).lr(8)
    lrs = [schedule.lr(s) for s in range(8, 20)]
    assert start < lrs[0] < lrs[1] < lrs[2] < lrs[3] == pytest.approx(1e-3)  # four warmup updates to the peak
    assert all(b <= a for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > 1e-4


@pytest.mark.unit
def test_the_same_schedule_resumes_unchanged_and_a_continued_one_goes_on_exactly():
    o = OptimConfig(**OPTIM)
    same, changed = resumed(_saved(o, 8), o, 8, 4)
    assert changed == [] and same.rebase is None and same.lr(5) == Schedule(o, 8).lr(5)
    first, _ = resumed(_saved(o, 8), o, 16, 6)
    record = first.record()  # what the continued run's checkpoints carry
    again, changed = resumed(record, o, 16, 11)  # a later resume with the same config
    assert changed == [] and [again.lr(s) for s in range(11, 16)] == [first.lr(s) for s in range(11, 16)]
    old_checkpoint, changed = resumed(None, o, 16, 6)  # written before schedules were recorded
    assert changed == [] and old_checkpoint.rebase is None


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["cosine", "linear", "wsd"]), warmup=st.integers(0, 8), old_max=st.integers(2, 60),
       extra=st.integers(1, 60), at_share=st.floats(0.0, 1.0), min_ratio=st.floats(0.0, 1.0))
def test_continue_never_jumps_up_for_any_schedule(kind, warmup, old_max, extra, at_share, min_ratio):
    old = OptimConfig(schedule=kind, warmup_steps=warmup, min_lr_ratio=min_ratio, lr=1e-3)
    at = int(at_share * old_max)
    schedule, _ = resumed(_saved(old, old_max), old, old_max + extra, at)
    lrs = [schedule.lr(s) for s in range(at, old_max + extra)]
    assert lrs[0] == pytest.approx(Schedule(old, old_max).lr(at), rel=1e-12, abs=1e-18)
    assert all(b <= a + 1e-15 for a, b in zip(lrs, lrs[1:]))


# ---------------------------------------------------------------------------- real runs


def _lrs(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/lr"] for r in rows(run_dir) if "train/lr" in r}


@pytest.fixture(scope="module")
def at_step_6(tiny, tmp_path_factory):
    """A one-rank run of train.max_steps 8 stopped (committed) at step 6: in the middle of its decay."""
    cfg, run_dir = tiny.config("schedule-base", optim={"warmup_steps": 2},
                               train={"nproc_per_node": 1, "max_steps": 8, "stop_at_step": 6})
    proc, _ = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest_committed(run_dir / "checkpoints").step == 6
    return cfg, run_dir


def _resume(at_step_6, tmp_path, *overrides: str):
    import shutil

    cfg, base = at_step_6
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    sets = [f"run_dir={run_dir}", "train.stop_at_step=null", "train.max_steps=16", *overrides]
    proc, _ = run_cli("train", str(cfg), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


@pytest.mark.e2e
def test_a_longer_run_continues_from_the_checkpoints_lr_without_a_jump(at_step_6, tmp_path):
    _, base = at_step_6
    run_dir, out = _resume(at_step_6, tmp_path, "train.stop_at_step=11")
    lines = [line for line in out.splitlines() if "LR schedule differs" in line]
    assert len(lines) == 1 and "train.max_steps 8 → 16" in lines[0] and "continue" in lines[0], out[-2000:]
    old = load_config(at_step_6[0]).optim
    before = _lrs(base)
    assert before[6] == pytest.approx(Schedule(old, 8).lr(5))
    lr = _lrs(run_dir)
    assert lr[7] == pytest.approx(Schedule(old, 8).lr(6))  # the LR the 8-step run would have used next
    assert lr[7] < Schedule(old, 16).lr(6) / 1.5  # not the new schedule's value at step 6
    # a second resume with the same config goes on along the same curve, to the end
    run_cli("train", str(at_step_6[0]), "--set", f"run_dir={run_dir}", "--set", "train.stop_at_step=null",
            "--set", "train.max_steps=16")
    lr = _lrs(run_dir)
    assert sorted(lr) == list(range(1, 17))
    expected, _ = resumed(Schedule(old, 8).record(), old, 16, 6)
    assert [lr[s] for s in range(7, 17)] == pytest.approx([expected.lr(s - 1) for s in range(7, 17)], rel=1e-9)
    assert all(b <= a for a, b in zip([lr[s] for s in range(6, 17)], [lr[s] for s in range(7, 17)]))


@pytest.mark.e2e
def test_restart_warms_up_again_from_the_checkpoints_lr(at_step_6, tmp_path):
    run_dir, out = _resume(at_step_6, tmp_path, "optim.on_resume_schedule_change=restart")
    assert sum("LR schedule differs" in line and "warms up again" in line for line in out.splitlines()) == 1
    lr = _lrs(run_dir)
    old = load_config(at_step_6[0]).optim
    start = Schedule(old, 8).lr(6)
    assert start < lr[7] < lr[8] == pytest.approx(old.lr)  # two warmup updates back to the peak
    assert all(b <= a for a, b in zip([lr[s] for s in range(8, 17)], [lr[s] for s in range(9, 17)]))
