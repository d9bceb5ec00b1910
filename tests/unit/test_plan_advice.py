"""`pretrain plan` for small and large runs: epochs per source, measured time, recompute, the
vocabulary from the tokenizer config, and the nearest valid batch splits."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.plan import estimate, run_plan
from pipeline.plan_advice import batch_suggestions, epochs_per_source, measured_tokens_per_s, samples_in

pytestmark = pytest.mark.unit


def cfg(*overrides):
    return load_config(None, ["model.vocab_size=256", "train.seq_len=64", "train.micro_batch_size_per_gpu=2",
                              "train.global_batch_size=8", "train.max_steps=100", *overrides])


def test_epochs_follow_the_blend_weights_and_the_source_sizes():
    c = cfg("data.sources=[{path: a.jsonl, weight: 3}, {path: b.jsonl, weight: 1}]")
    tokens = {"a": 64 * 800 + 1, "b": 64 * 50 + 1}  # 800 and 50 samples
    epochs = epochs_per_source(c, tokens)
    budget = 100 * 8
    assert epochs["a"] == pytest.approx(budget * 0.75 / 800) and epochs["b"] == pytest.approx(budget * 0.25 / 50)
    assert epochs["b"] > 1 > epochs["a"]


def test_a_source_without_one_sample_gets_no_share():
    c = cfg("data.sources=[{path: a.jsonl}, {path: b.jsonl}]")
    assert samples_in(64, 64) == 0 and list(epochs_per_source(c, {"a": 6401, "b": 10})) == ["a"]


@pytest.mark.parametrize(("g", "micro", "world", "expected"), [
    (16, 3, 2, [(4, 2), (2, 4), (1, 8)]),
    (24, 5, 3, [(4, 2), (8, 1), (2, 4)]),
    (16, 8, 3, []),
])
def test_batch_suggestions_are_the_nearest_valid_splits(g, micro, world, expected):
    pairs = batch_suggestions(g, micro, world)
    assert pairs == expected
    assert all(m * a * world == g for m, a in pairs)


def test_a_load_time_batch_error_names_the_nearest_valid_values():
    with pytest.raises(ConfigError, match=r"nearest valid: micro_batch_size_per_gpu 2 or 4, or global_batch_size 15 or 18"):
        load_config(None, ["train.global_batch_size=16", "train.micro_batch_size_per_gpu=3"])


def test_recompute_costs_a_third_more_time():
    off = estimate(cfg(), 1, mfu=0.5, peak_tflops=10)
    on = estimate(cfg("model.activation_checkpointing=true"), 1, mfu=0.5, peak_tflops=10)
    assert on.seconds == pytest.approx(off.seconds * 4 / 3)


def test_measured_throughput_is_the_median_of_the_recent_windows():
    rows = [{"step": i, "train/tokens_per_s": v} for i, v in enumerate([1, 1000, 2000, 3000, 4000])]
    assert measured_tokens_per_s(rows) == 2000 and measured_tokens_per_s([{"step": 1}]) is None


def _plan_lines(c, world=1, peak=10.0):
    lines: list[str] = []
    run_plan(c, world, 0.5, peak, out=lines.append)
    return "\n".join(lines)


def test_plan_takes_the_vocabulary_from_the_tokenizer_config_before_prepare(tmp_path):
    c = load_config(None, [f"run_dir={tmp_path}/run", f"data.output_dir={tmp_path}/none", "data.tokenizer.vocab_size=3000",
                           "train.seq_len=64", "train.micro_batch_size_per_gpu=2", "train.global_batch_size=8"])
    text = _plan_lines(c)
    assert "vocabulary 3,000 from data.tokenizer.vocab_size" in text and "vocab 3008" in text


def test_plan_uses_the_runs_measured_throughput_and_suggests_a_split(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/tokens_per_s": 512.0}) + "\n"
                                               for s in range(5)))
    c = cfg(f"run_dir={run}", f"data.output_dir={tmp_path}/none", "train.micro_batch_size_per_gpu=4")
    text = _plan_lines(c, world=3, peak=10.0)  # 8 is not divisible by 4 × 3
    assert "no micro-batch divides it" in text or "nearest" in text
    c2 = cfg(f"run_dir={run}", f"data.output_dir={tmp_path}/none")
    text2 = _plan_lines(c2, world=1)
    assert "measured     512 tokens/s logged by this run" in text2 and "100 steps" in text2
